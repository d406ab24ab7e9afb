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

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import checkpoint
from .config import SaeConfig
from .files import TensorSpec
from .folder import parameter_names
from .model import LATENT_MAJOR_PARAMETERS, SparseAutoencoder
from .optim import rows_of


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


def full_state_specs(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None = None,
                     extra: dict[str, Tensor] | None = None) -> list[TensorSpec]:
    """Name, dtype and full shape of every tensor of the full state, in `full_state_chunks` order;
    the same on every rank, with no communication.

    Names: `encoder.weight`, `encoder.bias`, `W_dec`, `b_dec`; with `optimizer`, its tensors as
    `optimizer.{param_id}.{key}` (`checkpoint.optimizer_to_flat`'s names); each `extra` latent-major
    tensor (e.g. the dead-latent counters) by its name."""
    shards = sae.layout.shards
    return [TensorSpec(name, tensor.dtype, (tensor.shape[0] * shards, *tensor.shape[1:]) if latent_major else tuple(tensor.shape))
            for name, tensor, latent_major in _latent_major_state(sae, optimizer, extra)]


@torch.no_grad()
def full_state_chunks(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, Tensor] | None = None, max_chunk_bytes: int = 1 << 26,
                      parameter_rows: Callable[[Tensor, slice], Tensor] | None = None) -> Iterator[tuple[str, Tensor]]:
    """The full state as (name, CPU piece) pairs, on rank 0: each tensor of `full_state_specs` in
    consecutive row pieces of at most `max_chunk_bytes`, whole shard by whole shard. The other ranks
    of replica 0's shard group send their rows to rank 0 when their turn comes and yield nothing;
    other replicas, which hold identical copies, do nothing. Collective: every rank must exhaust it
    (`drain`). A piece may share memory with the training state (a process alone, on the CPU):
    copy before changing it. `parameter_rows(parameter, rows)`, if given, reads the parameters' pieces
    in place of `parameter[rows]` (the optimiser's evaluated weights: `optim.evaluated_rows`), one
    piece at a time, so they never exist whole on the device."""
    layout = sae.layout
    if layout.replica != 0:
        return
    parameters = {id(p) for p in sae.parameters()}
    for name, tensor, latent_major in _latent_major_state(sae, optimizer, extra):
        read = parameter_rows if parameter_rows is not None and id(tensor) in parameters else rows_of
        if not latent_major:
            if layout.is_main:
                yield name, read(tensor, slice(None)).cpu()
            continue
        row_bytes = max(1, tensor[:1].numel() * tensor.element_size())
        rows_per_chunk = max(1, max_chunk_bytes // row_bytes)
        for shard, rank in enumerate(layout.shard_ranks):
            for start in range(0, tensor.shape[0], rows_per_chunk):
                rows = read(tensor, slice(start, start + rows_per_chunk))
                if layout.is_main and shard == 0:
                    yield name, rows.cpu()
                elif layout.is_main:
                    received = torch.empty_like(rows, memory_format=torch.contiguous_format)
                    dist.recv(received, src=rank, group=layout.shard_group)
                    yield name, received.cpu()
                elif layout.shard == shard:
                    dist.send(rows.contiguous(), dst=layout.shard_ranks[0], group=layout.shard_group)


def drain(chunks: Iterable) -> None:
    """Run a collective iterator (`full_state_chunks`) to its end, discarding what it yields."""
    for _ in chunks:
        pass


def gather_full_state(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, Tensor] | None = None,
                      parameter_rows: Callable[[Tensor, slice], Tensor] | None = None) -> dict[str, Tensor] | None:
    """The full state (see `full_state_specs`; parameters read by `parameter_rows` as in
    `full_state_chunks`) as one dict of CPU tensors on rank 0 (new memory, never the training state's),
    None on the other ranks. Collective: call it on every rank. Checkpoints and saves do not use it:
    they write `full_state_chunks` piece by piece (never the whole state at once)."""
    pieces: dict[str, list[Tensor]] = {}
    for name, piece in full_state_chunks(sae, optimizer, extra, parameter_rows=parameter_rows):
        pieces.setdefault(name, []).append(piece)
    if not sae.layout.is_main:
        return None
    return {name: torch.cat(parts) if parts[0].dim() else parts[0].clone() for name, parts in pieces.items()}


@torch.no_grad()
def load_from_full_state(sae: SparseAutoencoder, full: Mapping[str, Tensor],
                         optimizer: torch.optim.Optimizer | None = None, optimizer_meta: dict[str, Any] | None = None,
                         extra: dict[str, Tensor] | None = None, prefix: str = "") -> None:
    """Inverse of `gather_full_state`, on every rank, from a full state every rank can read (a dict,
    or a checkpoint file's `checkpoint.CheckpointTensors`, from which only this rank's rows are
    read): no communication. Copies this rank's rows into the parameters, loads the optimizer's sliced
    state (`optimizer_meta`: `checkpoint.optimizer_to_flat`'s meta; by default the optimizer's own
    param_groups) and copies each `extra` name's rows into the given tensor. Names are looked up
    with `prefix` before them (a variant's checkpoint entries)."""
    def shape(name: str) -> tuple[int, ...]:
        return full.shapes[name] if isinstance(full, checkpoint.CheckpointTensors) else tuple(full[name].shape)

    def rows(name: str, latent_major: bool) -> Tensor:
        key = prefix + name
        if key not in full:
            raise KeyError(f"the full state has no '{key}'")
        if not latent_major:
            return full[key].clone()  # never alias `full`
        if shape(key)[0] != sae.cfg.n_latents:
            raise ValueError(f"'{key}': expected {sae.cfg.n_latents} latent rows, the full state has shape {shape(key)}")
        if isinstance(full, checkpoint.CheckpointTensors):
            return full.rows(key, sae.latent_start, sae.latent_stop)
        return full[key][sae.latent_start : sae.latent_stop].clone()

    for name, parameter in sae.named_parameters():
        value = rows(name, name in LATENT_MAJOR_PARAMETERS)
        if value.shape != parameter.shape:
            raise ValueError(f"'{prefix + name}': the full state's shape {shape(prefix + name)} does not fit this SAE's cfg")
        parameter.copy_(value)
    if optimizer is not None:
        sharded = {id(sae.get_parameter(name)) for name in LATENT_MAJOR_PARAMETERS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tensors = {}
        for key in full:
            name = key[len(prefix):]
            if key.startswith(prefix) and name.startswith("optimizer."):
                param_id = int(name.split(".")[1])
                tensors[name] = rows(name, id(params[param_id]) in sharded and len(shape(key)) > 0)
        meta = optimizer_meta or {"param_groups": optimizer.state_dict()["param_groups"], "scalars": {}}
        checkpoint.optimizer_from_flat(optimizer, tensors, meta)
    for name, target in (extra or {}).items():
        target.copy_(rows(name, True))


def sae_from_full_state(full: dict[str, Tensor], cfg: SaeConfig) -> SparseAutoencoder:
    """The whole `SparseAutoencoder` holding the full state's parameters (its tensors, no copy, no RNG drawn)."""
    sae = SparseAutoencoder(cfg, device="meta")
    sae.load_state_dict({name: full[name] for name in parameter_names(cfg)}, assign=True)
    return sae
