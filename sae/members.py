"""The SAEs of one run ("members"): the single SAE of a plain run, or every variant of
`TrainConfig.variants`, each with its own optimiser, dead-latent counters, input scale and folder.

Under --shard_latents a member holds a sharded.ShardedSparseAutoencoder; the functions here hide
that difference from the training loop (gathering to rank 0 where a whole SAE is needed).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from . import checkpoint, sharded
from .config import TrainConfig
from .model import SparseAutoencoder
from .optim import make_optimizer, run_lr


@dataclass
class Member:
    """One SAE of a run: a run trains one (`cfg.sae` at `cfg.hookpoint`) or several (`cfg.variants`),
    all from the same activation batches, each with its own optimiser, counters and output folder."""

    name: str
    """"" for the single SAE of a plain run (unprefixed metrics and checkpoint names), else the variant's name."""

    hookpoint: str
    sae: Any
    """A SparseAutoencoder, or a sharded.ShardedSparseAutoencoder under --shard_latents."""

    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: Tensor
    """Tokens since each (local) latent last fired; dead when >= dead_tokens."""

    out_dir: Path
    """The final SAE folder."""

    input_scale: float = 1.0
    metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)

    def key(self, name: str) -> str:
        """Metric and checkpoint-tensor names: prefixed with the variant's name when there are several."""
        return f"{self.name}/{name}" if self.name else name


def build_members(cfg: TrainConfig, d_in_of: dict[str, int], layout: sharded.ShardLayout, device: torch.device) -> list[Member]:
    """The run's SAEs, each initialised from the seed alone (so a variant starts as its own single run would)."""
    specs = [(variant.name, variant.hookpoint or cfg.hookpoint, variant.sae_config(cfg.sae),
              variant.lr if variant.lr is not None else cfg.lr) for variant in cfg.variants]
    specs = specs or [("", cfg.hookpoint, cfg.sae, cfg.lr)]
    members = []
    for name, hookpoint, sae_cfg, lr in specs:
        sae_cfg = replace(sae_cfg, d_in=d_in_of[hookpoint])
        torch.manual_seed(cfg.seed)
        if layout.shards > 1:
            sae = sharded.ShardedSparseAutoencoder(sae_cfg, layout, device=device)
        else:
            sae = SparseAutoencoder(sae_cfg, device=device)
        base_lr = run_lr(lr, sae_cfg, cfg)
        optimizer = make_optimizer(cfg, sae.parameters(), base_lr)
        n_counters = sae.n_local if layout.shards > 1 else sae_cfg.n_latents
        out_dir = cfg.run_dir / (name or hookpoint)
        members.append(Member(name, hookpoint, sae, optimizer, base_lr,
                              torch.zeros(n_counters, dtype=torch.long, device=device), out_dir))
    return members


def member_state(member: Member, layout: sharded.ShardLayout) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Checkpoint tensors (named by `member.key`) and JSON state of a member; on rank 0 (None elsewhere).
    Collective under latent sharding: call it on every rank."""
    extra = {"tokens_since_fired": member.tokens_since_fired}
    if layout.shards > 1:
        full = sharded.gather_full_state(member.sae, member.optimizer, extra=extra)
        _, optimizer_meta = checkpoint.optimizer_to_flat(member.optimizer)
        if full is None:
            return None
        tensors = full
    else:
        optimizer_tensors, optimizer_meta = checkpoint.optimizer_to_flat(member.optimizer)
        tensors = {**member.sae.state_dict(), **optimizer_tensors, **extra}
    named = {member.key(name): tensor for name, tensor in tensors.items()}
    return named, {"input_scale": member.input_scale, "optimizer": optimizer_meta}


def load_member(member: Member, tensors: dict[str, Tensor], state: dict[str, Any], layout: sharded.ShardLayout) -> None:
    """Inverse of `member_state`, on every rank."""
    prefix = member.key("")
    own = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)} if prefix else tensors
    if layout.shards > 1:
        sharded.load_from_full_state(member.sae, own, member.optimizer, state["optimizer"],
                                     extra={"tokens_since_fired": member.tokens_since_fired})
    else:
        member.sae.load_state_dict({name: own[name] for name in member.sae.state_dict()})
        checkpoint.optimizer_from_flat(member.optimizer, own, state["optimizer"])
        member.tokens_since_fired.copy_(own["tokens_since_fired"])
    member.input_scale = state["input_scale"]


@contextmanager
def averaged_weights(member: Member) -> Iterator[None]:
    """Inside, the member's SAE holds the weights its optimiser evaluates: for schedule-free Adam the
    average x (its `eval()`), else the weights themselves. The swap back (`train()`) is not bitwise
    exact, so it is used only where every run of the same config does it at the same steps (held-out
    evals, the final save), never around checkpoints, which keep the training weights y."""
    swaps = hasattr(member.optimizer, "eval") and hasattr(member.optimizer, "train")
    if swaps:
        member.optimizer.eval()
    try:
        yield
    finally:
        if swaps:
            member.optimizer.train()


def evaluation_sae(member: Member, layout: sharded.ShardLayout) -> SparseAutoencoder | None:
    """A copy of the member's whole SAE as it is evaluated and saved (in training scale): its
    optimiser's evaluated weights (`averaged_weights`) with the decoder rows renormalised to unit
    norm. On rank 0 (None elsewhere); collective under latent sharding.

    Schedule-free Adam's average x is not on the unit sphere: with its y and z there, x's rows are
    1 to (2 - beta1) / beta1 long (`optim.set_decoder_rows_to_unit_norm`). Renormalising keeps the
    saved format's unit-norm decoder; the encoder is left as it is."""
    with averaged_weights(member):
        sae = full_sae(member, layout)
        sae = copy.deepcopy(sae) if sae is not None and layout.shards == 1 else sae
    if sae is not None and sae.cfg.normalize_decoder:
        sae.set_decoder_norm_to_unit_norm()
    return sae


def full_sae(member: Member, layout: sharded.ShardLayout) -> SparseAutoencoder | None:
    """The member's whole SAE (in training scale) on rank 0; collective under latent sharding."""
    if layout.shards == 1:
        return member.sae
    full = sharded.gather_full_state(member.sae)
    if full is None:
        return None
    sae = SparseAutoencoder(member.sae.cfg, device=member.tokens_since_fired.device)
    sae.load_state_dict(full)
    return sae
