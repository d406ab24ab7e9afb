"""The optimiser side of a training step, for every layout of the SAE (sae/parallel.py): the
learning rate (the default rule and the schedule), the optimiser itself, and the pieces of the update
that `trainer.training_step` runs after a forward (the loss check, the clip, unit-norm decoder rows).

A leaf of the trainer: it imports only the config, the collectives and the model's row normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import SaeConfig, TrainConfig
from .distributed import every_rank
from .errors import UserError
from .model import normalize_rows_


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops without writing a checkpoint."""


def default_lr(n_latents: int, k: int, optimizer: str, batch_size: int) -> float:
    """The learning rate when `lr` is not given; `batch_size` is the global batch (tokens per step).

    adam: Gao et al.'s 2e-4 / sqrt(n_latents / 2^14), whatever k and batch.
    schedule_free_adam: 1.6e-2 * (k / 16)^(1/4) * (batch_size / 4096)^(1/4), whatever the width (no
    1/sqrt(n_latents) factor, unlike the adam rule). The constant and both exponents were chosen on the
    peer benchmark (docs/peers.md, "The learning-rate rule")."""
    if optimizer == "adam":
        return 2e-4 / math.sqrt(n_latents / 2**14)
    if optimizer == "schedule_free_adam":
        return 1.6e-2 * (k / 16) ** 0.25 * (batch_size / 4096) ** 0.25
    raise ValueError(f"unknown optimizer '{optimizer}'")


LR_RULE_MEASURED_LATENTS = 8192
LR_RULE_MEASURED_BATCH = 16384
"""The widest SAE and the largest batch the schedule-free rule of `default_lr` was measured at (docs/peers.md)."""


def lr_rule_note(sae_cfg: SaeConfig, cfg: TrainConfig) -> str | None:
    """A one-line note when `default_lr`'s schedule-free rule is applied to a wider SAE or a larger batch than
    it was measured at (None otherwise, or for Adam's rule)."""
    if cfg.optimizer != "schedule_free_adam" or (sae_cfg.n_latents <= LR_RULE_MEASURED_LATENTS
                                                 and cfg.batch_size <= LR_RULE_MEASURED_BATCH):
        return None
    lr = default_lr(sae_cfg.n_latents, sae_cfg.k, cfg.optimizer, cfg.batch_size)
    return (f"note: the default lr {lr:.3g} comes from a rule measured up to {LR_RULE_MEASURED_LATENTS:,} latents and "
            f"batch {LR_RULE_MEASURED_BATCH:,}; this SAE has {sae_cfg.n_latents:,} latents at batch {cfg.batch_size:,}, "
            "and at 32,768 latents (batch 32,768) and 131,072 latents (batch 4,096) half the rule's lr trained "
            "better (docs/peers.md, \"The learning-rate rule\"); pass --lr to set one")


def run_lr(lr: float | None, sae_cfg: SaeConfig, cfg: TrainConfig) -> float:
    """The learning rate an SAE of shape `sae_cfg` trains at in run `cfg`: `lr` if given, else `default_lr`."""
    return lr if lr is not None else default_lr(sae_cfg.n_latents, sae_cfg.k, cfg.optimizer, cfg.batch_size)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, decay_frac: float) -> float:
    """The lr of step `step` (0-based) of `total_steps`: linear warmup over `warmup_steps`, constant,
    then a linear decay over the last d = int(decay_frac * total_steps) steps, base_lr * (d, d - 1,
    ..., 1) / d: the last step still runs at base_lr / d (0 would be a step that does nothing)."""
    scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = int(decay_frac * total_steps)
    if decay_steps > 0:
        scale = min(scale, (total_steps - step) / decay_steps)
    return base_lr * scale


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
                                                   r=1.0 if cfg.schedule_free_r is None else cfg.schedule_free_r)
        optimizer.train()
        return optimizer
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


def check_loss_is_finite(loss: Tensor) -> None:
    """Raise `NonFiniteLossError` if the loss is NaN or infinite on any rank. Every rank decides
    together, so none is left waiting in a collective."""
    losses = every_rank(loss)
    if bad := [rank for rank, value in enumerate(losses) if not math.isfinite(value)]:
        where = f" on rank {', '.join(map(str, bad))} of {len(losses)}" if len(losses) > 1 else ""
        raise NonFiniteLossError(f"loss is {losses[bad[0]]}{where}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the trainer sets each step's: warmup, decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm_(sae, max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole SAE, whatever its layout (under latent
    sharding the norm covers every shard's rows, the replicated b_dec and W_skip once). Returns the
    norm before clipping."""
    with_grad = [p for p in sae.parameters() if p.grad is not None]
    replicated = [p is sae.b_dec or p is sae.W_skip for p in with_grad]
    total = sae.layout.gradient_norm([p.grad for p in with_grad], replicated)
    torch.nn.utils.clip_grads_with_norm_(sae.parameters(), max_norm, total)
    return total


def rows_of(tensor: Tensor, rows: slice) -> Tensor:
    """`tensor[rows]` detached, or a 0-dim tensor (an optimiser's step count, BatchTopK's threshold) itself."""
    return tensor.detach()[rows] if tensor.dim() else tensor.detach()


@torch.no_grad()
def evaluated_rows(optimizer: torch.optim.Optimizer, parameter: Tensor, rows: slice = slice(None)) -> Tensor:
    """`parameter[rows]` as the optimiser evaluates it, never changing the parameter.

    Schedule-free Adam (in train mode) holds y, where gradients are taken, as the parameter and its
    iterate z in its state; it evaluates the average x of y = (1 - beta1) z + beta1 x, so
    x = (y - (1 - beta1) z) / beta1, written as the library's `eval()` writes it in place,
    lerp(y, z, 1 - 1 / beta1): the same bits, in new memory. Its `eval()` then `train()` would change
    y by an ulp, so a run that evaluates at a step where another does not would train on differently.
    Any other optimiser (or schedule-free Adam in eval mode, or before its first step) evaluates the
    parameter itself: its rows are returned (a view, not a copy)."""
    group = next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))
    z = optimizer.state.get(parameter, {}).get("z")
    y = rows_of(parameter, rows)
    if z is None or not group.get("train_mode", False):
        return y
    return torch.lerp(y, z[rows], 1 - 1 / group["betas"][0])


@torch.no_grad()
def set_decoder_rows_to_unit_norm(sae, optimizer: torch.optim.Optimizer) -> None:
    """Renormalise the decoder rows after an optimiser step (Gao et al. 2024's unit-norm constraint).

    Under Adam the rows of `sae.W_dec` are the whole state. Schedule-free Adam (Defazio et al. 2024)
    holds two more points: the Adam iterate z (in its state) and the average x, implicit in
    y = beta1 * x + (1 - beta1) * z, the parameter in train mode (where gradients are taken).
    Renormalising y alone would let z's rows grow: the tangent-projected gradient is rescaled
    elementwise, so every step adds a radial part, and over a long run the implied
    x = (y - (1 - beta1) z) / beta1, which is what is saved, shrinks and then flips sign.

    So z's rows are renormalised too. y and z on the unit sphere keep x's rows between 1 and
    (2 - beta1) / beta1 in norm (the saved SAE renormalises them). y rather than x is held at unit norm
    because y is the decoder the loss sees: rebuilt from unit-norm x and z it would be shorter than one,
    which trains worse SAEs. docs/peers.md ("Longer horizon") has the measurements of both."""
    z = optimizer.state.get(sae.W_dec, {}).get("z")
    if z is not None:
        normalize_rows_(z)
    sae.set_decoder_norm_to_unit_norm()
