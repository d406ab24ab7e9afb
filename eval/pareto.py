"""Sparsity fronts with seeds: an L0 sweep × seeds, trained from one stream and scored in one pass.

    python -m eval.pareto                                          # embedded default: k 8-64 x seeds 0, 1, 2
    python -m eval.pareto --ks "[16, 32]" --seeds "[0, 1, 2, 3, 4]" --tokens 1000000
    python -m eval.pareto --families '["", "activation=batchtopk"]'   # TopK against BatchTopK, seed for seed
    python -m eval.pareto --eval.sparse_probe --eval.tokens 262144    # any option of python -m eval as --eval.KEY

One training run of `--train_config` (with its `--overrides`, e.g. "[--lr=0.01]") holding one SAE per family,
k and seed (`TrainConfig.variants`, named FAMILY-kK-seedS): every SAE reads the same batches (one LM forward
per batch for all of them), so the seeds vary the initialisation alone, and a family is a set of SAE fields
("activation=batchtopk matryoshka=[128,512]", "n_latents=4096", "lr=0.01"; "" is the config's SAE). Then
one `python -m eval` pass scores every SAE on the same held-out tokens (`--eval.split`: test by default,
the split nothing is tuned on). OUT/report.md gives each metric's mean and the half-width of its 95%
interval over the seeds per family and k (eval/seeds.py), and, where there are several families, which
differences from the first family exceed seed noise (the intervals separate); OUT/pareto.json holds the
same with every SAE's numbers, OUT/reports.json the eval reports, OUT/fronts-HOOKPOINT-{fvu,delta_ce}.svg
the fronts at the means with the intervals as bars. The run is reused when OUT holds it from the same
config, and resumed from its last checkpoint when it was stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from sae.config import ConfigError, SaeVariant, TrainConfig, from_dict, parse_args, to_dict
from sae.errors import run_cli
from sae.files import atomic_write
from sae.trainer import train

from .__main__ import EvalConfig, run_eval
from .fronts import write_fronts
from .missing import report_json
from .report import headline_metrics, write_report
from .seeds import comparison, interval_table, json_ready, summarize

COMPARED_METRICS = ("fvu", "delta_ce")
"""The metrics on which each family is compared with the first at every k."""


@dataclass(frozen=True)
class ParetoConfig:
    """Options of `python -m eval.pareto`."""

    train_config: str = "configs/default.yaml"
    """The run's config: model, text, hookpoint, SAE, optimiser, batch size, data order seed."""

    overrides: tuple[str, ...] = ()
    """Overrides of the run's config, as train.py takes them: "[--lr=0.01, --batch_size=8192]"."""

    ks: tuple[int, ...] = (8, 16, 32, 64)
    """The L0 sweep: k of every SAE."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Initialisation seeds; each family and k is trained once per seed."""

    families: tuple[str, ...] = ("",)
    """SAE settings to compare, each "KEY=VALUE ..." of a variant's fields (n_latents, k_aux, activation,
    matryoshka, lr, ...; sae/config.py SaeVariant); "" is the config's SAE."""

    tokens: int = 2_000_000
    """Training tokens (every SAE reads all of them)."""

    eval: EvalConfig = field(default_factory=lambda: EvalConfig(split="test"))
    """How the SAEs are scored: `python -m eval`'s options (its --out is OUT/reports.json here)."""

    out: str = "runs/pareto"
    """Folder of the run, the reports and the fronts."""

    def __post_init__(self):
        if not self.ks or not self.seeds or not self.families:
            raise ValueError("--ks, --seeds and --families each need at least one value")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"--ks and --seeds must not repeat a value, got {list(self.ks)} and {list(self.seeds)}")
        if self.eval.out:
            raise ValueError("--eval.out is not used here: the reports go to OUT/reports.json")
        if self.tokens < 1:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")


def family_fields(family: str) -> dict:
    """A family's SaeVariant fields: "activation=batchtopk matryoshka=[128,512]" -> {"activation": "batchtopk",
    "matryoshka": [128, 512]} (values read as YAML, as train.py reads options)."""
    fields = {}
    for part in family.split():
        key, equals, value = part.partition("=")
        if not equals or key in ("name", "k", "seed", "hookpoint"):
            raise ConfigError(f"family '{family}': each setting is KEY=VALUE of an SAE field (n_latents, k_aux, "
                              f"activation, matryoshka, lr, ...); name, k, seed and hookpoint are the sweep's, "
                              f"got '{part}'")
        fields[key] = yaml.safe_load(value)
    return fields


def family_label(family: str) -> str:
    """A family's name in tables and folder names: "" -> "config", else the settings made folder-safe."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", family).strip("_") or "config"


def sweep_config(cfg: ParetoConfig) -> TrainConfig:
    """The training run: the config with its overrides, and one variant per family, k and seed."""
    base = parse_args(["--config", cfg.train_config, *cfg.overrides], TrainConfig)
    if base.variants:
        raise ConfigError(f"{cfg.train_config} has variants; eval.pareto makes its own (one per family, k and seed): "
                          "give it a config of one SAE")
    variants = [from_dict(SaeVariant, {**family_fields(family), "name": f"{family_label(family)}-k{k}-seed{seed}",
                                       "k": k, "seed": seed}, "family.")
                for family in cfg.families for k in cfg.ks for seed in cfg.seeds]
    return replace(base, variants=tuple(variants), max_tokens=cfg.tokens, eval_every=0, resume=False,
                   out_dir=str(Path(cfg.out)), run_name="run")


def train_sweep(train_cfg: TrainConfig, out: Path) -> dict:
    """Train the run, or reuse OUT's finished run of this very config, or resume OUT's stopped one:
    {"identity", "done", "wall_s", "cpu_s"} as OUT/run.json records it."""
    record_path = out / "run.json"
    identity = to_dict(train_cfg)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    same = record.get("identity") == identity
    if same and record.get("done"):
        return record
    if record and not same and train_cfg.run_dir.exists():  # this tool's own run, of another config
        print(f"{train_cfg.run_dir}: trained with another config; training it again")
        shutil.rmtree(train_cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps({"identity": identity, "done": False}) + "\n"))
    wall, cpu = time.perf_counter(), time.process_time()
    train(replace(train_cfg, resume=same))  # a stopped run of this config goes on from its last checkpoint
    record = {"identity": identity, "done": True, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    return record


def family_comparisons(summary: list[dict]) -> list[str]:
    """At each k, every family against the first on COMPARED_METRICS (a difference only where the intervals separate)."""
    first = summary[0]["system"]
    by_key = {(entry["system"], entry["k"]): entry for entry in summary}
    return [f"k={entry['k']}: " + comparison(entry, by_key[(first, entry["k"])], metric)
            for entry in summary if entry["system"] != first for metric in COMPARED_METRICS]


def pareto(cfg: ParetoConfig) -> dict:
    """Train, score and summarise (the module docstring); returns what OUT/pareto.json holds."""
    train_cfg = sweep_config(cfg)
    out = Path(cfg.out)
    record = train_sweep(train_cfg, out)
    folders = [str(folder) for folder in train_cfg.sae_folders()]
    reports = run_eval(cfg.eval, folders)
    write_report(out / "reports.json", reports)
    families = [family_label(family) for family in cfg.families for _ in cfg.ks for _ in cfg.seeds]
    rows, metrics = [], {}
    for family, variant, report in zip(families, train_cfg.variants, reports):
        measured = headline_metrics(report)
        metrics.update(dict.fromkeys(measured))
        rows.append({"system": family, "k": variant.k, "seed": variant.seed, "hookpoint": report["hookpoint"],
                     "sae": report["sae"], "final": True, "tokens": train_cfg.total_steps * train_cfg.batch_size,
                     "split": cfg.eval.split or "held-out", **measured})
    metrics = list(metrics)
    summary = summarize(rows, ("system", "k"), tuple(metrics))
    statements = family_comparisons(summary) if len(cfg.families) > 1 else []
    held_out = reports[0]["data"]["held_out"]
    text = (f"{len(rows)} SAEs ({len(cfg.families)} famil{'y' if len(cfg.families) == 1 else 'ies'} x k {list(cfg.ks)} "
            f"x seeds {list(cfg.seeds)}), {rows[0]['tokens']:,} training tokens each from one stream; scored on "
            f"{reports[0]['never_fired_tokens']:,} held-out tokens ({held_out}); mean ± 95% interval over the seeds\n\n"
            + interval_table(["family", "k"], [[entry["system"], str(entry["k"])] for entry in summary], summary, metrics)
            + ("\n\n" + "\n".join(f"- {line}" for line in statements) if statements else ""))
    result = {"config": to_dict(cfg), "held_out": held_out, "train_wall_s": record.get("wall_s"), "saes": rows,
              "summary": [json_ready(entry) for entry in summary], "comparisons": statements}
    atomic_write(out / "pareto.json", lambda tmp: Path(tmp).write_text(report_json(result, indent=1) + "\n"))
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    for path in write_fronts(rows, out):
        print(f"wrote {path}")
    print(text)
    return result


def main(argv: list[str] | None = None) -> dict:
    return pareto(parse_args(sys.argv[1:] if argv is None else argv, ParetoConfig, usage=__doc__))


if __name__ == "__main__":
    run_cli(main)
