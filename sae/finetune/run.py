"""The fine-tune run: an SAE folder in, a run folder out (RUN_DIR/HOOKPOINT, log.jsonl, checkpoints/).

Each step reads `batch_windows` windows of the SAE's own training split (held-in text, never a held-out
split), computes the spliced loss (sae/finetune/loss.py), and takes an Adam step on the SAE only; the LM
is frozen. The learning rate warms up over the first WARMUP_FRACTION of the steps and then decays
linearly to lr / d over the rest (`sae.optim.lr_at`). The SAE is fine-tuned as saved, in raw activation
units (the folder is folded: `sae.folder.fold_scales`); the fvu of its loss does not depend on the units.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..activations import check_context_length, get_module, hookpoint_widths, load_model_and_tokenizer
from ..batchtopk import update_running_threshold
from ..config import ConfigError, DataConfig, SaeConfig, input_site
from ..data import TokenWindows, load_text_dataset, text_read_record
from ..distributed import resolve_device
from ..errors import MissingFileError, RunExistsError, UsageError
from ..files import atomic_folder, atomic_write, check_writable_folder
from ..folder import is_sae_folder, read_sae_config, read_sae_provenance
from ..hygiene import excluded_ids
from ..memory import check_fits, free_bytes
from ..model import SparseAutoencoder
from ..optim import check_loss_is_finite, lr_at, set_decoder_rows_to_unit_norm, set_lr
from ..splits import SPLIT_PER_MILLE
from . import memory
from .loss import FinetuneLoss, finetune_loss
from .windows import WindowBatches

DEFAULT_LR = 1e-3
"""Adam's peak lr: of 1e-4, 3e-4, 1e-3 and 3e-3, the one whose fine-tune reached the lowest KL + fvu on the
validation split (topk-k16 of the embedded default, 262,144 tokens; docs/finetune.md)."""
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10
"""Gao et al.'s Adam betas and eps, the trainer's defaults for its "adam" optimiser."""
WARMUP_FRACTION = 0.05
"""The lr warms up over this fraction of the steps: Adam's first steps, before its second moment has
settled, would otherwise move every parameter by about lr at once."""
BLOCK_WINDOWS = 1024
"""Windows mixed together before batching (`WindowBatches`): 65,536 tokens of 64, like the trainer's block."""
LOSS_COMPOSITION = ("kl_coef * KL(p_clean || p_spliced), mean over the predictions at positions 1..T-1, + the "
                    "SAE's training loss on the spliced rows (fvu; Matryoshka: mean with its prefixes' fvu; + "
                    "multi-TopK fvu / 8); no AuxK")
HELD_OUT_SPLITS = tuple(SPLIT_PER_MILLE)
"""The held-out splits of the embedded corpus and local files (sae/splits.py): never fine-tuned on."""
RESUMABLE_FIELDS = ("tokens", "kl_coef", "lr", "batch_windows", "seed")
"""The options a resumed run must share with the run it continues: they set its trajectory."""
SOURCE_ONLY_KEYS = ("final_metrics", "input_scale_folded", "wandb_run_id", "wandb_project")
"""Keys of the source's cfg.json that describe the source SAE, not the fine-tuned one."""


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune (the CLI's options, `python -m sae.finetune --help`)."""

    tokens: int
    """LM tokens to fine-tune on (windows x ctx_len); steps = tokens // (batch_windows x ctx_len)."""
    kl_coef: float = 1.0
    """Weight of the KL term; the reconstruction loss has weight 1."""
    lr: float = DEFAULT_LR
    batch_windows: int = 32
    """Windows per step."""
    log_every: int = 10
    save_every: int = 100
    """Steps between checkpoints; 0: none."""
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    """Seeds the mixing of windows (`WindowBatches`)."""
    device: str = "auto"
    data_dir: str = "data"
    """Where the embedded corpus is built (as train.py's data.data_dir)."""

    def __post_init__(self):
        positive = {"tokens": self.tokens, "lr": self.lr, "batch_windows": self.batch_windows,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not value > 0:
                raise UsageError(f"--{name} must be positive, got {value}")
        if self.kl_coef < 0 or self.save_every < 0:
            raise UsageError(f"--kl_coef and --save_every must be >= 0, got {self.kl_coef} and {self.save_every}")


@dataclass
class Source:
    """The SAE to fine-tune and what its cfg.json records of where it was trained."""

    folder: Path
    cfg: SaeConfig
    provenance: dict[str, Any]
    data: DataConfig
    exclude_special_tokens: bool


def read_source(sae_dir: Path, data_dir: str) -> Source:
    """The SAE folder `sae_dir`, refused in one line when it is missing or lacks the provenance the
    fine-tune needs (model, hookpoint, the training text)."""
    if not is_sae_folder(sae_dir):
        raise MissingFileError(f"SAE folder not found: {sae_dir} (no sae.safetensors there)")
    cfg = read_sae_config(sae_dir)
    provenance = read_sae_provenance(sae_dir)
    if provenance.get("split") in HELD_OUT_SPLITS:
        raise UsageError(f"{sae_dir}/cfg.json records split '{provenance['split']}' as its training text, a held-out "
                         "split: the fine-tune reads the training text, and never held-out text")
    missing = [key for key in ("model", "hookpoint", "dataset", "split", "ctx_len") if provenance.get(key) is None]
    if missing:
        raise UsageError(f"{sae_dir}/cfg.json does not record {', '.join(missing)}: the fine-tune reads the SAE's "
                         "model and training text from there")
    try:
        data = DataConfig(dataset=provenance["dataset"], dataset_config=provenance.get("dataset_config"),
                          split=provenance["split"], text_column=provenance.get("text_column") or "text",
                          ctx_len=provenance["ctx_len"], data_dir=data_dir)
    except (ConfigError, ValueError) as error:
        raise UsageError(f"{sae_dir}/cfg.json: {error}") from None
    exclude = bool(provenance.get("exclude_special_tokens", False))  # absent: trained before token hygiene
    return Source(sae_dir, cfg, provenance, data, exclude)


def default_run_dir(sae_dir: Path, hookpoint: str) -> Path:
    """RUN-finetuned next to the SAE's run folder RUN when the SAE folder is named after its hookpoint (a
    run of one SAE), else RUN-finetuned-NAME (NAME: the variant's folder)."""
    run = sae_dir.resolve().parent
    suffix = "-finetuned" if sae_dir.resolve().name == hookpoint else f"-finetuned-{sae_dir.resolve().name}"
    return run.with_name(run.name + suffix)


def check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("the fine-tune runs as a single process for now: run it without torchrun")


def latest_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None to start; refuses a run folder that already holds anything
    without `resume`, and a non-empty one with nothing to resume from."""
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not resume:
        raise RunExistsError(f"run folder {run_dir} already holds files; pass --resume to continue its run, or "
                             "choose another --out")
    kept = checkpoint.list_checkpoints(run_dir)
    if resume and occupied and not kept:
        raise UsageError(f"--resume: run folder {run_dir} holds no checkpoint to resume from")
    return kept[-1] if kept else None


def runs_after_training(sae_dirs: list[Path], hookpoints: list[str], resume: bool) -> list[tuple[Path, Path]]:
    """(SAE folder, fine-tune run folder) of each SAE a training run will save (train.py --finetune_tokens),
    checked before the training starts: one process, and no run folder already taken unless `resume`."""
    check_single_process()
    runs = [(sae_dir, default_run_dir(sae_dir, hookpoint)) for sae_dir, hookpoint in zip(sae_dirs, hookpoints)]
    for _, run_dir in runs:
        latest_checkpoint(run_dir, resume)
    return runs


def finetune(sae_dir: str | Path, run_dir: str | Path | None, options: FinetuneOptions) -> Path:
    """Fine-tune the SAE in `sae_dir` end to end (module docstring); returns the fine-tuned SAE's folder,
    RUN_DIR/HOOKPOINT (`run_dir` None: `default_run_dir`)."""
    check_single_process()
    source = read_source(Path(sae_dir), options.data_dir)
    hookpoint = source.provenance["hookpoint"]
    steps = options.tokens // (options.batch_windows * source.data.ctx_len)
    if steps == 0:
        raise UsageError(f"--tokens {options.tokens} is less than one step of --batch_windows {options.batch_windows} "
                         f"windows of {source.data.ctx_len} tokens")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(source.folder, hookpoint)
    latest = latest_checkpoint(run_dir, options.resume)
    check_writable_folder(run_dir, "the run folder", "choose another --out")
    device = resolve_device(options.device)
    model, tokenizer = load_model_and_tokenizer(source.provenance["model"], "float32", device,
                                                source.provenance.get("model_init") or "pretrained",
                                                source.provenance.get("model_init_seed") or 0)
    module = get_module(model, hookpoint)
    check_context_length(model, source.data.ctx_len)
    check_width(model, hookpoint, source.cfg)
    sae = load_sae(source.folder, device)
    plan = memory.estimate(model, hookpoint, source.cfg, options.batch_windows, source.data.ctx_len, device)
    print(check_fits(plan, device, free_bytes(device), "the fine-tune", "lower --batch_windows"), flush=True)
    windows = TokenWindows(load_text_dataset(source.data), tokenizer, source.data.ctx_len, source.data.text_column)
    batches = WindowBatches(windows, options.batch_windows, BLOCK_WINDOWS, options.seed)
    optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=options.lr, betas=ADAM_BETAS,
                                 eps=ADAM_EPS)
    start = resume_from(latest, sae, optimizer, batches, options, run_dir) if latest else 0
    excluded = excluded_ids(tokenizer, source.exclude_special_tokens)
    print(f"fine-tuning {source.folder} into {run_dir}: steps {start}..{steps} of {options.batch_windows} x "
          f"{source.data.ctx_len} tokens, lr {options.lr:g}, kl_coef {options.kl_coef:g}", flush=True)
    started = time.perf_counter()
    for step in range(start, steps):
        lr = lr_at(step, options.lr, max(int(WARMUP_FRACTION * steps), 1), steps, 1.0)
        loss = training_step(model, module, sae, optimizer, next(batches).to(device), excluded, options.kl_coef, lr)
        done = step + 1
        if done % options.log_every == 0 or done == steps:
            log_step(run_dir, done, done * options.batch_windows * source.data.ctx_len, lr, loss, sae,
                     time.perf_counter() - started)
        if options.save_every and done % options.save_every == 0:
            save_state(run_dir, done, sae, optimizer, batches, options, source.folder)
    record = finetune_record(source, options, steps, windows, run_dir)
    out = run_dir / hookpoint
    atomic_folder(out, lambda tmp: sae.save(tmp, metadata=finetuned_metadata(source, record)))
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return out


def check_width(model, hookpoint: str, cfg: SaeConfig) -> None:
    """Refuse (one line) a hookpoint that does not run, or whose activations (a transcoder's: the module's
    input and output) are not the SAE's d_in wide (`hookpoint_widths`: one probe forward)."""
    sites = [input_site(hookpoint), hookpoint] if cfg.transcode else [hookpoint]
    for site, width in hookpoint_widths(model, sites).items():
        if width != cfg.d_in:
            raise UsageError(f"hookpoint '{site}' has width {width}, but the SAE's d_in is {cfg.d_in}")


def load_sae(folder: Path, device: torch.device) -> SparseAutoencoder:
    sae = SparseAutoencoder.load(folder, device=device, dtype=torch.float32)
    if sae.input_norm != "none":
        raise UsageError(f"{folder} has input_norm {sae.input_norm!r} (an imported SAE): fine-tuning it is not "
                         "supported")
    if sae.cfg.normalize_decoder:
        move_decoder_norm_to_encoder(sae, folder)
    return sae


def move_decoder_norm_to_encoder(sae: SparseAutoencoder, folder: Path) -> None:
    """Give the decoder unit-norm rows, which each step keeps them at, without changing what the SAE
    computes. A folded transcoder's rows all have one norm c = input scale / output scale
    (`sae.folder.fold_scales`); W_dec / c with W_enc, b_enc and BatchTopK's threshold times c is the same
    function, since a positive factor on the pre-activations keeps the top-k and commutes with ReLU. Rows of
    different norms cannot be moved so: refused in one line."""
    norms = sae.W_dec.detach().norm(dim=1)
    c = norms.mean()
    if (norms - c).abs().max() > 1e-4 * c:
        raise UsageError(f"{folder}: its decoder rows have norms from {norms.min().item():.4g} to {norms.max().item():.4g}; "
                         "the fine-tune keeps them at one norm (normalize_decoder), so it takes only SAEs whose rows "
                         "share one")
    with torch.no_grad():
        sae.W_dec.div_(c)
        sae.encoder.weight.mul_(c)
        sae.encoder.bias.mul_(c)
        if sae.threshold is not None:
            sae.threshold.mul_(c)


def training_step(model, module, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                  excluded: list[int], kl_coef: float, lr: float) -> FinetuneLoss:
    """One Adam step of the SAE on the spliced loss of `input_ids` (B, T), keeping the decoder's rows at unit
    norm (the gradient's part along each row removed, the rows renormalised after the step, as the trainer
    does) and BatchTopK's running threshold following the batch's (as the trainer does)."""
    loss = finetune_loss(model, module, sae, input_ids, excluded, kl_coef)
    check_loss_is_finite(loss.total)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    if sae.cfg.normalize_decoder:
        sae.remove_gradient_parallel_to_decoder_directions()
    set_lr(optimizer, lr)
    optimizer.step()
    if sae.cfg.normalize_decoder:
        set_decoder_rows_to_unit_norm(sae, optimizer)
    if loss.sae.batch_threshold is not None:
        update_running_threshold(sae.threshold, loss.sae.batch_threshold)
    return loss


def log_step(run_dir: Path, step: int, tokens: int, lr: float, loss: FinetuneLoss, sae: SparseAutoencoder,
             seconds: float) -> None:
    """Append one line to RUN_DIR/log.jsonl and print it."""
    record = {"step": step, "tokens": tokens, "loss": loss.total.item(), "kl": loss.kl.item(),
              "sae_loss": loss.sae.loss.item(), "fvu": loss.sae.fvu.item(),
              "l0": (loss.sae.latent_acts > 0).sum(1).float().mean().item(), "lr": lr, "seconds": round(seconds, 1)}
    if sae.threshold is not None:
        record["threshold"] = sae.threshold.item()
    with open(run_dir / "log.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    print(" ".join(f"{key} {value:.5g}" if isinstance(value, float) else f"{key} {value}"
                   for key, value in record.items()), flush=True)


def save_state(run_dir: Path, step: int, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
               batches: WindowBatches, options: FinetuneOptions, source: Path) -> None:
    """Checkpoint `step` (sae/checkpoint.py): the SAE, Adam's state, the RNG, the window stream's position."""
    optimizer_tensors, optimizer_meta = checkpoint.optimizer_to_flat(optimizer)
    tensors = {f"sae.{name}": tensor.detach() for name, tensor in sae.state_dict().items()}
    tensors |= {name: tensor.detach().cpu() for name, tensor in optimizer_tensors.items()} | checkpoint.rng_tensors()
    state = {"step": step, "batches": batches.state_dict(), "optimizer": optimizer_meta, "source": str(source),
             "options": {name: getattr(options, name) for name in RESUMABLE_FIELDS}}
    checkpoint.save_checkpoint(run_dir, step, *checkpoint.whole({k: v.cpu() for k, v in tensors.items()}), state,
                               keep=options.keep_checkpoints)


def resume_from(path: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, batches: WindowBatches,
                options: FinetuneOptions, run_dir: Path) -> int:
    """Load checkpoint `path` into the SAE, Adam, the RNG and the window stream, cut log.jsonl back to its
    step; returns that step. A checkpoint of other options (`RESUMABLE_FIELDS`) is refused."""
    tensors, state = checkpoint.load_checkpoint(path)
    recorded = {name: getattr(options, name) for name in RESUMABLE_FIELDS}
    if state["options"] != recorded:
        differ = [f"{name} {state['options'][name]} (now {recorded[name]})" for name in RESUMABLE_FIELDS
                  if state["options"][name] != recorded[name]]
        raise UsageError(f"--resume: {path} was written with other options: {', '.join(differ)}")
    sae.load_state_dict({name: tensors[f"sae.{name}"] for name in sae.state_dict()})
    checkpoint.optimizer_from_flat(optimizer, dict(tensors), state["optimizer"])
    checkpoint.restore_rng(dict(tensors))
    batches.load_state_dict(state["batches"])
    cut_log(run_dir / "log.jsonl", state["step"])
    print(f"resumed from {path}", file=sys.stderr)
    return state["step"]


def cut_log(path: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to `step`: those written after the checkpoint are logged again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def finetune_record(source: Source, options: FinetuneOptions, steps: int, windows: TokenWindows,
                    run_dir: Path) -> dict[str, Any]:
    """cfg.json's `finetune`: what was fine-tuned, how, and where its text stream stopped."""
    log = run_dir / "log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else None
    return {"source": str(source.folder.resolve()), "tokens": steps * options.batch_windows * source.data.ctx_len,
            "steps": steps, "kl_coef": options.kl_coef, "lr": options.lr, "batch_windows": options.batch_windows,
            "seed": options.seed, "optimizer": f"adam {ADAM_BETAS} eps {ADAM_EPS}, warmup {WARMUP_FRACTION:g} of "
            "the steps, then linear decay", "loss": LOSS_COMPOSITION,
            "exclude_special_tokens": source.exclude_special_tokens,
            "text_read": text_read_record([windows.read_position()], source.data), "last_logged": last}


def finetuned_metadata(source: Source, record: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned SAE's cfg.json keys beyond its SaeConfig: the source's provenance, less what describes
    the source SAE only (`SOURCE_ONLY_KEYS`), plus the `finetune` record."""
    kept = {key: value for key, value in source.provenance.items() if key not in SOURCE_ONLY_KEYS}
    return kept | {"finetune": record}
