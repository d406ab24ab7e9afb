"""Sparsity fronts: each system's final SAEs over the k values, as (held-out L0, metric) points.

An SAE family is judged by its front: at equal L0, which reconstructs better (fvu) and hurts the LM less
(delta CE). BatchTopK's held-out L0 is not exactly k (its threshold is estimated), so points are placed
at their measured L0, not at k. Rows of several seeds (a row's "seed") become one point at their mean,
with the 95% interval of the metric drawn as a bar (eval/seeds.py). One SVG per hookpoint and metric,
log-log, one line per system. The peer benchmark (eval/peers) and `python -m eval.pareto` draw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sae.files import atomic_write

from .browse.svg import scaling_chart
from .seeds import Interval, summarize

FRONT_METRICS = {"fvu": "held-out fvu", "delta_ce": "delta CE (nats)"}


@dataclass(frozen=True)
class FrontPoint:
    """One system's final SAEs at one k: held-out L0 and the metric, each over the seeds."""

    l0: Interval
    value: Interval
    k: int


def lr_family(system: str) -> str:
    """A peer's system spec without its learning-rate factor: what the factors tuned on validation vary."""
    return " ".join(part for part in system.split() if not part.startswith("--lr_factor="))


def front_points(rows: list[dict], hookpoint: str, metric: str) -> dict[str, list[FrontPoint]]:
    """{system: [FrontPoint, ...] sorted by mean L0} of the final SAEs at `hookpoint`, systems in the rows'
    order, each (system, k) over its seeds. A peer tuned on validation (`--peer_lr_factors`) appears once,
    as its family (the spec without --lr_factor), at the lr tuned at each k; its other lrs are left out."""
    finals = [row for row in rows if row["hookpoint"] == hookpoint and row["final"]]
    tuned = {(row["k"], lr_family(row["system"])) for row in finals if row.get("tuned")}
    named = []
    for row in finals:
        family = lr_family(row["system"])
        if (row["k"], family) in tuned and not row.get("tuned"):
            continue
        named.append({**row, "front": family if (row["k"], family) in tuned else row["system"]})
    points: dict[str, list[FrontPoint]] = {}
    for entry in summarize(named, ("front", "k"), ("l0", metric)):
        points.setdefault(entry["front"], []).append(FrontPoint(entry["l0"], entry[metric], entry["k"]))
    return {system: sorted(line, key=lambda point: point.l0.mean) for system, line in points.items()}


def fronts_svg(rows: list[dict], hookpoint: str, metric: str) -> str | None:
    """The standalone SVG of `metric` against held-out L0 at `hookpoint`, one line per system, a bar per
    point over its seeds' 95% interval; the axes are logarithmic, so means <= 0 (a delta CE below the
    clean LM's) are left out, and None when none is left."""
    points = front_points(rows, hookpoint, metric)
    drawn = {system: [point for point in line if point.value.mean > 0] for system, line in points.items()}
    dots = [(point.l0.mean, point.value.mean, system, _tooltip(system, point, metric))
            for system, line in drawn.items() for point in line]
    if not dots:
        return None
    curves = [(system, False, [(point.l0.mean, point.value.mean) for point in line]) for system, line in drawn.items()]
    bars = [(point.l0.mean, point.value.low, point.value.high, system)
            for system, line in drawn.items() for point in line if point.value.half_width and point.value.low > 0]
    finals = [row for row in rows if row["hookpoint"] == hookpoint and row["final"]]
    tokens = min(row["tokens"] for row in finals)
    seeds = len({row.get("seed", 0) for row in finals})
    finetuned = " (+finetune: then its fine-tune's)" if any(system.endswith("+finetune") for system in points) else ""
    spread = f"; mean of {seeds} seeds, bars: 95% interval" if seeds > 1 else ""
    return scaling_chart(f"{FRONT_METRICS[metric]} vs L0 at {hookpoint}", dots, curves, list(points), "held-out L0",
                         FRONT_METRICS[metric], f"{tokens:,} training tokens each{finetuned}; "
                         f"{finals[0].get('split', 'test')} split{spread}", bars=bars)


def _tooltip(system: str, point: FrontPoint, metric: str) -> str:
    return f"{system}, k={point.k}: L0 {point.l0.text('.1f')}, {metric} {point.value.text('.4g')}"


def write_fronts(rows: list[dict], out: Path) -> list[Path]:
    """OUT/fronts-HOOKPOINT-METRIC.svg for each hookpoint with more than one k and each FRONT_METRICS with a
    positive value to draw; the paths written."""
    written = []
    for hookpoint in dict.fromkeys(row["hookpoint"] for row in rows):
        if len({row["k"] for row in rows if row["hookpoint"] == hookpoint}) < 2:
            continue
        for metric in FRONT_METRICS:
            path = out / f"fronts-{hookpoint}-{metric}.svg"
            svg = fronts_svg(rows, hookpoint, metric)
            if svg is None:
                continue
            atomic_write(path, lambda tmp: Path(tmp).write_text(svg + "\n"))
            written.append(path)
    return written
