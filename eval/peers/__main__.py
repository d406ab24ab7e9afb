"""The peer quality benchmark: our SAE against EleutherAI sparsify's and SAELens's, on identical activations.

    python -m eval.peers                                          # embedded default, k=16, 2M tokens
    python -m eval.peers --ks "[8, 16, 32, 64]" --hookpoints "[transformer.h.1, transformer.h.2]"
    python -m eval.peers --systems "[ours, ours --grad_clip=0, sparsify]"      # an ablation of ours
    python -m eval.peers --peer_lr_factors "[0.25, 4, 16]"       # each peer also at these multiples of its lr
    python -m eval.peers --ks "[8, 16, 32, 64]" --seeds "[0, 1, 2]"   # every run at 3 seeds: means, 95% intervals
    python -m eval.peers --hookpoints "[transformer.h.2.mlp]" --systems "[ours --sae.transcode, sparsify --sae.transcode]"
    python -m eval.peers --systems '["ours --sae.activation=batchtopk", "saelens --sae.activation=batchtopk",
        "saelens --sae.activation=batchtopk --sae.matryoshka=[128,512]"]'    # BatchTopK and Matryoshka SAEs

One activation cache of `--train_config`'s model and text (all hookpoints, one LM forward per batch),
then for every hookpoint, k and system: train on the same rows in the same order (our trainer's order
of that cache, eval/peers/rows.py) for the same tokens, writing an SAE folder every
`--checkpoint_tokens`. Each peer uses its own trainer with its own defaults: sparsify's `Trainer`
(eval/peers/sparsify_trainer.py) and SAELens's `SAETrainer` with its TopK, BatchTopK or Matryoshka
BatchTopK SAE (eval/peers/saelens.py). A system of the form "ours --key=value ..." is ours with those
config overrides (for ablations, or "--sae.transcode": a transcoder of the hookpoint's module, an MLP,
from its input to its output; docs/transcoders.md). A peer takes "--lr_factor=F" (its default learning
rate times F) and the overrides of the kind of sparse coder (KIND_KEYS: "--sae.transcode",
"--sae.skip_connection", "--sae.activation=batchtopk", "--sae.matryoshka=[128,512]", no spaces inside
one) where its trainer trains that kind (PEERS: sparsify's trains transcoders, SAELens's BatchTopK and,
with BatchTopK only, Matryoshka SAEs). With `--peer_lr_factors`, each
peer is also trained at those multiples of its default learning rate, and the factor whose final SAE has
the lowest fvu on the validation split is marked "(tuned)": peers get the same tuning on validation that
chose our defaults. Then one `python -m eval` pass scores every folder on the same held-out tokens of
`--split` (test: nothing is chosen on it); the table (markdown,
also in OUT/report.md, and OUT/report.json) has held-out fvu, delta CE, KL, the fraction of latents
that never fired on the held-out tokens and L0 at every checkpoint, with each run's wall and CPU
seconds. With `--seeds`, every run is trained once per seed (the data order and every system's init),
and the report adds each metric's mean and 95% interval per hookpoint, k and system, the fronts drawn at
the means with the intervals as bars, and which differences exceed seed noise (eval/seeds.py: the
intervals separate). A run already in OUT with the same resolved config is reused, not retrained; one with
another config (a changed default, say) is trained again.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

from sae.cache import MANIFEST, ActivationCache, CachedWindows, build_cache, read_manifest
from sae.data import text_read_record
from sae.config import ConfigError, SaeConfig, TrainConfig, parse_args, to_dict
from sae.errors import run_cli
from sae.optim import run_lr

from ..__main__ import EvalConfig, run_eval
from ..missing import report_json
from .dead import window_dead_fraction
from ..fronts import lr_family, write_fronts
from ..seeds import comparison, interval_table, json_ready, summarize
from .ours import finetune_final, train_ours
from .rows import shared_batches

PEERS = {"sparsify": ("transcode", "skip_connection"), "saelens": ("activation", "matryoshka")}
"""Each peer, and the KIND_KEYS its trainer can train with (sparsify's: transcoders, skip or not; SAELens's:
BatchTopK and Matryoshka SAEs, its TopK ones when none is set)."""

PEER_KIND_NEEDS = {("saelens", "matryoshka"): ("activation", "batchtopk")}
"""(peer, kind key) -> (key, value) that kind needs too: SAELens's Matryoshka SAE is BatchTopK inside."""

KIND_KEYS = ("transcode", "skip_connection", "activation", "matryoshka")
"""The SaeConfig fields that say what kind of sparse coder a run trains (a plain TopK SAE at their
defaults): part of the task, which a peer's system spec may override as ours does ("--sae.transcode",
"--sae.activation=batchtopk"), and which the peer's trainer is given."""

REPORT_KEYS = ("fvu", "delta_ce", "kl", "never_fired_frac", "never_fired_tokens", "dense_frac", "l0", "ce_clean")
"""The keys of each checkpoint's eval report that its row of the benchmark carries."""


@dataclass(frozen=True)
class PeersConfig:
    """Options of `python -m eval.peers`."""

    train_config: str = "configs/default.yaml"
    """Our run's config: model, text, SAE width, batch size, shuffle buffer, seed, and our defaults."""

    hookpoints: tuple[str, ...] = ()
    """Hookpoints to benchmark; empty: the config's."""

    ks: tuple[int, ...] = ()
    """k values to benchmark; empty: the config's."""

    systems: tuple[str, ...] = ("ours", "sparsify", "saelens")
    """"ours", "ours --key=value ..." (ours with config overrides), "sparsify", "saelens" (with an optional
    "--lr_factor=F": the peer's default learning rate times F, and the kind's overrides "--sae.transcode",
    "--sae.skip_connection" (sparsify), "--sae.activation=batchtopk", "--sae.matryoshka=[128,512]"
    (saelens, Matryoshka with batchtopk only)); quote a system with brackets: '["saelens ..."]'."""

    tokens: int = 2_000_000
    """Training tokens per run (rounded down to whole batches)."""

    checkpoint_tokens: int = 500_000
    """Tokens between the SAE folders written and scored (rounded down to whole batches)."""

    eval_tokens: int = 131072
    """Held-out tokens to score on (fewer if the held-out text is shorter)."""

    dead_window_tokens: int = 1_000_000
    """Rows of the activation cache (training text) a latent must fire on none of to count as dead in the
    "dead (N train tokens)" column (eval/peers/dead.py); 0 leaves the column out."""

    split: str = "test"
    """Held-out split the table reports (the embedded corpus and local files: validation or test; settings are
    chosen on validation, so the final numbers are read on test)."""

    peer_lr_factors: tuple[float, ...] = ()
    """Also train each peer at these multiples of its default learning rate and mark the one with the lowest
    final validation fvu "(tuned)"; empty: peers at their defaults only."""

    seeds: tuple[int, ...] = ()
    """Train every run once per seed (the seed of the data order and of each system's init); empty: the train
    config's seed only. With two or more, the report gives each metric's mean and 95% interval and says
    which differences exceed seed noise."""

    finetune_tokens: int = 0
    """Also fine-tune the final SAE of each of our systems end to end for this many LM tokens (`python -m
    sae.finetune`'s defaults, docs/finetune.md) and score it as the system "SYSTEM +finetune", whose tokens
    count both phases; 0: none."""

    out: str = "runs/peers"
    """Folder of the cache, the runs and the report."""


def system_label(system: str) -> str:
    """A folder name for a system spec: "ours --grad_clip=0" -> "ours_grad_clip=0"."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", system.replace("--", "")).strip("_")


def is_ours(system: str) -> bool:
    return system.split()[0] == "ours"


def system_overrides(system: str) -> tuple[list[str], float]:
    """(config overrides, learning-rate factor) of a system spec: "ours --lr=0.01" -> (["--lr=0.01"], 1.0);
    "sparsify --sae.transcode --lr_factor=4" -> (["--sae.transcode"], 4.0): a peer takes only the KIND_KEYS
    and one --lr_factor=F."""
    name, *overrides = system.split()
    if name == "ours":
        return overrides, 1.0
    if name not in PEERS:
        raise ConfigError(f"unknown system '{name}'; systems are 'ours' (with optional --key=value overrides), "
                          f"{', '.join(PEERS)} (with optional --lr_factor=F)")
    kind_options = [f"--sae.{key}" for key in KIND_KEYS]
    kinds = [override for override in overrides if override.partition("=")[0] in kind_options]
    factors = [override.removeprefix("--lr_factor=") for override in overrides if override.startswith("--lr_factor=")]
    try:
        factor = float(factors[0]) if factors else 1.0
    except ValueError:
        factor = float("nan")
    if len(factors) > 1 or not factor > 0 or len(kinds) + len(factors) != len(overrides):
        raise ConfigError(f"system '{system}': a peer takes one --lr_factor=F with F > 0 and the kind's "
                          f"{', '.join(kind_options)}; only 'ours' takes other config overrides")
    return kinds, factor


def peer_lr_factor(system: str) -> float:
    """The learning-rate factor of a peer's system spec: "sparsify --lr_factor=4" -> 4.0, "sparsify" -> 1.0."""
    return system_overrides(system)[1]


def run_config(train_config: str, system: str, hookpoint: str, k: int, tokens: int, cache: Path,
               seed: int | None = None) -> TrainConfig:
    """Our config for one run of the benchmark: the file's, the system's config overrides (a peer's: the kind
    of sparse coder), this hookpoint and k, and `seed` (None: the file's)."""
    overrides, _ = system_overrides(system)
    cfg = parse_args(["--config", train_config, *overrides], TrainConfig)
    return replace(cfg, hookpoint=hookpoint, sae=replace(cfg.sae, k=k), max_tokens=tokens, eval_every=0,
                   seed=cfg.seed if seed is None else seed,
                   wandb_mode="disabled", resume=False, data=replace(cfg.data, activation_cache=str(cache)))


def checkpoint_steps(tokens: int, checkpoint_tokens: int, batch_size: int) -> list[int]:
    """Steps after which a run of `tokens` writes an SAE folder: every checkpoint_tokens, and the last step."""
    steps, every = tokens // batch_size, checkpoint_tokens // batch_size
    if every < 1 or steps < every:
        raise ConfigError(f"--tokens {tokens:,} and --checkpoint_tokens {checkpoint_tokens:,} must each hold at least "
                          f"one batch of {batch_size:,}, and checkpoints no more than the run")
    return sorted({*range(every, steps + 1, every), steps})


def train_system(cfg: PeersConfig, system: str, hookpoint: str, k: int, seed: int, cache: Path, out_dir: Path) -> dict:
    """Train one system once at `seed` (or reuse OUT's earlier run of it):
    {"folders": {tokens trained: folder}, "wall_s", "cpu_s"} (the time of the whole run)."""
    # a peer takes from our config only what defines the task: data order, width, kind, batch size, seed
    train_cfg = run_config(cfg.train_config, system, hookpoint, k, cfg.tokens, cache, seed)
    steps = checkpoint_steps(cfg.tokens, cfg.checkpoint_tokens, train_cfg.batch_size)
    # The run is reused only if it was trained with this very config, its learning rate resolved (a changed
    # default retrains it). Changes to the code itself are not seen: benchmark those into a new --out.
    if is_ours(system):
        identity = {"system": system, "config": training_config(to_dict(train_cfg)),
                    "lr": run_lr(train_cfg.lr, train_cfg.sae, train_cfg), "checkpoint_steps": steps}
    else:
        identity = {"system": system, "task": peer_task(train_cfg), "checkpoint_steps": steps,
                    "lr_factor": peer_lr_factor(system)}
    record = out_dir / "run.json"
    if record.exists() and same_run(json.loads(record.read_text()).get("identity"), identity):
        return json.loads(record.read_text())
    if out_dir.exists():  # the benchmark's own folder of an older run of this system
        print(f"{out_dir}: trained with another config; training it again")
        shutil.rmtree(out_dir)
    activations = ActivationCache(cache)
    metadata = {**train_cfg.provenance(hookpoint), "run_name": system,
                "text_read": text_read_record([CachedWindows(activations).text_read()], train_cfg.data)}
    wall, cpu = time.perf_counter(), time.process_time()
    if is_ours(system):
        folders = train_ours(train_cfg, steps, out_dir, metadata)
    else:
        batches = shared_batches(cache, hookpoint, train_cfg)
        trainer = _peer_trainer(system, train_cfg.sae)
        folders = trainer(batches, steps[-1], train_cfg.batch_size, activations.d_in_of[hookpoint],
                          train_cfg.sae.n_latents, k, steps, out_dir, metadata, seed=train_cfg.seed,
                          lr_factor=peer_lr_factor(system))
    result = {"folders": {str(step * train_cfg.batch_size): str(folder) for step, folder in sorted(folders.items())},
              "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "identity": identity}
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result


NOT_TRAINING_KEYS = ("finetune_tokens",)
"""Config keys of ours that do not change what its training run writes (the benchmark fine-tunes with its
own --finetune_tokens): a run recorded before or after such a key existed is the same run."""


def training_config(config: dict) -> dict:
    """A config dict (`to_dict`) without NOT_TRAINING_KEYS."""
    return {key: value for key, value in config.items() if key not in NOT_TRAINING_KEYS}


def same_run(recorded: dict | None, identity: dict) -> bool:
    """Whether a run.json's recorded identity is `identity`, ours' configs compared without NOT_TRAINING_KEYS."""
    if recorded is None:
        return False
    if "config" in recorded:
        recorded = {**recorded, "config": training_config(recorded["config"])}
    return recorded == identity


def peer_task(train_cfg: TrainConfig) -> dict:
    """What a peer's run depends on in our config: the rows (cache, hookpoint, order, token hygiene) and the
    SAE's shape and kind (the KIND_KEYS off their defaults, so that a plain SAE's record is what it was before
    there were kinds, and a transcoder's what it was before BatchTopK)."""
    return {"hookpoint": train_cfg.hookpoint, "k": train_cfg.sae.k, "n_latents": train_cfg.sae.n_latents,
            "batch_size": train_cfg.batch_size, "seed": train_cfg.seed, "cache": train_cfg.data.activation_cache,
            "shuffle_buffer_tokens": train_cfg.data.shuffle_buffer_tokens,
            "exclude_special_tokens": train_cfg.data.exclude_special_tokens,
            "outlier_norm_ratio": train_cfg.data.outlier_norm_ratio, **sae_kind(train_cfg.sae)}


def sae_kind(sae: SaeConfig) -> dict[str, bool | str | list[int]]:
    """The KIND_KEYS of `sae` off their SaeConfig defaults, as JSON gives them back (tuples as lists, so
    that a run record read back compares equal): {} for a plain TopK SAE, otherwise e.g.
    {"transcode": True} or {"activation": "batchtopk", "matryoshka": [128, 512]}."""
    defaults = {field.name: field.default for field in fields(SaeConfig)}
    return {key: list(value) if isinstance(value, tuple) else value
            for key in KIND_KEYS if (value := getattr(sae, key)) != defaults[key]}


def kind_text(key: str, value: bool | str | list[int]) -> str:
    """One kind setting as a message names it: "transcode", "activation=batchtopk", "matryoshka=[128,512]"."""
    if value is True:
        return key
    return f"{key}={value}" if isinstance(value, str) else f"{key}=[{','.join(map(str, value))}]"


def _peer_trainer(system: str, sae: SaeConfig) -> Callable[..., dict[int, Path]]:
    """The peer's trainer, given the kind of sparse coder to train (`sae_kind`); one line when the peer
    does not train that kind."""
    name, kind = system.split()[0], sae_kind(sae)
    if unsupported := [kind_text(key, value) for key, value in kind.items() if key not in PEERS[name]]:
        raise ConfigError(f"system '{system}': {name}'s trainer has no {', '.join(unsupported)} (the run config's "
                          f"sae or the system's overrides ask for it); benchmark {name} on plain SAEs "
                          f"or with {', '.join(PEERS[name])}")
    for key in kind:
        if (need := PEER_KIND_NEEDS.get((name, key))) and kind.get(need[0]) != need[1]:
            raise ConfigError(f"system '{system}': {name}'s trainer trains {kind_text(key, kind[key])} only with "
                              f"{kind_text(*need)}; add --sae.{need[0]}={need[1]}")
    if name == "sparsify":
        from .sparsify_trainer import train_sparsify as trainer
    else:
        from .saelens import train_saelens as trainer
    return partial(trainer, **sae_kind(sae))


def markdown_table(rows: list[dict]) -> str:
    """The report's table; "never fired (N held-out tokens)" counts latents silent on all N held-out
    tokens, "dead (N train tokens)" those silent on N rows of the training text's activations (present
    when the rows carry it); "(tuned)" marks the peer learning rate chosen on validation; a seed column
    when the rows have several. Every row is scored on the same held-out tokens."""
    held_out_tokens = rows[0]["never_fired_tokens"] if rows else 0
    window = rows[0].get("dead_window_tokens") if rows else None
    window_column = f" dead ({window:,} train tokens) |" if window else ""
    seeded = len({row.get("seed", 0) for row in rows}) > 1
    header = (f"| hookpoint | k | system |{' seed |' if seeded else ''} tokens | held-out fvu | delta CE | KL | never "
              f"fired ({held_out_tokens:,} held-out tokens) |{window_column} L0 | train wall s | train CPU s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        times = (f"{row['wall_s']:.0f} | {row['cpu_s']:.0f}" if row["final"] else " | ")
        window_cell = f" {row['dead_window']:.3f} |" if window else ""
        system = row["system"] + (" (tuned)" if row.get("tuned") else "") + (f" | {row['seed']}" if seeded else "")
        lines.append(f"| {row['hookpoint']} | {row['k']} | {system} | {row['tokens']:,} | {row['fvu']:.4f} | "
                     f"{row['delta_ce']:.4f} | {row['kl']:.4f} | {row['never_fired_frac']:.3f} |{window_cell} "
                     f"{row['l0']:.1f} | {times} |")
    return "\n".join(lines)


def benchmark(cfg: PeersConfig) -> list[dict]:
    base = parse_args(["--config", cfg.train_config], TrainConfig)
    hookpoints = list(cfg.hookpoints or [base.hookpoint])
    ks = list(cfg.ks or [base.sae.k])
    seeds = list(dict.fromkeys(cfg.seeds or [base.seed]))
    checkpoint_steps(cfg.tokens, cfg.checkpoint_tokens, base.batch_size)  # bad numbers fail before any work
    if cfg.finetune_tokens < 0:
        raise ConfigError(f"--finetune_tokens must be >= 0 (0: no fine-tune), got {cfg.finetune_tokens}")
    if cfg.dead_window_tokens < 0:
        raise ConfigError(f"--dead_window_tokens must be >= 0 (0 leaves the column out), got {cfg.dead_window_tokens}")
    if any(not factor > 0 for factor in cfg.peer_lr_factors):
        raise ConfigError(f"--peer_lr_factors must all be > 0, got {list(cfg.peer_lr_factors)}")
    systems = with_lr_variants(cfg.systems, cfg.peer_lr_factors)
    sites = []  # the activation sites the runs read: a transcoder's input and output, an SAE's hookpoint
    for system in systems:  # a bad system spec fails before any work
        for hookpoint in hookpoints:
            run_cfg = run_config(cfg.train_config, system, hookpoint, ks[0], cfg.tokens, Path(cfg.out))
            sites += run_cfg.hookpoints
            if not is_ours(system):
                _peer_trainer(system, run_cfg.sae)
    sites = list(dict.fromkeys(sites))
    out = Path(cfg.out)
    cache = out / "cache"
    cached = read_manifest(cache)["hookpoints"] if (cache / MANIFEST).exists() else []
    # an earlier call's cache that holds these sites (and maybe more) serves as it is
    cache_hookpoints = cached if set(sites) <= set(cached) else sites
    build_cache(replace(base, max_tokens=cfg.tokens, hookpoint=hookpoints[0]), cache, hookpoints=cache_hookpoints)

    runs = []
    for seed in seeds:
        for hookpoint in hookpoints:
            for k in ks:
                for system in systems:
                    print(f"== {hookpoint} k={k} {system}" + (f" seed {seed}" if len(seeds) > 1 else ""))
                    # the config's own seed keeps the folder it had before there were seeds, so it is reused
                    label = system_label(system) + ("" if seed == base.seed else f"-seed{seed}")
                    result = train_system(cfg, system, hookpoint, k, seed, cache, out / hookpoint / f"k{k}" / label)
                    runs.append({"hookpoint": hookpoint, "k": k, "system": system, "seed": seed, **result})
    if cfg.finetune_tokens:
        for run in [run for run in runs if is_ours(run["system"])]:
            print(f"== {run['hookpoint']} k={run['k']} {run['system']} +finetune")
            result = finetune_final(run, cfg.finetune_tokens, run["seed"], base.data.data_dir)
            runs.append({**run, "system": f"{run['system']} +finetune", **result})
    folders = [folder for run in runs for folder in run["folders"].values()]
    activations = ActivationCache(cache)
    scored = EvalConfig(tokens=cfg.eval_tokens, data_dir=base.data.data_dir, split=cfg.split)
    reports = {report["sae"]: report for report in run_eval(scored, folders)}
    tuned = tuned_peers(runs, replace(scored, split="validation")) if cfg.peer_lr_factors else set()
    rows = []
    for run in runs:
        last = max(run["folders"], key=int)
        for tokens, folder in run["folders"].items():
            report = reports[folder]
            rows.append({"hookpoint": run["hookpoint"], "k": run["k"], "system": run["system"], "seed": run["seed"],
                         "tokens": int(tokens), "split": cfg.split,
                         "tuned": (run["hookpoint"], run["k"], run["system"]) in tuned,
                         "final": tokens == last, "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "sae": folder,
                         "held_out": report["data"]["held_out"],
                         **{key: report[key] for key in REPORT_KEYS}})
            if cfg.dead_window_tokens > 0:
                rows[-1]["dead_window"], rows[-1]["dead_window_tokens"] = window_dead_fraction(
                    folder, activations, run["hookpoint"], cfg.dead_window_tokens)
    table = markdown_table(rows)
    if len(seeds) > 1:
        summary = summarize([row for row in rows if row["final"]], SEED_KEYS, SEED_METRICS)
        statements = seed_comparisons(summary)
        table += "\n\n" + seed_table(summary) + "\n\n" + "\n".join(f"- {line}" for line in statements)
        (out / "seeds.json").write_text(report_json({"summary": [json_ready(entry) for entry in summary],
                                                     "comparisons": statements}, indent=1) + "\n")
    (out / "report.json").write_text(report_json(rows, indent=1) + "\n")
    (out / "report.md").write_text(table + "\n")
    for path in write_fronts(rows, out):
        print(f"wrote {path}")
    print(table)
    print(f"held-out text: {rows[0]['held_out']}; ce_clean={rows[0]['ce_clean']:.4f}")
    return rows


def with_lr_variants(systems: tuple[str, ...], factors: tuple[float, ...]) -> list[str]:
    """The systems, each peer without a --lr_factor followed by its variants at `factors` times its default
    learning rate."""
    expanded = []
    for system in systems:
        expanded.append(system)
        if not is_ours(system) and "--lr_factor=" not in system:
            expanded += [f"{system} --lr_factor={factor:g}" for factor in factors if factor != 1]
    return list(dict.fromkeys(expanded))


def tuned_peers(runs: list[dict], validation: EvalConfig) -> set[tuple[str, int, str]]:
    """(hookpoint, k, system) of each peer's learning-rate variant whose final SAEs have the lowest fvu on
    the validation split (the mean over the seeds), among that peer's variants (its `lr_family`) at that
    hookpoint and k."""
    finals = {run["folders"][max(run["folders"], key=int)]: run for run in runs if not is_ours(run["system"])}
    fvu = {report["sae"]: report["fvu"] for report in run_eval(validation, list(finals))}
    by_system: dict[tuple[str, int, str], list[float]] = {}
    for folder, run in finals.items():
        by_system.setdefault((run["hookpoint"], run["k"], run["system"]), []).append(fvu[folder])
    best: dict[tuple, tuple[float, str]] = {}
    for (hookpoint, k, system), values in by_system.items():
        key = (hookpoint, k, lr_family(system))
        best[key] = min(best.get(key, (float("inf"), "")), (sum(values) / len(values), system))
    return {(hookpoint, k, system) for (hookpoint, k, _), (_, system) in best.items()}


SEED_KEYS = ("hookpoint", "k", "system", "tuned")
SEED_METRICS = ("fvu", "delta_ce", "kl", "never_fired_frac", "dead_window", "dense_frac", "l0")
"""What the seeds summary groups the final rows by, and the metrics it gives means and intervals of."""

COMPARED_METRICS = ("fvu", "delta_ce")


def seed_table(summary: list[dict]) -> str:
    """Markdown: per hookpoint, k and system, each metric's mean ± the half-width of its 95% interval."""
    metrics = [metric for metric in SEED_METRICS if any(metric in entry for entry in summary)]
    leading = [[entry["hookpoint"], str(entry["k"]), entry["system"] + (" (tuned)" if entry["tuned"] else "")]
               for entry in summary]
    return interval_table(["hookpoint", "k", "system"], leading, summary, metrics)


def seed_comparisons(summary: list[dict]) -> list[str]:
    """At each hookpoint and k, each of our systems against every peer (at its tuned lr when it was tuned)
    and the first of ours against our others, on COMPARED_METRICS: a difference is stated only where the 95%
    intervals separate."""
    statements = []
    for (hookpoint, k) in dict.fromkeys((entry["hookpoint"], entry["k"]) for entry in summary):
        entries = [entry for entry in summary if (entry["hookpoint"], entry["k"]) == (hookpoint, k)]
        ours = [entry for entry in entries if is_ours(entry["system"])]
        tuned = {lr_family(entry["system"]) for entry in entries if entry["tuned"]}
        peers = [entry for entry in entries if not is_ours(entry["system"])
                 and (entry["tuned"] or lr_family(entry["system"]) not in tuned)]
        pairs = [(a, b) for a in ours for b in peers]
        pairs += [(ours[0], b) for b in ours[1:]]
        statements += [f"{hookpoint} k={k}: " + comparison(a, b, metric) for a, b in pairs for metric in COMPARED_METRICS]
    return statements


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    return benchmark(parse_args(argv, PeersConfig, usage=__doc__))


if __name__ == "__main__":
    run_cli(main)
