"""One full state of an SAE whatever its layout: what checkpoints hold and what is saved.

A run's SAE may be split by latents over ranks (sae/parallel.py); its checkpoint and its final
folder are nevertheless those of one ordinary SAE. `gather_full_state` collects the parameters, the
optimiser's state (Adam's exp_avg/exp_avg_sq, schedule-free's z, ...) and any latent-major tensor
(the dead-latent counters) into one full state dict on rank 0, in CPU memory and in pieces (no rank's
device ever holds a whole tensor it does not own), named as in a single-process run
(`SparseAutoencoder.state_dict()` keys, `checkpoint.optimizer_to_flat` names); `load_from_full_state`
slices such a dict back on every rank; `sae_from_full_state` makes the whole `SparseAutoencoder`.
For a process alone these are copies to the CPU and back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import checkpoint
from .config import SaeConfig
from .model import LATENT_MAJOR_PARAMETERS, PARAMETER_NAMES, SparseAutoencoder
from .parallel import ShardLayout


def _local_rows(sae: SparseAutoencoder, full: Tensor) -> Tensor:
    """This rank's rows of a latent-major tensor (n_latents, ...)."""
    if full.shape[0] != sae.cfg.n_latents:
        raise ValueError(f"expected a latent-major tensor with {sae.cfg.n_latents} rows, got shape {tuple(full.shape)}")
    return full[sae.latent_start : sae.latent_stop]


def _latent_major_state(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None,
                        extra: dict[str, Tensor] | None) -> list[tuple[str, Tensor, bool]]:
    """(full-state name, local tensor, latent-major?) in an order that is the same on every rank."""
    items = [(name, p, name in LATENT_MAJOR_PARAMETERS) for name, p in sae.named_parameters()]
    if optimizer is not None:
        sharded = {id(sae.get_parameter(name)) for name in LATENT_MAJOR_PARAMETERS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for param_id, p in enumerate(params):  # numbered as Optimizer.state_dict() numbers them
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, Tensor):
                    latent_major = id(p) in sharded and value.dim() > 0 and value.shape[0] == sae.n_local
                    items.append((f"optimizer.{param_id}.{key}", value, latent_major))
    for name, value in (extra or {}).items():
        if value.shape[:1] != (sae.n_local,):
            raise ValueError(f"extra tensor '{name}' must be latent-major with {sae.n_local} local rows, "
                             f"got shape {tuple(value.shape)}")
        items.append((name, value, True))
    return items


@torch.no_grad()
def gather_full_state(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, Tensor] | None = None, max_chunk_bytes: int = 1 << 28) -> dict[str, Tensor] | None:
    """One full state dict (CPU tensors) on rank 0, None on the other ranks.

    Keys: `encoder.weight`, `encoder.bias`, `W_dec`, `b_dec` (full shapes); with `optimizer`, its
    tensors as `optimizer.{param_id}.{key}` (`checkpoint.optimizer_to_flat`'s names: exp_avg and
    exp_avg_sq full, step as is); and each `extra` latent-major tensor (e.g. the dead-latent
    counters) by its name. Call it on every rank: replica 0's shard group gathers (in chunks of at
    most `max_chunk_bytes` per collective, so rank 0's device never holds a whole tensor), the other
    replicas hold identical copies and return at once.
    """
    layout = sae.layout
    items = _latent_major_state(sae, optimizer, extra)
    if layout.replica != 0:
        return None
    full = {}
    for name, tensor, latent_major in items:
        if latent_major:
            value = _gather_rows_to_rank0(tensor.detach(), layout, max_chunk_bytes)
        else:
            value = tensor.detach().cpu().clone() if layout.is_main else None
        if layout.is_main:
            full[name] = value
    return full if layout.is_main else None


def _gather_rows_to_rank0(local: Tensor, layout: ShardLayout, max_chunk_bytes: int) -> Tensor | None:
    if layout.shard_group is None:
        return local.cpu().clone()
    n_local, shards = local.shape[0], layout.shards
    row_bytes = max(1, local[:1].numel() * local.element_size())
    rows_per_chunk = max(1, max_chunk_bytes // (row_bytes * shards))
    full = torch.empty((shards * n_local, *local.shape[1:]), dtype=local.dtype) if layout.is_main else None
    for start in range(0, n_local, rows_per_chunk):
        chunk = local[start : start + rows_per_chunk].contiguous()
        pieces = [torch.empty_like(chunk) for _ in range(shards)] if layout.is_main else None
        dist.gather(chunk, pieces, dst=layout.shard_ranks[0], group=layout.shard_group)
        if layout.is_main:
            for shard, piece in enumerate(pieces):
                full[shard * n_local + start : shard * n_local + start + len(chunk)] = piece.cpu()
    return full


@torch.no_grad()
def load_from_full_state(sae: SparseAutoencoder, full: dict[str, Tensor],
                         optimizer: torch.optim.Optimizer | None = None, optimizer_meta: dict[str, Any] | None = None,
                         extra: dict[str, Tensor] | None = None) -> None:
    """Inverse of `gather_full_state`, on every rank, from a full state every rank has read (e.g.
    from the checkpoint file): no communication. Copies this rank's rows into the parameters, loads
    the optimizer's sliced state (`optimizer_meta`: `checkpoint.optimizer_to_flat`'s meta; by default
    the optimizer's own param_groups) and copies each `extra` name's rows into the given tensor."""
    def rows(name: str, latent_major: bool) -> Tensor:
        if name not in full:
            raise KeyError(f"the full state has no '{name}'")
        return (_local_rows(sae, full[name]) if latent_major else full[name]).clone()  # never alias `full`

    for name, parameter in sae.named_parameters():
        value = rows(name, name in LATENT_MAJOR_PARAMETERS)
        if value.shape != parameter.shape:
            raise ValueError(f"'{name}': the full state's shape {tuple(full[name].shape)} does not fit this SAE's cfg")
        parameter.copy_(value)
    if optimizer is not None:
        sharded = {id(sae.get_parameter(name)) for name in LATENT_MAJOR_PARAMETERS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tensors = {}
        for name, value in full.items():
            if name.startswith("optimizer."):
                param_id = int(name.split(".")[1])
                tensors[name] = rows(name, id(params[param_id]) in sharded and value.dim() > 0)
        meta = optimizer_meta or {"param_groups": optimizer.state_dict()["param_groups"], "scalars": {}}
        checkpoint.optimizer_from_flat(optimizer, tensors, meta)
    for name, target in (extra or {}).items():
        target.copy_(rows(name, True))


def sae_from_full_state(full: dict[str, Tensor], cfg: SaeConfig) -> SparseAutoencoder:
    """The whole `SparseAutoencoder` holding the full state's parameters (its tensors, no copy, no RNG drawn)."""
    sae = SparseAutoencoder(cfg, device="meta")
    sae.load_state_dict({name: full[name] for name in PARAMETER_NAMES}, assign=True)
    return sae
