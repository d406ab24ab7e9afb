"""The training loop, top to bottom: stream activations from the LM, step the SAE, log, checkpoint.

One step is `training_step`: the forward (encode, top-k, count the batch into the dead-latent
counters, decode, fvu, AuxK, Multi-TopK), backward, gradients summed over the replicas, decoder
gradients projected, clipped, the optimiser's step, decoder rows renormalised. Its input is
x = input_scale * activations, the scale chosen once from the first batch so that E||x||^2 = d_in.

Every run has a layout (sae/parallel.py): a process alone, data parallel under torchrun, or with
--shard_latents its latents split over groups of ranks. The loop below is the same for all of them:
each replica streams its own shard of the text and computes its share of the global batch's loss;
gradients are summed and dead-latent statistics merged over the replicas, so all ranks take the
same step and equal a single process with the same global batch. Rank 0 alone logs and writes.
SIGINT or SIGTERM stops every rank at the same step boundary, after a checkpoint (sae/stopping.py).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint
from .activations import (ActivationStream, LMWindowSource, PlaceholderWindowSource, check_context_length,
                          hookpoint_widths, load_run_lm, load_tokenizer)
from .config import TrainConfig, to_dict
from .data import TokenWindows, load_text_dataset, text_read_record
from .distributed import (DistInfo, gather_objects, init_distributed, resolve_device, resolve_precision, shutdown,
                          wait_for_main_rank)
from .errors import RunExistsError, UsageError
from .files import atomic_write, check_writable_folder, disk_errors, disk_remedy
from .batchtopk import update_running_threshold
from .hygiene import excluded_ids
from .initialization import initialize_from_batch, initialize_transcoder_from_batch
from .memory import check_fits, estimate_memory, free_bytes
from .full_state import drain
from .members import Member, build_members, evaluation_sae, load_member, member_specs, member_state, save_member
from .model import ForwardOutput, SparseAutoencoder
from .optim import (NonFiniteLossError, check_loss_is_finite, clip_grad_norm_, lr_at, lr_rule_note,
                    set_decoder_rows_to_unit_norm, set_lr)
from .parallel import ShardLayout
from .stopping import RunStopped, StopOnSignal

HeldOutScorer = Callable[[SparseAutoencoder, float, str], dict[str, float]]
"""Scores an SAE on held-out text: (sae, input_scale, hookpoint) -> {"eval/KEY": value}."""

# What `train` calls on rank 0, once, when cfg.eval_every > 0: (cfg, model, tokenizer) -> a HeldOutScorer.
# eval.training_evaluator is one.
EvaluatorFactory = Callable[[TrainConfig, Any, Any], HeldOutScorer]

# Config keys that may differ between a run and its resumption; anything else must match.
_RESUMABLE_CHANGES = {
    "max_tokens", "log_every", "save_every", "keep_checkpoints", "resume", "wandb_mode", "device",
    "eval_every", "eval_tokens", "eval_split", "collective_timeout_s", "precision", "finetune_tokens",
}


def training_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    tokens_since_fired: Tensor,
    lr: float,
    grad_clip: float,
    target: Tensor | None = None,
) -> ForwardOutput:
    """One optimiser step on this rank's rows of the batch, `x` (N, d_in), already scaled (a transcoder:
    and its `target`, the module's output, (N, d_in), scaled).

    `tokens_since_fired` (n_local,) are the dead-latent counters of this rank's latents: the forward
    counts the batch into them right after its top-k, so AuxK trains the latents dead after this
    batch (one that fires in it is not dead). Under torchrun (`sae.layout`) the losses are this
    replica's share of the global batch's and the gradients are summed over replicas, so every rank
    takes the same step; for one process that sum is nothing.
    """
    def mark_fired_latents(latent_indices: Tensor, latent_acts: Tensor) -> Tensor:
        update_dead_counters(sae, tokens_since_fired, latent_indices, latent_acts)
        return tokens_since_fired >= sae.cfg.dead_tokens  # the dead mask AuxK uses

    out = sae(x, mark_fired_latents, target=target)
    check_loss_is_finite(out.loss)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.layout.sum_gradients_over_replicas(sae.parameters())
    if sae.cfg.normalize_decoder:
        sae.remove_gradient_parallel_to_decoder_directions()
    if grad_clip > 0:  # after the projection: the clip bounds the gradient the step uses
        clip_grad_norm_(sae, grad_clip)
    set_lr(optimizer, lr)
    optimizer.step()
    if sae.cfg.normalize_decoder:
        set_decoder_rows_to_unit_norm(sae, optimizer)
    if out.batch_threshold is not None:
        update_running_threshold(sae.threshold, out.batch_threshold)
    return out


@torch.no_grad()
def update_dead_counters(sae: SparseAutoencoder, tokens_since_fired: Tensor, latent_indices: Tensor,
                         latent_acts: Tensor) -> None:
    """Add the global batch's tokens to the counter of each of this rank's latents (n_local,); reset
    those that fired in any replica. latent_indices (global ids), latent_acts (N, k): this replica's
    TopK selection (a latent fires where its value > 0)."""
    fired = torch.zeros_like(tokens_since_fired, dtype=torch.uint8)
    local = latent_indices[latent_acts > 0] - sae.latent_start
    fired[local[(local >= 0) & (local < sae.n_local)]] = 1
    sae.layout.max_over_replicas(fired)
    tokens_since_fired += latent_indices.shape[0] * sae.layout.replicas
    tokens_since_fired[fired.bool()] = 0


@torch.no_grad()
def initialize_from_first_batch(sae: SparseAutoencoder, first_batch: Tensor, cfg: TrainConfig) -> float:
    """`initialization.initialize_from_batch` (b_dec, encoder scale, input scale) from the global first
    batch: every rank gets the same numbers, computed from all replicas' first batches together.
    Collective under torchrun: call it on every rank with its replica's rows."""
    rows = sae.layout.gather_rows_over_replicas(sae.layout.broadcast_rows(first_batch))
    return initialize_from_batch(sae, rows, cfg.b_dec_init, cfg.scale_inputs, cfg.fit_encoder_scale)


@torch.no_grad()
def initialize_transcoder_from_first_batch(sae: SparseAutoencoder, inputs: Tensor, targets: Tensor,
                                           cfg: TrainConfig) -> tuple[float, float]:
    """(input scale, output scale) of a transcoder from the global first batch of its module's inputs and
    outputs (`initialization.initialize_transcoder_from_batch`), the same on every rank. Collective."""
    layout = sae.layout
    inputs, targets = (layout.gather_rows_over_replicas(layout.broadcast_rows(rows)) for rows in (inputs, targets))
    return initialize_transcoder_from_batch(sae, inputs, targets, cfg.b_dec_init, cfg.scale_inputs,
                                            cfg.fit_encoder_scale)


@torch.no_grad()
def step_metrics(sae: SparseAutoencoder, out: ForwardOutput, tokens_since_fired: Tensor) -> dict[str, float]:
    """Global-batch metrics of a step: losses summed over the replicas' shares, L0 averaged over
    them, the dead fraction over all latents (every shard's)."""
    layout = sae.layout
    values = torch.stack([
        out.fvu.detach().float(), out.auxk_loss.detach().float(), out.multi_topk_fvu.detach().float(),
        out.prefix_fvu.detach().float(),
        (out.latent_acts > 0).sum(-1).float().mean() / layout.replicas,
    ])
    fvu, auxk_loss, multi_topk_fvu, prefix_fvu, l0 = layout.sum_over_replicas(values).tolist()
    dead = layout.sum_over_shards((tokens_since_fired >= sae.cfg.dead_tokens).sum().reshape(1))
    dead_frac = dead.item() / sae.cfg.n_latents
    metrics = {"fvu": fvu, "auxk_loss": auxk_loss, "multi_topk_fvu": multi_topk_fvu, "l0": l0, "dead_frac": dead_frac}
    if sae.cfg.matryoshka:
        metrics["prefix_fvu"] = prefix_fvu
    if out.batch_threshold is not None:  # BatchTopK: this batch's threshold and the running one (in training scale)
        metrics |= {"batch_threshold": out.batch_threshold.item(), "threshold": sae.threshold.item()}
    return metrics


def open_cache_source(cfg: TrainConfig, hookpoints: list[str], layout: ShardLayout):
    """sae.cache.CachedWindows for `cfg.data.activation_cache`, after checking the cache holds what
    this run would have streamed (same model, data and LM batching; at least the run's hookpoints)."""
    from .cache import ActivationCache, CachedWindows, cache_identity, check_same_identity, windows_for_training

    if layout.replicas > 1:
        raise UsageError("data.activation_cache is read by one process (or one shard group); "
                         "data-parallel replicas would each need their own share of the data")
    cache = ActivationCache(cfg.data.activation_cache)
    check_same_identity(cache.manifest, cache_identity(cfg, cache.manifest["storage_dtype"]),
                        Path(cfg.data.activation_cache), hookpoints_subset=True)
    needed = windows_for_training(cfg)
    if cache.n_windows < needed and layout.is_main:
        print(f"note: the run reads {needed:,} windows and {cfg.data.activation_cache} holds {cache.n_windows:,}; "
              "it will go over the cache again (streaming would read new text)")
    return CachedWindows(cache, hookpoints)


def train(cfg: TrainConfig, evaluator: EvaluatorFactory | None = None) -> Path:
    """Train the SAE(s) `cfg` describes; returns the folder of the (first) saved SAE.

    Run alone or under torchrun (data parallel: `cfg.batch_size` is the global batch). A plain run
    saves RUN_DIR/HOOKPOINT; a run with `variants` saves RUN_DIR/NAME for each. `evaluator` gives the
    held-out evals of `cfg.eval_every` (train.py passes `eval.training_evaluator`); the trainer does
    not import eval, which builds on it.
    """
    if cfg.eval_every > 0 and evaluator is None:
        raise ValueError("eval_every > 0 needs a held-out evaluator: train(cfg, evaluator=eval.training_evaluator), "
                         "as train.py passes")
    if cfg.run_name == "auto":  # under `wandb agent`: one folder per sweep run, named by its id
        run_id = os.environ.get("WANDB_RUN_ID")
        if not run_id:
            raise UsageError("run_name 'auto' uses the run id `wandb agent` sets (WANDB_RUN_ID), and none is set; name the run")
        cfg = replace(cfg, run_name=run_id)
    info = init_distributed(cfg.collective_timeout_s)
    try:
        with StopOnSignal() as stop:
            return _train(cfg, info, evaluator, stop)
    finally:
        shutdown(info)


@dataclass
class Run:
    """One training run as this rank holds it: what the step loop and the saves work on."""

    cfg: TrainConfig
    info: DistInfo
    layout: ShardLayout
    device: torch.device
    members: list[Member]
    stream: ActivationStream
    log: RunLog | None
    """Rank 0's log (None on the other ranks)."""
    score_held_out: HeldOutScorer | None
    """Rank 0's held-out evaluator, with cfg.eval_every > 0 (else None)."""


def _train(cfg: TrainConfig, info: DistInfo, evaluator: EvaluatorFactory | None, stop: StopOnSignal) -> Path:
    layout = ShardLayout(info.rank, info.world_size, cfg.shard_latents)
    device, compute_dtype = set_up_process(cfg, info, layout)
    latest = checkpoint.list_checkpoints(cfg.run_dir)
    prepare_run_folder(cfg, latest, info)  # before the model loads: a folder it cannot write is refused now
    source, d_in_of, model, tokenizer = open_source(cfg, layout, device)
    stream = ActivationStream(source, cfg.batch_size // layout.replicas, cfg.data.shuffle_buffer_tokens, cfg.seed,
                              rank=layout.replica, excluded_token_ids=run_excluded_ids(cfg, tokenizer),
                              outlier_norm_ratio=cfg.data.outlier_norm_ratio)
    report_memory(cfg, d_in_of, layout, device, compute_dtype, model, stream, info)  # refuses before the SAEs exist
    if info.is_main:
        for note in lr_rule_notes(cfg, d_in_of):
            print(note)
    members = build_members(cfg, d_in_of, layout, device, compute_dtype)  # same seed: the same init on every rank
    start_step, tokens_seen, wandb_id, batches = start_or_resume(cfg, info, members, stream, latest)
    log, score_held_out = open_log_and_evaluator(cfg, info, wandb_id, start_step, evaluator, model, tokenizer)
    run = Run(cfg, info, layout, device, members, stream, log, score_held_out)
    tokens_seen = run_steps(run, batches, start_step, tokens_seen, stop)
    save_members(run, source, tokens_seen)  # before the last checkpoint: the SAEs are small and what the run is for
    if start_step < cfg.total_steps:
        save_checkpoint(run, cfg.total_steps, tokens_seen)
    if log is not None:
        log.finish(members, tokens_seen)
    wait_for_main_rank(info)
    return members[0].out_dir


def set_up_process(cfg: TrainConfig, info: DistInfo, layout: ShardLayout) -> tuple[torch.device, torch.dtype]:
    """Check the batch splits over the replicas, say (rank 0) when max_tokens is rounded to whole
    batches, seed torch, and pick this rank's device and the compute dtype of the matmuls
    (`cfg.precision`): (device, compute dtype)."""
    if cfg.batch_size % layout.replicas:
        raise UsageError(f"batch_size {cfg.batch_size} is not divisible by the {layout.replicas} replicas")
    if cfg.max_tokens % cfg.batch_size and info.is_main:
        print(f"note: max_tokens {cfg.max_tokens:,} is not a whole number of batches of {cfg.batch_size:,}; "
              f"training {cfg.total_steps:,} steps = {cfg.total_steps * cfg.batch_size:,} tokens (rounded down)")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, info)
    compute_dtype = resolve_precision(cfg.precision, device)
    if device.type == "cuda" and compute_dtype == torch.bfloat16:
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 matmuls left (evals) may use TF32 too
    return device, compute_dtype


def start_or_resume(cfg: TrainConfig, info: DistInfo, members: list[Member], stream: ActivationStream,
                    latest: list[Path]) -> tuple[int, int, str | None, Iterator[dict[str, Tensor]]]:
    """(first step, tokens seen, wandb run id, batches): from the last checkpoint of `latest` if there
    is one, else from step 0 with each member's input scale and pre-bias set from the first batch,
    which is then trained on like any other."""
    if latest:
        start_step, tokens_seen, wandb_id = resume(cfg, info, members, stream, latest[-1])
        return start_step, tokens_seen, wandb_id, iter(stream)
    first_batch = next(stream)
    for member in members:
        if member.sae.cfg.transcode:
            member.input_scale, member.output_scale = initialize_transcoder_from_first_batch(
                member.sae, first_batch[member.input_site], first_batch[member.hookpoint], cfg)
        else:
            member.input_scale = member.output_scale = initialize_from_first_batch(member.sae, first_batch[member.hookpoint], cfg)
    return 0, 0, None, itertools.chain([first_batch], stream)


def open_log_and_evaluator(cfg: TrainConfig, info: DistInfo, wandb_id: str | None, start_step: int,
                           evaluator: EvaluatorFactory | None, model,
                           tokenizer) -> tuple[RunLog | None, HeldOutScorer | None]:
    """Rank 0's log and held-out evaluator (None elsewhere, and the evaluator without eval_every):
    only rank 0 logs, writes files and runs the held-out evals. Every rank waits for it."""
    log = score_held_out = None
    if info.is_main:
        log = RunLog(cfg, wandb_id, start_step)
        if cfg.eval_every > 0:
            score_held_out = evaluator(cfg, model, tokenizer)
    wait_for_main_rank(info)
    return log, score_held_out


def run_steps(run: Run, batches: Iterator[dict[str, Tensor]], start_step: int, tokens_seen: int,
              stop: StopOnSignal) -> int:
    """The steps from `start_step` to the last, each with the logging, held-out evals and checkpoint
    that `cfg` asks for after it (the last step's checkpoint is left to the caller, to write after the
    SAEs); returns the tokens seen. On a signal (any rank's), the step's checkpoint is written and
    every rank raises `RunStopped`."""
    cfg, info = run.cfg, run.info
    total_steps = cfg.total_steps
    progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not info.is_main)
    with progress:  # closed (its line ended) before any message a stop or an error prints
        started, tokens_at_start = time.perf_counter(), tokens_seen
        for step in range(start_step, total_steps):
            last_step = step + 1 == total_steps
            log_now = (step + 1) % cfg.log_every == 0 or last_step
            line = step_members(run, next(batches), step, total_steps, log_now)
            tokens_seen += cfg.batch_size
            progress.update(1)
            if log_now:
                elapsed = time.perf_counter() - started
                line.update(tokens=tokens_seen, tokens_per_s=(tokens_seen - tokens_at_start) / elapsed)
                write_log_line(run, line, progress)
            if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last_step):
                eval_started = time.perf_counter()
                evaluate_members(run, step + 1)
                started += time.perf_counter() - eval_started  # tokens_per_s counts training time only
            signal_number = 0 if last_step else stop.requested(info, run.device)  # Ctrl-C, preemption
            if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0 and not last_step) or signal_number:
                save_checkpoint(run, step + 1, tokens_seen)
            if signal_number:
                progress.close()
                if run.log is not None:
                    run.log.close()
                raise RunStopped(signal_number, step + 1, checkpoint.step_dir(cfg.run_dir, step + 1), info)
    return tokens_seen


def write_log_line(run: Run, line: dict[str, Any], progress: tqdm) -> None:
    """Rank 0: log a step's line, show the first member's metrics on the progress bar, and warn once per
    member whose training fvu has risen for a sustained stretch (`divergence.DivergenceWatch`), and once
    per member whose dead fraction passes `divergence.DEAD_FRACTION`."""
    if run.log is None:
        return
    run.log.write(line)
    for member in run.members:
        what, metrics = member.name or member.hookpoint, member.metrics
        if member.divergence.update(metrics["fvu"]):
            progress.write(member.divergence.message(what, metrics["lr"], line["step"]), file=sys.stderr)
        if member.dead_watch.update(metrics["dead_frac"]):
            progress.write(member.dead_watch.message(what, metrics["dead_frac"], metrics["lr"], line["step"]),
                           file=sys.stderr)
    first = run.members[0].metrics
    progress.set_postfix(fvu=f"{first['fvu']:.4f}", l0=f"{first['l0']:.1f}",
                         dead=f"{first['dead_frac']:.3f}", tok_s=f"{line['tokens_per_s']:,.0f}")


def report_memory(cfg: TrainConfig, d_in_of: dict[str, int], layout: ShardLayout, device: torch.device,
                  compute_dtype: torch.dtype, model, stream: ActivationStream, info: DistInfo) -> None:
    """Print the run's estimated peak memory per device (rank 0), and refuse (every rank) if it cannot fit."""
    saes = []
    for _, _, sae_cfg, _ in member_specs(cfg, d_in_of):
        start, stop = layout.latent_range(sae_cfg.n_latents)
        saes.append((sae_cfg, stop - start))
    lm_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
    shuffle_rows = stream.batches_per_block * stream.batch_size
    estimate = estimate_memory(saes, cfg.batch_size // layout.replicas, [d_in_of[h] for h in stream.hookpoints],
                               shuffle_rows, lm_bytes, device, compute_dtype)
    line = check_fits(estimate, device, free_bytes(device))
    if info.is_main:
        print(line)


def lr_rule_notes(cfg: TrainConfig, d_in_of: dict[str, int]) -> list[str]:
    """The notes of the run's SAEs that train at the default lr outside the shapes its rule was measured at
    (`optim.lr_rule_note`), one per distinct note."""
    notes = [lr_rule_note(sae_cfg, cfg) for _, _, sae_cfg, lr in member_specs(cfg, d_in_of) if lr is None]
    return list(dict.fromkeys(note for note in notes if note))


def prepare_run_folder(cfg: TrainConfig, latest: list[Path], info: DistInfo) -> None:
    """Refuse to train into a folder that already holds anything unless --resume (nothing is overwritten
    silently); say so when --resume finds no checkpoint to continue from (a fresh start, as a cluster's
    requeue of a run that never reached its first checkpoint wants, but a mistyped --run_name shows).
    Then (rank 0) create the folder and check it can be written, before the model loads, and remove
    the unfinished checkpoint writes a crash left behind."""
    if not cfg.resume:
        held = sorted(path.name for path in cfg.run_dir.iterdir()) if cfg.run_dir.is_dir() else []
        if held:
            raise RunExistsError(
                f"{cfg.run_dir} already holds a run ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                f"pass --resume to continue it, or choose another --run_name (or delete {cfg.run_dir})")
    elif not latest and info.is_main:
        print(f"note: --resume found no checkpoint in {checkpoint.checkpoint_dir(cfg.run_dir)}; "
              f"starting run '{cfg.run_name}' from step 0")
    wait_for_main_rank(info)  # every rank has looked into the folder before rank 0 writes in it
    if info.is_main:
        check_writable_folder(cfg.run_dir, "the run folder", "choose a writable --out_dir")
        checkpoint.remove_unfinished(cfg.run_dir)


def open_source(cfg: TrainConfig, layout: ShardLayout, device: torch.device):
    """(source of token windows' activations for this rank, d_in of each hookpoint, LM, tokenizer).

    The LM is loaded when activations are streamed, or for held-out evals (else model and tokenizer
    are None). The shard group's first rank streams for the group: its batches replace the others'
    (ShardLayout.broadcast_rows), so they get a placeholder that knows the shapes only: no data read,
    no LM forward. Each replica reads its own shard of the text."""
    hookpoints = cfg.hookpoints
    model = tokenizer = None
    if cfg.data.activation_cache:
        source = open_cache_source(cfg, hookpoints, layout)
        d_in_of = {hookpoint: source.cache.d_in_of[hookpoint] for hookpoint in hookpoints}
        if cfg.eval_every > 0:
            model, tokenizer = load_run_lm(cfg, device)
            check_context_length(model, cfg.data.ctx_len)
    else:
        model, tokenizer = load_run_lm(cfg, device)
        check_context_length(model, cfg.data.ctx_len)
        d_in_of = hookpoint_widths(model, hookpoints)
    if not layout.reads_data:
        source = PlaceholderWindowSource(hookpoints, cfg.data.ctx_len, d_in_of, device)
    elif not cfg.data.activation_cache:
        dataset = load_text_dataset(cfg.data, rank=layout.replica, world_size=layout.replicas)
        windows = TokenWindows(dataset, tokenizer, cfg.data.ctx_len, cfg.data.text_column)
        source = LMWindowSource(model, hookpoints, windows, cfg.data.lm_batch_windows)
    return source, d_in_of, model, tokenizer


def run_excluded_ids(cfg: TrainConfig, tokenizer) -> list[int]:
    """The token ids whose rows the run leaves out (`hygiene.excluded_ids`); the tokenizer is loaded on its
    own when the run has none (it reads a cache)."""
    if not cfg.data.exclude_special_tokens:
        return []
    return excluded_ids(tokenizer if tokenizer is not None else load_tokenizer(cfg.model), True)


def resume(cfg: TrainConfig, info: DistInfo, members: list[Member],
           stream: ActivationStream, path: Path) -> tuple[int, int, str]:
    """Load checkpoint `path` into the members, the RNG and the stream: (step, tokens seen, wandb run id)."""
    tensors, state = checkpoint.load_checkpoint(path)
    if "members" not in state:
        raise UsageError(f"{path} was written by an older version of this trainer (no per-SAE 'members' "
                         "state) and cannot be resumed; start a new run (another --run_name)")
    _check_resumable(cfg, state["config"], path)
    if len(state["streams"]) != info.world_size:
        raise UsageError(f"{path} was written by {len(state['streams'])} ranks; resume it on as many, not {info.world_size}")
    for member in members:
        load_member(member, tensors, state["members"][member.name])
    checkpoint.restore_rng(tensors)
    stream.load_state_dict(state["streams"][info.rank])
    if info.is_main:
        print(f"resumed from {path} at step {state['step']} ({state['tokens_seen']:,} tokens)")
    return state["step"], state["tokens_seen"], state["wandb_id"]


def step_members(run: Run, batch: dict[str, Tensor], step: int, total_steps: int, log_now: bool) -> dict[str, Any]:
    """One optimiser step of every member on its hookpoint's rows of `batch`; the log line of the
    step (every member's metrics, when `log_now`; they are also kept in `member.metrics`)."""
    cfg = run.cfg
    line: dict[str, Any] = {"step": step + 1}
    for member in run.members:
        x = run.layout.broadcast_rows(batch[member.input_site])  # bitwise-equal rows within a shard group
        target = run.layout.broadcast_rows(batch[member.hookpoint]) * member.output_scale if member.sae.cfg.transcode else None
        lr = lr_at(step, member.base_lr, cfg.lr_warmup_steps, total_steps, cfg.lr_decay_frac)
        try:
            out = training_step(member.sae, member.optimizer, x * member.input_scale, member.tokens_since_fired,
                                lr, cfg.grad_clip, target)
        except NonFiniteLossError as error:
            last = checkpoint.list_checkpoints(cfg.run_dir)
            raise NonFiniteLossError(
                f"{error} at step {step} (the SAE {member.name + ' ' if member.name else ''}at {member.hookpoint}); "
                f"stopped. Last good checkpoint: {last[-1] if last else 'none'}"
            ) from None
        if log_now:
            member.metrics = {**step_metrics(member.sae, out, member.tokens_since_fired), "lr": lr}
            line.update({member.key(name): value for name, value in member.metrics.items()})
    return line


def evaluate_members(run: Run, step: int) -> None:
    """The held-out eval of every member's evaluated SAE (kept in `member.eval_metrics`), logged on rank 0."""
    for member in run.members:
        sae = evaluation_sae(member)  # collective under sharding
        if run.info.is_main:
            # folded here with both scales (a transcoder's output has its own), so the scorer gets raw units
            member.eval_metrics = run.score_held_out(sae.folded(member.input_scale, member.output_scale), 1.0,
                                                     member.hookpoint)
    if run.log is not None:
        run.log.write({"step": step, **{m.key(k): v for m in run.members for k, v in m.eval_metrics.items()}})
    wait_for_main_rank(run.info)


def save_checkpoint(run: Run, step: int, tokens_seen: int) -> None:
    """A checkpoint of the whole run after `step` (every member, every rank's stream, the RNG), written
    by rank 0 piece by piece while the other ranks send their rows (collective: every rank calls it).
    A full or read-only disk stops the run with one line (`disk_errors`): the earlier checkpoints are
    intact (`checkpoint.save_checkpoint` writes a hidden folder, renamed into place when complete)."""
    cfg, info, members = run.cfg, run.info, run.members
    streams = gather_objects(run.stream.state_dict(), info)
    entries = [member_state(member) for member in members]
    chunks = itertools.chain.from_iterable(member_chunks for _, member_chunks, _ in entries)
    if info.is_main:
        rng_specs, rng_chunks = checkpoint.whole(checkpoint.rng_tensors())
        state = {
            "step": step, "tokens_seen": tokens_seen, "streams": streams, "world_size": info.world_size,
            "members": {member.name: member_state for member, (_, _, member_state) in zip(members, entries)},
            "wandb_id": run.log.run.id, "config": to_dict(cfg),
        }
        specs = [spec for member_specs, _, _ in entries for spec in member_specs] + rng_specs
        done = (f"{saved_in(members)} (only this checkpoint, needed to train on past step {step}, is missing)"
                if step == cfg.total_steps else f"the run stopped at step {step}")  # the last comes after the SAEs
        with disk_errors(f"could not write checkpoint {checkpoint.step_dir(cfg.run_dir, step)}",
                         lambda error: f"{done}; {how_to_resume(cfg, error)}"):
            checkpoint.save_checkpoint(cfg.run_dir, step, specs, itertools.chain(chunks, rng_chunks), state,
                                       cfg.keep_checkpoints)
    else:
        drain(chunks)
    wait_for_main_rank(info)


def save_members(run: Run, source, tokens_seen: int) -> None:
    """The final SAEs, folded to take raw activations, each in its folder (atomically) with its provenance.
    A full or read-only disk stops the run with one line naming the SAE, those saved and the last checkpoint."""
    cfg = run.cfg
    # What each replica's stream read of the text (its first rank reads for its shard group), so that an
    # eval on a dataset without a held-out split can skip exactly that (eval/data.py, rule 4).
    text_read = text_read_record(gather_objects(source.text_read(), run.info)[:: run.layout.shards], cfg.data)  # collective
    for member, init_seed in zip(run.members, cfg.member_seeds()):
        metadata = {
            **cfg.provenance(member.hookpoint), "tokens_trained": tokens_seen, "text_read": text_read,
            "run_name": cfg.run_name, "variant": member.name or None, "init_seed": init_seed,
            "final_metrics": final_metrics(member),
        }
        if run.log is not None and cfg.wandb_mode != "disabled":  # lets `python -m eval --wandb` add to this run
            metadata.update(wandb_run_id=run.log.run.id, wandb_project=cfg.wandb_project)
        saved = run.members[: run.members.index(member)]
        kept = f"{saved_in(saved)}; " if saved else ""
        with disk_errors(f"could not write the SAE {member.out_dir}", lambda error: kept + how_to_resume(cfg, error)):
            save_member(member, metadata)  # collective: rank 0 writes one ordinary SAE folder


def saved_in(members: list[Member]) -> str:
    """"the trained SAE is saved in RUN/HOOK" (or "SAEs are ... in A, B"), for the messages of a failed write."""
    folders = ", ".join(str(member.out_dir) for member in members)
    return f"the trained SAEs are saved in {folders}" if len(members) > 1 else f"the trained SAE is saved in {folders}"


def how_to_resume(cfg: TrainConfig, error: OSError) -> str:
    """After a write failed with `error` (of `files.DISK_ERRNOS`): the last checkpoint kept, and how to
    continue from it once the disk is fixed."""
    kept = checkpoint.list_checkpoints(cfg.run_dir)
    if not kept:
        return f"no checkpoint is kept: {disk_remedy(error, cfg.run_dir)} and rerun with --resume to start again from step 0"
    return (f"the last checkpoint kept is {kept[-1]}: {disk_remedy(error, cfg.run_dir)} and rerun with --resume "
            f"to continue from step {checkpoint.step_of(kept[-1])}")


def final_metrics(member: Member) -> dict[str, dict]:
    """cfg.json's `final_metrics`. `last_train_batch`: the last step's metrics (fvu, l0, dead_frac, ...)
    on that training batch, at the weights the step started from (schedule-free's y), not the saved
    SAE's. `held_out` (with `eval_every`): the held-out eval of the saved weights after the last step,
    its keys without the log's "eval/" prefix."""
    final = {"last_train_batch": dict(member.metrics)}
    if member.eval_metrics:
        final["held_out"] = {key.removeprefix("eval/"): value for key, value in member.eval_metrics.items()}
    return final


class RunLog:
    """Rank 0's record of a run: the wandb run, RUN_DIR/log.jsonl and the console, one line each time."""

    def __init__(self, cfg: TrainConfig, wandb_id: str | None, start_step: int):
        import wandb

        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.run_name, mode=cfg.wandb_mode, config=to_dict(cfg),
                              dir=str(cfg.run_dir), id=wandb_id, resume="allow")
        self.cfg, self.path = cfg, cfg.run_dir / "log.jsonl"
        if self.path.exists():  # a resumed run: drop what was logged after its checkpoint, it is about to be redone
            kept = _log_lines_up_to(self.path, start_step)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        self.file = open(self.path, "ab", buffering=0)  # unbuffered: a line that did not fit is not retried at exit

    def write(self, line: dict[str, Any]) -> None:
        self.run.log(line, step=line["step"])
        with disk_errors(f"could not write {self.path}",
                         lambda error: f"the run stopped at step {line['step']}; {how_to_resume(self.cfg, error)}"):
            self.file.write((json.dumps(line) + "\n").encode())
        tqdm.write(" ".join(f"{key}={_fmt(value)}" for key, value in line.items()))

    def close(self) -> None:
        """Close the log file and the wandb run (a stopped run; `finish` adds the final summary first)."""
        self.file.close()
        self.run.finish()

    def finish(self, members: list[Member], tokens_seen: int) -> None:
        for member in members:
            final = {**member.metrics, **member.eval_metrics}
            self.run.summary.update({f"final/{member.key(key)}": value for key, value in final.items()})
            if member.metrics:
                print(f"final{' ' + member.name if member.name else ''}: fvu={member.metrics['fvu']:.4f} "
                      f"l0={member.metrics['l0']:.1f} dead_frac={member.metrics['dead_frac']:.4f} tokens={tokens_seen:,}")
            print(f"saved SAE to {member.out_dir}")
        self.close()


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    current = to_dict(cfg)
    changed = sorted(key for key in current if key not in _RESUMABLE_CHANGES and current[key] != saved.get(key))
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed)
        raise UsageError(f"cannot resume from {path}: the config changed ({details})")


def _log_lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of log.jsonl `path` of steps <= `step`, without a last line cut short by a crash."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
