"""The SAEs of one run ("members"): the single SAE of a plain run, or every variant of
`TrainConfig.variants`, each with its own optimiser, dead-latent counters, input scale and folder.

A member's SAE holds this rank's latents (`SparseAutoencoder(layout=)`: all of them unless the run
shards its latents). Checkpoints and the final save are written by rank 0 piece by piece as the
other ranks send their rows (sae/full_state.py), so no rank ever holds the whole SAE for them; a
held-out eval gathers the whole SAE's parameters (not its optimiser state) to rank 0's CPU memory.
The same code serves every layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from . import checkpoint
from .config import SaeConfig, TrainConfig, input_site
from .errors import UsageError
from .files import TensorSpec, atomic_folder
from .full_state import (drain, full_state_chunks, full_state_specs, gather_full_state, load_from_full_state,
                         sae_from_full_state)
from .folder import fold_scales, write_sae_folder
from .divergence import DeadLatentWatch, DivergenceWatch
from .model import SparseAutoencoder, normalize_rows_
from .optim import evaluated_rows, make_optimizer, run_lr
from .parallel import ShardLayout


@dataclass
class Member:
    """One SAE of a run: a run trains one (`cfg.sae` at `cfg.hookpoint`) or several (`cfg.variants`),
    all from the same activation batches, each with its own optimiser, counters and output folder."""

    name: str
    """"" for the single SAE of a plain run (unprefixed metrics and checkpoint names), else the variant's name."""

    hookpoint: str
    sae: SparseAutoencoder
    """This rank's part of the SAE (its latents, under `sae.layout`)."""

    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: Tensor
    """Tokens since each of this rank's latents last fired, (n_local,); dead when >= dead_tokens."""

    out_dir: Path
    """The final SAE folder."""

    input_scale: float = 1.0
    output_scale: float = 1.0
    """A transcoder's target (the module's output) is multiplied by its own scale; an SAE's is input_scale."""
    metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    divergence: DivergenceWatch = field(default_factory=DivergenceWatch)
    """Rank 0's watch on the logged training fvu (`divergence.py`)."""
    dead_watch: DeadLatentWatch = field(default_factory=DeadLatentWatch)
    """Rank 0's watch on the logged dead fraction (`divergence.py`)."""

    @property
    def input_site(self) -> str:
        """The activations the SAE reads: its hookpoint's output, a transcoder's module's input."""
        return input_site(self.hookpoint) if self.sae.cfg.transcode else self.hookpoint

    def key(self, name: str) -> str:
        """Metric and checkpoint-tensor names: prefixed with the variant's name when there are several."""
        return f"{self.name}/{name}" if self.name else name


def member_specs(cfg: TrainConfig, d_in_of: dict[str, int]) -> list[tuple[str, str, SaeConfig, float | None]]:
    """(name, hookpoint, SAE config with its d_in, lr or None) of each of the run's SAEs. A transcoder's
    module must take and give activations of one width (an MLP: d_model in and out)."""
    names_and_lrs = [(variant.name, variant.lr if variant.lr is not None else cfg.lr) for variant in cfg.variants]
    specs = []
    for (name, lr), (hookpoint, sae_cfg) in zip(names_and_lrs or [("", cfg.lr)], cfg.member_configs()):
        width = d_in_of[hookpoint]
        if sae_cfg.transcode and d_in_of[input_site(hookpoint)] != width:
            raise UsageError(f"a transcoder at '{hookpoint}' reads its input of width {d_in_of[input_site(hookpoint)]} "
                             f"and predicts its output of width {width}: transcoders here need one width (an MLP's "
                             "d_model in and out)")
        specs.append((name, hookpoint, replace(sae_cfg, d_in=width), lr))
    return specs


def build_members(cfg: TrainConfig, d_in_of: dict[str, int], layout: ShardLayout, device: torch.device,
                  compute_dtype: torch.dtype) -> list[Member]:
    """The run's SAEs, each initialised from its seed alone (`TrainConfig.member_seeds`: a variant starts as
    its own single run would, and every rank's latents are the slice of that init), training in `compute_dtype`
    (`distributed.resolve_precision` of cfg.precision, resolved once by the trainer)."""
    members = []
    for (name, hookpoint, sae_cfg, lr), out_dir, seed in zip(member_specs(cfg, d_in_of), cfg.sae_folders(),
                                                             cfg.member_seeds()):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(sae_cfg, device=device, layout=layout, compute_dtype=compute_dtype)
        base_lr = run_lr(lr, sae_cfg, cfg)
        optimizer = make_optimizer(cfg, sae.parameters(), base_lr)
        members.append(Member(name, hookpoint, sae, optimizer, base_lr,
                              torch.zeros(sae.n_local, dtype=torch.long, device=device), out_dir))
    return members


def member_state(member: Member) -> tuple[list[TensorSpec], Iterator[Tensor], dict[str, Any]]:
    """A member's checkpoint entries: the specs of its tensors (named by `member.key`), their pieces
    (`full_state_chunks`: on rank 0; a collective every rank must exhaust) and its JSON state."""
    extra = {"tokens_since_fired": member.tokens_since_fired}
    specs = [replace(spec, name=member.key(spec.name)) for spec in full_state_specs(member.sae, member.optimizer, extra)]
    chunks = (piece for _, piece in full_state_chunks(member.sae, member.optimizer, extra))
    _, optimizer_meta = checkpoint.optimizer_to_flat(member.optimizer)
    return specs, chunks, {"input_scale": member.input_scale, "output_scale": member.output_scale,
                           "optimizer": optimizer_meta}


def load_member(member: Member, tensors: Mapping[str, Tensor], state: dict[str, Any]) -> None:
    """Inverse of `member_state`, on every rank (each reads its rows)."""
    load_from_full_state(member.sae, tensors, member.optimizer, state["optimizer"],
                         extra={"tokens_since_fired": member.tokens_since_fired}, prefix=member.key(""))
    member.input_scale = state["input_scale"]
    member.output_scale = state.get("output_scale", state["input_scale"])  # checkpoints of SAEs before transcoders


def evaluated_weights(member: Member) -> Callable[[Tensor, slice], Tensor]:
    """How to read rows of the member's parameters as its optimiser evaluates them (for schedule-free
    Adam the average x, built in new memory: `optim.evaluated_rows`), for `full_state_chunks`. The
    training weights are never touched, so an eval or a save changes nothing of the run that follows."""
    return partial(evaluated_rows, member.optimizer)


def evaluation_sae(member: Member) -> SparseAutoencoder | None:
    """The member's whole SAE as it is evaluated (in training scale), in rank 0's CPU memory (None on
    the other ranks); the weights `save_member` writes. Collective: call it on every rank."""
    full = gather_full_state(member.sae, parameter_rows=evaluated_weights(member))  # new memory
    if full is None:
        return None
    if member.sae.cfg.normalize_decoder:
        normalize_rows_(full["W_dec"])
    return sae_from_full_state(full, member.sae.cfg)


def save_member(member: Member, metadata: dict[str, Any]) -> None:
    """Write the member's SAE folder (rank 0, as a whole: `files.atomic_folder`; collective: call it on
    every rank) piece by piece, so that no rank holds the whole SAE: its optimiser's evaluated weights
    (`evaluated_weights`), the decoder rows renormalised to unit norm, folded to take raw activations
    (`folder.fold_scales`).

    Schedule-free Adam's average x is not on the unit sphere: with its y and z there, x's rows are
    1 to (2 - beta1) / beta1 long (`optim.set_decoder_rows_to_unit_norm`). Renormalising keeps the
    saved format's unit-norm decoder; the encoder is left as it is."""
    sae = member.sae

    def folded(name: str, rows: Tensor) -> Tensor:
        if name == "W_dec" and sae.cfg.normalize_decoder:
            rows = normalize_rows_(rows.clone())  # a copy: the piece may be the training weights
        return fold_scales(name, rows, member.input_scale, member.output_scale)

    chunks = (folded(name, rows) for name, rows in full_state_chunks(sae, parameter_rows=evaluated_weights(member)))
    if sae.layout.is_main:  # the folder as a whole: never new weights beside an old cfg.json (a resumed run's)
        atomic_folder(member.out_dir, lambda tmp: write_sae_folder(tmp, sae.cfg, full_state_specs(sae), chunks,
                                                                   member.input_scale, metadata,
                                                                   output_scale=member.output_scale))
    else:
        drain(chunks)
