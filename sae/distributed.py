"""The torchrun job as processes: joining it (NCCL on GPUs, gloo on CPU), a rank's device, barriers,
gathering small objects, and the waits while rank 0 alone does slow work.

How the SAE itself is split over the ranks (data parallel, latent shards) and the collectives of a
training step are sae/parallel.py's `ShardLayout`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


# How long the other ranks wait while rank 0 alone does slow work: writing a checkpoint (a 1M-latent
# SAE with its Adam state is ~19 GB), held-out evals, starting or finishing its wandb run.
MAIN_RANK_WORK_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    main_rank_wait_group: Any = field(default=None, compare=False, repr=False)
    """A gloo group of every rank with the long MAIN_RANK_WORK_TIMEOUT, for `wait_for_main_rank`."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """"auto" is this rank's GPU (by LOCAL_RANK) when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype `precision` ("auto" | "fp32" | "bf16") means on `device` (TrainConfig.precision)."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def init_distributed(timeout_s: float = 300) -> DistInfo:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    The device is chosen from LOCAL_RANK, never from the global rank, so multi-node jobs work.
    `timeout_s` bounds how long a collective waits for a rank that died, so the others exit.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    # On CPU (gloo) whatever the main backend: NCCL's watchdog would abort a long wait on the GPU.
    wait_group = dist.new_group(backend="gloo", timeout=MAIN_RANK_WORK_TIMEOUT)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    main_rank_wait_group=wait_group)


def all_reduce_max(tensor: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value` (JSON-able), in rank order."""
    if not info.enabled:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wait_for_main_rank(info: DistInfo) -> None:
    """The barrier after work rank 0 does alone (a checkpoint write, evals, wandb): bounded by
    MAIN_RANK_WORK_TIMEOUT rather than the collective timeout, so a slow disk does not kill a healthy
    run. A rank that dies meanwhile still ends the job at once (torchrun stops the others)."""
    if info.enabled:
        dist.barrier(group=info.main_rank_wait_group)


def every_rank(value: Tensor) -> list[float]:
    """Each rank's scalar `value`, in rank order, on every rank: a collective over the whole job
    (`[value]` when running alone). Used where all ranks must take the same decision."""
    value = value.detach().float().reshape(1)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value.tolist()
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value)
    return torch.cat(parts).tolist()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
