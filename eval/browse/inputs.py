"""Inputs of the browsing site: SAE_DIR/cfg.json, SAE_DIR/explain.jsonl, the training log and the eval report."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from sae.errors import UserError


class BrowseError(UserError, ValueError):
    """An input is missing or unreadable, or the output folder may not be written into."""


CLASSIFICATION_METHODS = ("detection", "fuzzing")
"""The scoring methods of Paulo et al. 2024 (eval/explain/detection.py) whose metrics a record may hold,
each as {scorer: {"balanced_accuracy", "f1", "auc", "positives", "negatives", "flags"}}, and its shuffled
control under "<method>_shuffled"."""


@dataclass(frozen=True)
class Excerpt:
    """A window of decoded tokens and the unit's activation on each."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class Unit:
    """One explained latent or neuron: a line of explain.jsonl."""

    kind: str
    unit: int
    explanation: str
    scores: dict
    shuffled_scores: dict
    shuffled_explanation_of: int | None
    top: tuple[Excerpt, ...]
    random: tuple[Excerpt, ...]
    classification: dict = field(default_factory=dict)
    """Detection and fuzzing metrics: {"detection" | "fuzzing" | "<method>_shuffled": {scorer: metrics}};
    empty for records written before them."""

    def metric(self, method: str, scorer: str, metric: str = "auc") -> float | None:
        """One detection or fuzzing metric (`method` may end in "_shuffled"); None when absent or undefined."""
        value = self.classification.get(method, {}).get(scorer, {}).get(metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def page(self) -> str:
        """File name of the unit's page."""
        return f"{self.kind}-{self.unit}.html"

    @property
    def label(self) -> str:
        """The unit's name in text, e.g. "latent 12"."""
        return f"{self.kind} {self.unit}"

    def all_activations(self) -> list[float]:
        """Activations on every token of every excerpt, top and random."""
        return [value for excerpt in self.top + self.random for value in excerpt.activations]

    @property
    def max_activation(self) -> float | None:
        """Largest activation over the excerpts (the shading's full scale); None without excerpts."""
        values = self.all_activations()
        return max(values) if values else None

    @property
    def random_density(self) -> float | None:
        """Fraction of the random excerpts' tokens where the unit is > 0: an estimate of how often it fires."""
        values = [value for excerpt in self.random for value in excerpt.activations]
        return sum(value > 0 for value in values) / len(values) if values else None


def read_json_file(path: Path, what: str, hint: str = ""):
    """Parsed JSON of `path`, or a BrowseError naming the file (and how to make it)."""
    if not path.is_file():
        raise BrowseError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BrowseError(f"{path} is not valid JSON: {error}") from None


def read_cfg(sae_dir: Path) -> dict:
    """The SAE's cfg.json (run name, model, hookpoint, sizes, final training metrics)."""
    hint = "is this an SAE folder (it holds cfg.json and sae.safetensors)?"
    cfg = read_json_file(sae_dir / "cfg.json", "SAE config", hint)
    if not isinstance(cfg, dict):
        raise BrowseError(f"{sae_dir / 'cfg.json'} does not hold a JSON object")
    return cfg


def _excerpts(record: dict, group: str, where: str) -> tuple[Excerpt, ...]:
    """The `group` ("top" or "random") excerpts of a record, checked to have one activation per token."""
    excerpts = []
    for index, excerpt in enumerate((record.get("excerpts") or {}).get(group) or []):
        excerpt = excerpt if isinstance(excerpt, dict) else {}
        tokens, activations = excerpt.get("tokens"), excerpt.get("activations")
        if not isinstance(tokens, list) or not isinstance(activations, list) or len(tokens) != len(activations):
            raise BrowseError(f"{where}: {group} excerpt {index} needs lists 'tokens' and 'activations' "
                              "of equal length")
        try:
            values = tuple(float(value) for value in activations)
        except (TypeError, ValueError):
            raise BrowseError(f"{where}: {group} excerpt {index} has an activation that is not a number") from None
        excerpts.append(Excerpt(tuple(str(token) for token in tokens), values))
    return tuple(excerpts)


def _classification(record: dict) -> dict:
    """The record's detection and fuzzing metrics (and shuffled controls) that are {scorer: {metric: value}}."""
    keys = [key for method in CLASSIFICATION_METHODS for key in (method, f"{method}_shuffled")]
    found = {}
    for key in keys:
        by_scorer = record.get(key)
        if isinstance(by_scorer, dict):
            by_scorer = {str(name): metrics for name, metrics in by_scorer.items() if isinstance(metrics, dict)}
            if by_scorer:
                found[key] = by_scorer
    return found


def unit_from_record(record: dict, where: str) -> Unit:
    """A Unit from one parsed line of explain.jsonl (`where` names the line in errors)."""
    if not isinstance(record, dict):
        raise BrowseError(f"{where}: expected a JSON object")
    for key in ("kind", "unit"):
        if key not in record:
            raise BrowseError(f"{where}: missing '{key}'")
    kind = record["kind"]
    if not isinstance(kind, str) or not re.fullmatch(r"[a-z][a-z_]*", kind):
        raise BrowseError(f"{where}: 'kind' must be a lowercase word like latent or neuron, got {kind!r}")
    if not isinstance(record["unit"], int) or record["unit"] < 0:
        raise BrowseError(f"{where}: 'unit' must be a non-negative integer, got {record['unit']!r}")
    return Unit(
        kind=kind,
        unit=record["unit"],
        explanation=str(record.get("explanation", "")),
        scores=record.get("scores") or {},
        shuffled_scores=record.get("shuffled_scores") or {},
        shuffled_explanation_of=record.get("shuffled_explanation_of"),
        top=_excerpts(record, "top", where),
        random=_excerpts(record, "random", where),
        classification=_classification(record),
    )


def read_units(path: Path) -> list[Unit]:
    """Every unit of explain.jsonl at `path`, latents first, each kind by unit id; none when there is no
    such file (an eval without --explain)."""
    if not path.is_file():
        return []
    units, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BrowseError(f"{where} is not valid JSON: {error}") from None
        unit = unit_from_record(record, where)
        if (unit.kind, unit.unit) in seen:
            raise BrowseError(f"{where}: {unit.label} is already on line {seen[unit.kind, unit.unit]}")
        seen[unit.kind, unit.unit] = number
        units.append(unit)
    return sorted(units, key=lambda unit: (unit.kind != "latent", unit.kind, unit.unit))


def read_training_log(path: Path) -> tuple[list[dict], int] | None:
    """(records of the training log, count of unreadable lines), or None when there is no log.

    Unreadable lines are skipped rather than fatal: a log that training is still writing may end
    in half a line.
    """
    if not path.is_file():
        return None
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def log_series(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) points of one log key, by step; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[float(record["step"])] = float(value)
    return sorted(by_step.items())


def read_report(path: Path, sae_dir: Path) -> dict:
    """The eval report of this SAE: the file's object, or the entry for `sae_dir` of a multi-SAE list."""
    report = read_json_file(path, "eval report", "write one with `python -m eval SAE_DIR --out PATH`")
    if isinstance(report, list):
        matching = [entry for entry in report if isinstance(entry, dict) and _same_folder(entry.get("sae"), sae_dir)]
        if len(matching) == 1 or len(report) == 1:
            report = (matching or report)[0]
        else:
            names = [entry.get("sae") for entry in report if isinstance(entry, dict)]
            raise BrowseError(f"{path} holds reports of {names}, none (or several) for {sae_dir}")
    if not isinstance(report, dict):
        raise BrowseError(f"{path} does not hold an eval report (a JSON object)")
    return report


def _same_folder(name, folder: Path) -> bool:
    """Whether the path `name` (as written into a report) is `folder`."""
    return isinstance(name, str) and Path(name).resolve() == folder.resolve()
