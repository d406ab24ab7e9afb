"""Peak memory of a training run on each device, estimated from the shapes before the SAEs are allocated.

    parameters   n_local (2 d_in + 1) + d_in floats per SAE (this rank's latents: n_latents / shard_latents)
    gradients    as many
    optimizer    two more (Adam: exp_avg, exp_avg_sq; schedule-free Adam: z, exp_avg_sq)
    step         the pre-activation chunk (kernels/sae_kernels/select.py bounds it for any batch) in the compute
                 dtype, the weights cast to it (bf16 mixed precision), the sparse codes and a few
                 (N, d_in) float32 tensors of one step (x, x_hat, residuals, gradients)
    shuffle      the shuffle block of every hookpoint's activations, and its shuffled copy
    LM           the loaded model's parameters (its forward's own activations are not counted)

Parameters, gradients, optimiser state and activations are float32 whatever the precision.
`check_fits` refuses a run whose estimate exceeds what the device has free, with the breakdown, before
anything of the SAE exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kernels.select import chunk_rows

from .batchtopk import FIRST_CANDIDATES_PER_K
from .config import SaeConfig
from .errors import UserError

FLOAT_BYTES = 4
STEP_ROW_TENSORS = 8
"""(N, d_in) float32 tensors alive at once in a step: x, its centred copy, x_hat, the residual, the AuxK
residual, and the gradients of the last three."""


class OutOfMemoryPlan(UserError):
    """The run's estimated peak memory exceeds what its device has free."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    step: int
    shuffle: int
    lm: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.step + self.shuffle + self.lm

    def summary(self) -> str:
        parts = [("SAE", self.parameters), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("step", self.step), ("shuffle buffer", self.shuffle), ("LM", self.lm)]
        return ", ".join(f"{name} {gib(size)}" for name, size in parts) + f"; total {gib(self.total)}"


def gib(size: int) -> str:
    """A size in GiB, or MiB below one GiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def estimate_memory(saes: list[tuple[SaeConfig, int]], batch_rows: int, hookpoint_widths: list[int], shuffle_rows: int,
                    lm_bytes: int, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    """The estimate for SAEs given as (config with d_in set, latents on this rank), each fed `batch_rows`
    rows per step and computing in `compute_dtype`, with `shuffle_rows` rows in the shuffle block of each
    hookpoint (their d_in: `hookpoint_widths`, one per hookpoint; SAEs of one hookpoint share its block).
    SAEs of a run step one after the other, so the step term is the largest SAE's, not their sum."""
    # W_enc, b_enc, W_dec rows; b_dec; a skip transcoder's W_skip (d_in x d_in) and BatchTopK's threshold,
    # whole on every rank
    parameters = sum(n_local * (2 * cfg.d_in + 1) + cfg.d_in + cfg.skip_connection * cfg.d_in**2
                     + (cfg.activation == "batchtopk") for cfg, n_local in saes) * FLOAT_BYTES
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    step = 0
    for cfg, n_local in saes:
        pre_activations = chunk_rows(batch_rows, n_local, device, compute_bytes) * n_local * compute_bytes
        # ComputeWeights (sae/model.py): a cast copy of W_enc, b_enc and W_dec unless already that dtype
        weight_copies = n_local * (2 * cfg.d_in + 1) * compute_bytes if compute_bytes != FLOAT_BYTES else 0
        # per row: k codes; the top 4k with Multi-TopK too; BatchTopK's first 4k candidates (more where a
        # row needs them: sae/batchtopk.py), gathered over the shards
        selected = 1 + 4 * cfg.multi_topk if cfg.activation == "topk" else FIRST_CANDIDATES_PER_K * (cfg.n_latents // n_local)
        codes = batch_rows * (selected * cfg.k + cfg.k_aux) * (FLOAT_BYTES + 8) * 3  # values, int64 ids, grads
        # + a transcoder's target, + a reconstruction per Matryoshka prefix
        rows = (STEP_ROW_TENSORS + cfg.transcode + len(cfg.matryoshka)) * batch_rows * cfg.d_in * FLOAT_BYTES
        step = max(step, pre_activations + weight_copies + codes + rows)
    shuffle = 2 * shuffle_rows * sum(hookpoint_widths) * FLOAT_BYTES
    return MemoryEstimate(parameters, parameters, 2 * parameters, step, shuffle, lm_bytes)


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free now: CUDA's free memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


TRAINING_REMEDY = "lower sae.n_latents or batch_size, or split the latents with --shard_latents under torchrun"


def check_fits(estimate, device: torch.device, free: int | None, run: str = "the run",
               remedy: str = TRAINING_REMEDY) -> str:
    """The line `run` prints about its memory; raises OutOfMemoryPlan, naming `remedy`, if it needs more
    than `free`. `estimate` has `total`, `lm` and `summary()` (a MemoryEstimate, or the fine-tune's).

    The LM is already loaded when this runs, so its bytes are not part of what must still fit."""
    line = f"memory per device ({device}, estimated): {estimate.summary()}"
    if free is None:
        return line
    needed = estimate.total - estimate.lm
    if needed > free:
        raise OutOfMemoryPlan(f"{run} needs about {gib(needed)} more on {device} but {gib(free)} is free "
                              f"({estimate.summary()}); {remedy}")
    return line + f"; {gib(free)} free"
