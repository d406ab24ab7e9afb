"""`python -m eval SAE_DIR [SAE_DIR ...] [--options]`: evaluate saved SAEs and print a comparison table.

    python -m eval runs/default/transformer.h.2 --out report.json
    python -m eval runs/k16/transformer.h.2 runs/k32/transformer.h.2 --tokens 262144
    python -m eval runs/transcoders --replace_all      # every transcoder of the run spliced in at once

Model, hookpoint, dataset and ctx_len come from each SAE's cfg.json unless given. SAEs on the same
model and data share the eval tokens (and one LM forward per batch per hookpoint), so their numbers
compare directly. A transcoder (cfg.json "transcode": true; kind "transcoder" or "skip transcoder" in the
tables) at module M is spliced as its prediction of M's output from M's input, and its latent sections
(--explain, --n2g, --probe, --sparse_probe, --ablation) read its codes of M's input.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from torch import Tensor

from sae.activations import check_context_length, load_model_and_tokenizer
from sae.config import DataConfig, check_outlier_norm_ratio, parse_args
from sae.folder import is_sae_folder, read_any_sae_metadata
from sae.hub import is_hub_path, resolve_sae_path
from sae.hygiene import excluded_ids
from sae.model import SparseAutoencoder
from sae.distributed import resolve_device
from sae.errors import UsageError, run_cli
from sae.files import check_writable_folder

from .data import check_recorded_model, held_out_split, held_out_windows, resolve_model_path
from .evaluate import evaluate_many
from .explain.options import ScoringOptions
from .report import (INTERPRETABILITY_KEYS, check_report_path, comparison_table, interpretability_table, kind_keys,
                     log_to_wandb, replacement_table, save_report)


@dataclass(frozen=True)
class EvalConfig(ScoringOptions):
    """Options of `python -m eval`. Empty strings / 0 mean "as in the SAE's cfg.json". The explain
    scoring options (simulators, servers) are `ScoringOptions`, shared with `python -m eval.explain`."""

    model: str = ""
    """LM (hub name or local folder)."""

    hookpoint: str = ""
    """Module whose output the SAE reconstructs (a transcoder: predicts from the module's input)."""

    dataset: str = ""
    """Text to evaluate on: the embedded corpus name, a local file/folder/glob or a hub dataset."""

    dataset_config: str | None = None
    """The hub dataset's configuration name."""

    split: str = ""
    """Held-out split; empty picks one (eval/data.py says how, and the report says which)."""

    text_column: str = ""
    """Column holding the text."""

    ctx_len: int = 0
    """Tokens per window."""

    data_dir: str = "data"
    """Where the embedded corpus is written."""

    exclude_special_tokens: bool | None = None
    """Leave BOS/EOS/pad positions out (sae/hygiene.py). Unset: as the SAE was trained (cfg.json; an SAE
    whose cfg.json does not say was trained on every token)."""

    outlier_norm_ratio: float | None = None
    """Leave out positions whose activation norm exceeds this many times the eval text's median (0: none).
    Unset: as the SAE was trained (cfg.json)."""

    tokens: int = 131072
    """Eval tokens (fewer if the held-out text is shorter)."""

    batch: int = 16
    """Windows per LM forward (each forward carries 3 + n_saes variants of them past the hookpoint)."""

    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda" or "cuda:N"."""

    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the LM's forward pass."""

    out: str = ""
    """Write the report here (JSON: one object, or a list for several SAEs)."""

    wandb: bool = False
    """Write each report into its training run's wandb summary (or a new eval run)."""

    wandb_project: str = ""
    """Project for SAEs trained without wandb (default: the training run's, else topk-sae)."""

    wandb_mode: str = ""
    """wandb mode (online, offline); empty leaves it to wandb (WANDB_MODE)."""

    explain: int = 0
    """Explain and score this many latents (random among those alive), and as many MLP neurons of the
    hookpoint's block as a baseline (eval/explain/)."""

    explain_latents: str = ""
    """Comma-separated latent ids to explain instead of random ones."""

    explain_neurons: bool = True
    """Also explain MLP neurons (the baseline); --explain_neurons false turns it off."""

    neuron_module: str = ""
    """Module whose OUTPUT channels are the neurons (e.g. transformer.h.2.mlp.act). Default: the INPUT of the
    output projection of the hookpoint's block's MLP (GPT-2 mlp.c_proj, GPT-NeoX mlp.dense_4h_to_h, Llama and
    other gated MLPs mlp.down_proj, Phi mlp.fc2): the neurons in every family; where none is found, the
    baseline is skipped with a note."""

    explain_out: str = ""
    """JSONL of per-unit explanations, scores and excerpts (default: SAE_DIR/explain.jsonl)."""

    explainer_url: str = ""
    """OpenAI-compatible server (e.g. http://host:8000/v1) that writes explanations (chat completions)."""

    explainer_model: str = ""
    """Model for explanations: the server's model name with --explainer_url, else a local transformers model."""

    ablation: int = 0
    """Ablation sparsity (Gao et al. §4.5) of this many random live latents: how many logits a latent's
    ablation moves (eval/ablation.py)."""

    ablation_per_latent: int = 4
    """Firing positions ablated per latent (its value is their mean)."""

    ablation_horizon: int = 16
    """Logit positions counted after each ablated one, itself included (Gao et al.'s T = 16)."""

    probe: bool = False
    """Probe loss (Gao et al. §4.2): the best 1-D logistic probe over latents for binary tasks labelled
    from the text itself, against the label prior and the same probe on the hookpoint's neurons (eval/probe.py)."""

    sparse_probe: bool = False
    """k-sparse probing (Gurnee et al. 2023; Kantamneni et al. 2025; SAEBench): per probe task, a logistic
    probe on the k latents whose mean differs most between positive and negative tokens, ranked and
    fitted on one half of the windows, its accuracy and AUC on the other; the same on the hookpoint's
    neurons (eval/sparse_probe.py). A random-model SAE is another folder of the same call."""

    sparse_probe_ks: tuple[int, ...] = (1, 2, 5, 16)
    """How many latents (and neurons) the sparse probes read, e.g. "[1,2,5,16]"."""

    absorption: bool = False
    """Feature absorption (Chanin et al. 2024, first-letter task): per letter, a logistic probe on the
    hookpoint's activations for "the token starts with L" and the SAE's main latents for it (k-sparse probing);
    on the probe's true positives of the test half, how often the main latents stay silent while other
    latents carry the probe direction (SAEBench's absorption fraction and full-absorption rate; eval/absorption.py)."""

    probe_tasks: str = ""
    """A jsonl of extra probe tasks (for --probe and --sparse_probe), one {"task", "text", "labels":
    per-token 0/1} per line."""

    probe_tokens: int = 0
    """Score the probes (--probe, --sparse_probe, --absorption) on the first this many eval positions (0: all of them);
    the dense neuron reference of --probe costs tokens x d_in per Newton pass, the part to cap on a CPU."""

    n2g: int = 0
    """N2G explanations (Foote et al. 2023; Gao et al. §4.4) of this many random live latents, scored by
    the precision and recall of their predicted firing on held-out excerpts (eval/explain/n2g.py)."""

    seed: int = 0
    """Seeds the choice of latents and neurons and the random excerpts."""

    replace_all: bool = False
    """Evaluate the folders as one replacement model (eval/replacement.py): transcoders on one LM, one per module
    (a run folder stands for the SAE folders in it: `python -m eval runs/transcoders --replace_all`), each
    replacing its module's output by its prediction from that module's input, all in the same forward (a later
    layer's transcoder reads what the earlier replacements made). Reports the set's delta_ce and kl against the
    clean LM and each transcoder's fvu inside it and alone. The latent sections and --wandb are per folder:
    run them without --replace_all."""

    def __post_init__(self):
        per_folder = [f"--{name}" for name in ("explain", "n2g", "probe", "sparse_probe", "absorption", "ablation",
                                               "wandb") if getattr(self, name)]
        if self.replace_all and per_folder:
            raise ValueError(f"--replace_all evaluates the folders as one replacement model; the per-folder options "
                             f"{', '.join(per_folder)} run without it")
        for name in ("explain", "ablation", "n2g", "probe_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_tasks and not (self.probe or self.sparse_probe):
            raise ValueError("EvalConfig.probe_tasks names extra probe tasks: add --probe or --sparse_probe to run "
                             "the probes")
        if self.sparse_probe:
            from .sparse_probe import check_ks

            check_ks(self.sparse_probe_ks)
        for name in ("ablation_per_latent", "ablation_horizon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")
        if self.outlier_norm_ratio is not None:
            check_outlier_norm_ratio(self.outlier_norm_ratio, "EvalConfig.outlier_norm_ratio")
        for name in ("tokens", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")


def _require(value, metadata: dict, key: str, sae_dir: Path, option: str):
    if value:
        return value
    if metadata.get(key) is None:
        where = sae_dir / "cfg.json" if (sae_dir / "cfg.json").is_file() else sae_dir
        raise UsageError(f"{where} does not say its '{key}'; pass {option}")
    return metadata[key]


@dataclass
class EvalJob:
    """One SAE folder to evaluate: the options, else what its cfg.json says (`resolve_job`)."""

    dir: Path
    model: str
    model_init: tuple[str, int]
    """("pretrained", 0), or ("random", seed): a random-init LM (train.py --model_init random), rebuilt
    from its seed, is another LM than its pretrained twin."""
    model_init_versions: dict | None
    """The torch and transformers versions that drew a random-init LM."""
    data: DataConfig
    hookpoint: str
    split: str
    """The held-out split; "" lets eval/data.py pick one."""
    training_dataset: bool
    """Whether `data` is the dataset the SAE was trained on."""
    text_read: dict | None
    """What training read, for held-out rule 4 (eval/data.py)."""


def run_eval(cfg: EvalConfig, sae_dirs: list[str]) -> list[dict]:
    """Evaluate every SAE folder; reports in the order given. SAEs on the same LM share its load, on
    the same text its held-out windows, and at the same hookpoint each LM forward."""
    check_sae_dirs(cfg, sae_dirs)
    device = resolve_device(cfg.device)
    jobs = [resolve_job(cfg, sae_dir) for sae_dir in map(Path, sae_dirs)]
    if cfg.explain:  # explain.jsonl is written after the eval pass: a folder it cannot go into fails now
        for folder in dict.fromkeys(Path(cfg.explain_out).parent if cfg.explain_out else job.dir for job in jobs):
            check_writable_folder(folder, "the folder of explain.jsonl", "pass --explain_out PATH somewhere writable")
    explain_tools = _explain_tools(cfg, device) if cfg.explain else None  # once, after the folders check out
    reports: dict[Path, dict] = {}
    for model_jobs in _grouped(jobs, lambda job: (job.model, job.model_init)):
        reports.update(evaluate_on_one_lm(cfg, model_jobs, device, explain_tools))
    return [reports[job.dir] for job in jobs]


def run_replacement(cfg: EvalConfig, sae_dirs: list[str]) -> dict:
    """The report of the replacement model (`--replace_all`) of the transcoders in `sae_dirs`."""
    from .replacement import check_replacement_set, replacement_model

    folders = [str(folder) for folder in expand_run_folders(sae_dirs)]
    check_sae_dirs(cfg, folders)
    device = resolve_device(cfg.device)
    jobs = [resolve_job(cfg, Path(folder)) for folder in folders]
    members = {str(job.dir): (SparseAutoencoder.load(job.dir, device=device), job.hookpoint) for job in jobs}
    check_replacement_set(members)
    check_one_lm_and_text(jobs)  # all before the LM is loaded
    for note in _model_init_notes(jobs):
        print(note)
    model, tokenizer = load_model_and_tokenizer(jobs[0].model, cfg.model_dtype, device, *jobs[0].model_init)
    windows, source = read_held_out_windows(cfg, model, tokenizer, jobs)
    report = replacement_model(members, model, windows, batch_windows=cfg.batch, progress=True)
    return {"replacement_model": folders, "model": jobs[0].model, "model_init": _model_init_text(*jobs[0].model_init),
            "data": source, **report}


def expand_run_folders(sae_dirs: list[str]) -> list[Path]:
    """The folders, each run folder (not an SAE folder itself, SAE folders in it) as its SAE folders by name."""
    folders = []
    for folder in map(Path, sae_dirs):
        inside = sorted(child for child in folder.iterdir() if is_sae_folder(child)) \
            if folder.is_dir() and not is_sae_folder(folder) else []
        folders += inside or [folder]
    return folders


def check_one_lm_and_text(jobs: list[EvalJob]) -> None:
    """One line when the replacement model's folders are not on one LM, or not evaluated on one text."""
    first = jobs[0]
    for job in jobs[1:]:
        if (job.model, job.model_init) != (first.model, first.model_init):
            raise UsageError(f"--replace_all splices every transcoder into one LM, but {first.dir} is on {first.model} "
                             f"({_model_init_text(*first.model_init)}) and {job.dir} on {job.model} "
                             f"({_model_init_text(*job.model_init)})")
        if (job.data, job.split, job.training_dataset) != (first.data, first.split, first.training_dataset):
            raise UsageError(f"--replace_all evaluates on one text, but {first.dir} and {job.dir} name different text "
                             f"({first.data.dataset}, ctx_len {first.data.ctx_len} vs {job.data.dataset}, ctx_len "
                             f"{job.data.ctx_len}); pass --dataset and --ctx_len to name one")


def check_sae_dirs(cfg: EvalConfig, sae_dirs: list[str]) -> None:
    if cfg.explain_out and len(sae_dirs) > 1:
        raise UsageError("--explain_out names one file; with several SAEs each writes SAE_DIR/explain.jsonl")
    if len(set(map(str, sae_dirs))) != len(sae_dirs):
        raise UsageError(f"an SAE folder is given twice: {sae_dirs}")


def resolve_job(cfg: EvalConfig, sae_dir: Path) -> EvalJob:
    """What to evaluate the SAE in `sae_dir` with: each option given, else what its cfg.json says; one
    line (UsageError) naming the option to pass when neither says a thing the eval needs."""
    metadata = read_any_sae_metadata(sae_dir)
    dataset = _require(cfg.dataset, metadata, "dataset", sae_dir, "--dataset")
    if cfg.dataset and not cfg.split and metadata.get("dataset") is None:
        # What training read is unknown (e.g. a folder written by sparsify): only a split the user
        # names, or a held-out split the dataset has, may be called held out.
        asked = DataConfig(dataset=dataset, dataset_config=cfg.dataset_config, text_column=cfg.text_column or "text",
                           data_dir=cfg.data_dir)
        if held_out_split(asked) is None:
            raise UsageError(f"{sae_dir / 'cfg.json'} does not say which text the SAE was trained on; {dataset} "
                             "has no validation or test split, so pass --split with text training did not read")
    other_dataset = bool(cfg.dataset) and metadata.get("dataset") is not None and cfg.dataset != metadata.get("dataset")
    data = DataConfig(
        dataset=dataset,
        dataset_config=cfg.dataset_config if cfg.dataset else metadata.get("dataset_config"),
        split=metadata.get("split") or "train",
        text_column=cfg.text_column or metadata.get("text_column") or "text",
        ctx_len=_require(cfg.ctx_len, metadata, "ctx_len", sae_dir, "--ctx_len"),
        data_dir=cfg.data_dir,
        **recorded_hygiene(cfg, metadata),
    )
    model = resolve_model_path(_require(cfg.model, metadata, "model", sae_dir, "--model"))
    if not cfg.model:
        check_recorded_model(model, sae_dir / "cfg.json")
    return EvalJob(
        dir=sae_dir, model=model,
        model_init=(metadata.get("model_init") or "pretrained", int(metadata.get("model_init_seed") or 0)),
        model_init_versions=metadata.get("model_init_versions"),
        data=data, hookpoint=_require(cfg.hookpoint, metadata, "hookpoint", sae_dir, "--hookpoint"),
        # a dataset other than training's is held out as a whole: its train split unless told
        split=cfg.split or ("train" if other_dataset else ""),
        training_dataset=metadata.get("dataset") is not None and not other_dataset,
        text_read=metadata.get("text_read"),
    )


def recorded_hygiene(cfg: EvalConfig, metadata: dict) -> dict[str, Any]:
    """The token hygiene of an SAE's eval: each option given, else what its cfg.json records, else (a folder
    from before the record, or another library's) every token kept."""
    exclude = cfg.exclude_special_tokens
    ratio = cfg.outlier_norm_ratio
    return {"exclude_special_tokens": bool(metadata.get("exclude_special_tokens", False)) if exclude is None else exclude,
            "outlier_norm_ratio": float(metadata.get("outlier_norm_ratio") or 0.0) if ratio is None else ratio}


def evaluate_on_one_lm(cfg: EvalConfig, jobs: list[EvalJob], device, explain_tools) -> dict[Path, dict]:
    """The reports of `jobs`, SAEs on one LM (loaded here, once), by their folders."""
    model_name, (init, init_seed) = jobs[0].model, jobs[0].model_init
    for note in _model_init_notes(jobs):
        print(note)
    model, tokenizer = load_model_and_tokenizer(model_name, cfg.model_dtype, device, init, init_seed)
    if cfg.explain and cfg.explain_neurons:
        check_neuron_sites(cfg, model, [job.hookpoint for job in jobs])
    reports = {}
    for data_jobs in _grouped(jobs, lambda job: (job.data, job.split, job.training_dataset)):
        windows, source = read_held_out_windows(cfg, model, tokenizer, data_jobs)
        for hook_jobs in _grouped(data_jobs, lambda job: job.hookpoint):
            reports.update(evaluate_at_hookpoint(cfg, hook_jobs, model, tokenizer, windows, source, device,
                                                 explain_tools))
    return reports


def check_neuron_sites(cfg: EvalConfig, model, hookpoints: list[str]) -> None:
    """Before the eval pass: a --neuron_module that is not a module of `model` fails in one line; a
    hookpoint whose block has no MLP neurons gets a note on stderr (its report's notes say it too)."""
    from .explain.records import find_mlp_neurons, named_neuron_site, no_neurons_note

    if cfg.neuron_module:
        named_neuron_site(model, cfg.neuron_module)
        return
    for hookpoint in dict.fromkeys(hookpoints):
        if find_mlp_neurons(model, hookpoint) is None:
            print(f"note: {no_neurons_note(model, hookpoint)}", file=sys.stderr)


def read_held_out_windows(cfg: EvalConfig, model, tokenizer, jobs: list[EvalJob]) -> tuple[Tensor, dict]:
    """The held-out windows (n_windows, ctx_len) that `jobs` share (the same data, split and training
    dataset; eval/data.py's rules, past what any of their trainings read) and the report's
    description of that text."""
    data, split, training_dataset = jobs[0].data, jobs[0].split, jobs[0].training_dataset
    check_context_length(model, data.ctx_len, "ctx_len")
    return held_out_windows(data, tokenizer, cfg.tokens, split, [job.text_read for job in jobs],
                            training_dataset=training_dataset)


def evaluate_at_hookpoint(cfg: EvalConfig, jobs: list[EvalJob], model, tokenizer, windows: Tensor, source: dict, device,
                          explain_tools) -> dict[Path, dict]:
    """The reports of `jobs`, SAEs at one hookpoint, evaluated together on `windows` (one LM forward
    per batch for all of them), each with the optional sections the options ask for."""
    hookpoint, data = jobs[0].hookpoint, jobs[0].data  # one hygiene: jobs are grouped by their data
    saes = {str(job.dir): SparseAutoencoder.load(job.dir, device=device) for job in jobs}
    if cfg.sparse_probe:  # before the eval pass, not after it
        from .sparse_probe import check_ks

        for sae in saes.values():
            check_ks(cfg.sparse_probe_ks, min(sae.cfg.n_latents, sae.cfg.d_in))
    if cfg.absorption:
        from .absorption import check_absorption_sae

        for sae_dir, sae in saes.items():
            check_absorption_sae(sae, sae_dir)
    excluded = excluded_ids(tokenizer, data.exclude_special_tokens)
    results = evaluate_many(saes, model, windows, hookpoint, batch_windows=cfg.batch, progress=True,
                            excluded_token_ids=excluded,
                            outlier_norm_ratio=data.outlier_norm_ratio)
    hygiene = {"exclude_special_tokens": data.exclude_special_tokens, "outlier_norm_ratio": data.outlier_norm_ratio}
    reports = {}
    for job in jobs:
        reports[job.dir] = {
            "sae": str(job.dir), **kind_keys(saes[str(job.dir)].cfg), "model": job.model,
            "model_init": _model_init_text(*job.model_init), "hookpoint": hookpoint, "data": source,
            "token_hygiene": hygiene,
            **results[str(job.dir)],
            **optional_sections(cfg, explain_tools, saes[str(job.dir)], model, tokenizer, hookpoint, windows, job.dir,
                                excluded),
        }
    return reports


def optional_sections(cfg: EvalConfig, explain_tools, sae, model, tokenizer, hookpoint: str, windows,
                      sae_dir: Path, excluded_token_ids: list[int]) -> dict:
    """The report sections beyond the reconstruction metrics that the options ask for: `explain`,
    then Gao et al.'s other metrics (ablation sparsity, probe loss, N2G), k-sparse probing and feature
    absorption, which leave out the positions of `excluded_token_ids` (token hygiene)."""
    sections = {}
    if cfg.explain:
        sections["explain"] = _explain(cfg, explain_tools, sae, model, tokenizer, hookpoint, windows, sae_dir)
    sections.update(_gao_metrics(cfg, sae, model, tokenizer, hookpoint, windows))
    if cfg.sparse_probe:
        from .sparse_probe import sparse_probe_section

        sections["sparse_probe"] = sparse_probe_section(
            model, tokenizer, sae, hookpoint, windows, cfg.sparse_probe_ks, batch_windows=cfg.batch,
            tasks_file=cfg.probe_tasks or None, max_tokens=cfg.probe_tokens or None,
            excluded_token_ids=excluded_token_ids)
    if cfg.absorption:
        from .absorption import absorption_section

        sections["absorption"] = absorption_section(
            model, tokenizer, sae, hookpoint, windows, batch_windows=cfg.batch, max_tokens=cfg.probe_tokens or None,
            excluded_token_ids=excluded_token_ids)
    return sections


def _grouped(jobs: list[EvalJob], key: Callable[[EvalJob], Any]) -> list[list[EvalJob]]:
    """`jobs` grouped by `key`: groups in the order of their first job, jobs in the order given."""
    groups: dict[Any, list[EvalJob]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return list(groups.values())


def _model_init_text(init: str, seed: int) -> str:
    return "pretrained" if init == "pretrained" else f"random (seed {seed})"


def _model_init_notes(jobs: list[EvalJob]) -> list[str]:
    """A note per SAE trained on a random-init LM drawn by other torch/transformers versions than these:
    their init code may draw other weights from the same seed, so the rebuilt LM may not be training's."""
    import torch
    import transformers

    here = {"torch": torch.__version__, "transformers": transformers.__version__}
    return [f"note: {job.dir} was trained on a random-init LM drawn with {job.model_init_versions}; this is "
            f"{here}, whose init may draw other weights from the same seed"
            for job in jobs if job.model_init_versions not in (None, here)]


def _gao_metrics(cfg: EvalConfig, sae, model, tokenizer, hookpoint: str, windows) -> dict:
    """The report sections of Gao et al.'s other metrics that the options ask for."""
    sections = {}
    if cfg.ablation:
        from .ablation import ablation_section

        sections["ablation_sparsity"] = ablation_section(
            model, hookpoint, sae, windows, cfg.ablation, cfg.ablation_per_latent, cfg.ablation_horizon, cfg.seed, cfg.batch)
    if cfg.probe:
        from .probe import probe_section

        sections["probe"] = probe_section(model, tokenizer, sae, hookpoint, windows, batch_windows=cfg.batch,
                                          tasks_file=cfg.probe_tasks or None, max_tokens=cfg.probe_tokens or None)
    if cfg.n2g:
        from .explain.n2g import n2g_section

        sections["n2g"] = n2g_section(model, tokenizer, sae, hookpoint, windows, cfg.n2g, seed=cfg.seed,
                                      batch_windows=cfg.batch)
    return sections


def _explain_tools(cfg: EvalConfig, device) -> tuple:
    """The simulators and the explainer's backend, built once for every SAE of the run (loading an
    embedding model or a local LLM is the slow part). One local model serves both roles when named twice."""
    from .explain.choose import SimulatorSet

    simulator_backend = cfg.simulator_backend(str(device))
    if (cfg.explainer_url, cfg.explainer_model) == (cfg.simulator_url, cfg.simulator_model):
        explainer_backend = simulator_backend
    else:
        explainer_backend = cfg.backend(cfg.explainer_url, cfg.explainer_model, str(device))
    return SimulatorSet(cfg.simulators, simulator_backend), explainer_backend


def _explain(cfg: EvalConfig, tools: tuple, sae, model, tokenizer, hookpoint: str, windows, sae_dir: Path) -> dict:
    """The report's `explain` section for one SAE (eval/explain/pipeline.py)."""
    from .explain.pipeline import explain_sae, explain_table
    from .explain.records import named_neuron_site

    simulators, explainer_backend = tools
    latents = [int(part) for part in str(cfg.explain_latents).split(",") if part.strip()] or None
    jsonl = Path(cfg.explain_out) if cfg.explain_out else sae_dir / "explain.jsonl"
    section = explain_sae(sae, model, tokenizer, hookpoint, windows, n_units=cfg.explain, simulators=simulators,
                          explainer_backend=explainer_backend, latents=latents, neurons=cfg.explain_neurons,
                          neuron_site=named_neuron_site(model, cfg.neuron_module) if cfg.neuron_module else None,
                          seed=cfg.seed, batch_windows=cfg.batch, jsonl_path=jsonl,
                          methods=cfg.scorers)
    print(explain_table(section))
    return section


def split_positionals(argv: list[str]) -> tuple[list[str], list[str]]:
    """SAE folders (the arguments before the first option, --key or -h) and the options."""
    first_option = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    return argv[:first_option], argv[first_option:]


def fetch_hub_saes(cfg: EvalConfig, sae_dirs: list[str]) -> list[str]:
    """The SAE folders with each hf://OWNER/REPO/SUBFOLDER replaced by its folder in huggingface_hub's cache
    (sae/hub.py: fetched, or read offline). Nothing is written beside an SAE read from that cache:
    --explain needs --explain_out, and --wandb (which writes next to the SAE) is refused."""
    hub = [sae_dir for sae_dir in sae_dirs if is_hub_path(sae_dir)]
    if hub and cfg.explain and not cfg.explain_out:
        raise UsageError(f"{hub[0]} is read from huggingface_hub's cache; --explain writes its records beside the SAE, "
                         "so pass --explain_out FILE")
    if hub and cfg.wandb:
        raise UsageError(f"--wandb writes into the SAE's training run, which {hub[0]} from the Hub does not have here")
    return [str(resolve_sae_path(sae_dir)) if is_hub_path(sae_dir) else sae_dir for sae_dir in sae_dirs]


def main(argv: list[str] | None = None) -> list[dict]:
    sae_dirs, options = split_positionals(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(options, EvalConfig, usage=__doc__)
    if not sae_dirs:
        raise UsageError("name one or more SAE folders: python -m eval SAE_DIR [SAE_DIR ...] [--options]; --help lists the options")
    if cfg.out:
        check_report_path(cfg.out)  # before the work, not after it
    sae_dirs = fetch_hub_saes(cfg, sae_dirs)
    started = time.perf_counter()
    if cfg.replace_all:
        reports = [run_replacement(cfg, sae_dirs)]
        print(replacement_table(reports[0]))
        evaluated = f"the replacement model of {len(reports[0]['layers'])} transcoders"
    else:
        reports = run_eval(cfg, sae_dirs)
        print(comparison_table(reports))
        if any(key in report for report in reports for key in INTERPRETABILITY_KEYS):
            print(interpretability_table(reports))
        evaluated = f"{len(reports)} SAE(s)"
    print(f"evaluated {evaluated} on {reports[0]['tokens']:,} tokens in {time.perf_counter() - started:.1f} s")
    if cfg.out:
        print(f"report written to {save_report(cfg.out, reports)}")
    if cfg.wandb:
        for report in reports:
            metadata = read_any_sae_metadata(report["sae"])
            path = log_to_wandb(report, metadata, Path(report["sae"]).parent, cfg.wandb_project, cfg.wandb_mode)
            print(f"wandb: wrote eval/* into the summary of {path}")
    return reports


if __name__ == "__main__":
    run_cli(main)
