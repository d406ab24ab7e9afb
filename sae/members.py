"""The SAEs of one run ("members"): the single SAE of a plain run, or every variant of
`TrainConfig.variants`, each with its own optimiser, dead-latent counters, input scale and folder.

Under --shard_latents a member holds a sharded.ShardedSparseAutoencoder; the functions here hide
that difference from the training loop (gathering to rank 0 where a whole SAE is needed).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from . import checkpoint, sharded
from .config import SaeConfig, TrainConfig
from .model import SparseAutoencoder


def default_lr(n_latents: int, k: int, optimizer: str, batch_size: int) -> float:
    """The learning rate when `lr` is not given; `batch_size` is the global batch (tokens per step).

    adam: Gao et al.'s 2e-4 / sqrt(n_latents / 2^14), whatever k and batch.
    schedule_free_adam: 1.6e-2 * (k / 16)^(1/4) * (batch_size / 4096)^(1/4), whatever the width. On the
    peer benchmark (README) 1.6e-2 was the best of 4e-3 ... 3.2e-2 at 2048 latents, k=16, batch 4096,
    and at 8192 latents it beat Gao et al.'s 1/sqrt(n_latents) scaling of it (8e-3). With the fitted
    encoder init, 2.26e-2 beat 1.6e-2 and 3.2e-2 (which degraded late) at k=64, and 1.6e-2 at k=32. At
    batch 16384, 2.26e-2 beat 1.6e-2 (and sparsify at 1M tokens); at batch 1024, 1.13e-2 and 1.6e-2 tied."""
    if optimizer == "adam":
        return 2e-4 / math.sqrt(n_latents / 2**14)
    if optimizer == "schedule_free_adam":
        return 1.6e-2 * (k / 16) ** 0.25 * (batch_size / 4096) ** 0.25
    raise ValueError(f"unknown optimizer '{optimizer}'")


def run_lr(lr: float | None, sae_cfg: SaeConfig, cfg: TrainConfig) -> float:
    """The learning rate an SAE of shape `sae_cfg` trains at in run `cfg`: `lr` if given, else `default_lr`."""
    return lr if lr is not None else default_lr(sae_cfg.n_latents, sae_cfg.k, cfg.optimizer, cfg.batch_size)


def make_optimizer(cfg: TrainConfig, parameters, lr: float) -> torch.optim.Optimizer:
    """The optimiser `cfg.optimizer` names, with its betas and eps, over `parameters`, at `lr` (the
    trainer sets the lr of every step itself: warmup, decay)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=cfg.adam_eps, fused=True)
    if cfg.optimizer == "schedule_free_adam":
        import schedulefree

        # Defazio et al. 2024, "The Road Less Scheduled": gradients are taken at y, an interpolation
        # between the Adam iterate z and the running average x, which is what gets evaluated.
        optimizer = schedulefree.AdamWScheduleFree(parameters, lr=lr, betas=betas, eps=cfg.adam_eps, weight_decay=0.0,
                                                   r=cfg.schedule_free_r)
        optimizer.train()
        return optimizer
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


@torch.no_grad()
def set_decoder_rows_to_unit_norm(sae, optimizer: torch.optim.Optimizer) -> None:
    """Renormalise the decoder rows after an optimiser step (Gao et al. 2024's unit-norm constraint).

    Under Adam the rows of `sae.W_dec` are the whole state. Schedule-free Adam (Defazio et al. 2024)
    holds two more points: the Adam iterate z (in its state) and the average x, implicit in
    y = beta1 * x + (1 - beta1) * z, the parameter in train mode. Renormalising y alone lets z's rows
    grow: the tangent-projected gradient is rescaled elementwise, so every step adds a radial part.
    Measured on a 20M-token run here, z's median row norm went 4 -> 11 while y stayed at 1, so the
    implied x, which is what is saved, shrank and then flipped sign (held-out fvu 0.09 -> 2.9). So x and
    z are each put back on the unit sphere, and y is rebuilt from them."""
    W_dec = sae.W_dec
    z = optimizer.state.get(W_dec, {}).get("z")
    if z is None:
        sae.set_decoder_norm_to_unit_norm()
        return
    [beta1] = {group["betas"][0] for group in optimizer.param_groups if any(p is W_dec for p in group["params"])}
    x = (W_dec - (1 - beta1) * z) / beta1
    tiny = torch.finfo(W_dec.dtype).eps
    x /= x.norm(dim=1, keepdim=True).clamp_min(tiny)
    z /= z.norm(dim=1, keepdim=True).clamp_min(tiny)
    W_dec.copy_(torch.lerp(x, z, 1 - beta1))


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

    An average of unit-norm rows is shorter than one; renormalising keeps the saved format's unit-norm
    decoder, and on the peer benchmark it is much better than the raw average: schedule-free Adam's
    held-out fvu at 2M tokens was 0.107 with it, 0.193 without."""
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
