"""The latent-major (CSC) view of TopK activations, shared by the eager and the Triton backward.

A TopK layer's activations are a sparse (N, n_latents) matrix stored row-major as `indices` (N, K): row
n has entries (n, indices[n, j]). Gradients of W_enc and W_dec are sums *per latent* of rows of a dense
(N, d) matrix, so both backends first regroup the entries by latent: a stable sort of the flattened
indices gives, for each latent i, the contiguous run of entries that name it. The sums can then be
written latent by latent with no atomics and in a fixed order (deterministic), never forming (N, n).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor


class LatentMajor(NamedTuple):
    """Entries of an (N, K) index set, grouped by latent. Entry e is position e of the flattened
    (row-major) index set."""

    perm: Tensor
    """(E,) int64: entries sorted by latent (stable, so each run keeps batch order)."""

    rows: Tensor
    """(E,) int64: batch row of each sorted entry, rows[t] = row of entry perm[t]."""

    offsets: Tensor
    """(n_latents + 1,) int64: latent i owns sorted positions offsets[i] .. offsets[i+1] - 1."""


# Facts derived from an index tensor (its range check, latent-major view, support), kept while the
# tensor lives and is not modified in place: one training step asks for each of them several times
# (the decoder's and the encoder's backward both regroup the same TopK indices by latent).
_memos: dict[int, tuple[weakref.ref, int, dict]] = {}


def memo(indices: Tensor) -> dict[Any, Any]:
    """A dict for caching facts about `indices`; empty again once the tensor is modified in place."""
    key = id(indices)
    entry = _memos.get(key)
    if entry is not None and entry[0]() is indices and entry[1] == indices._version:
        return entry[2]

    def forget(ref, key=key):
        if _memos.get(key, (None,))[0] is ref:
            del _memos[key]

    facts: dict[Any, Any] = {}
    _memos[key] = (weakref.ref(indices, forget), indices._version, facts)
    return facts


def latent_major(indices: Tensor, n_latents: int) -> LatentMajor:
    """Group the entries of `indices` (N, K) int64 by latent (memoised per index tensor)."""
    facts = memo(indices)
    if ("latent_major", n_latents) not in facts:
        flat = indices.reshape(-1)
        _, perm = torch.sort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_latents)
        offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        rows = torch.div(perm, indices.shape[1], rounding_mode="floor")
        facts[("latent_major", n_latents)] = LatentMajor(perm, rows, offsets)
    return facts[("latent_major", n_latents)]


def check_indices(indices: Tensor, n_rows: int, name: str = "indices") -> None:
    """Raise if `indices` is not an int64 (N, K) tensor with entries in [0, n_rows).

    The range check reads the tensor back, so it is skipped for CUDA tensors (no host sync in a step),
    and done once per tensor (indices from topk_encode are marked checked when they are made).
    """
    if indices.dtype != torch.int64 or indices.dim() != 2:
        raise ValueError(f"{name} must be an int64 (N, K) tensor, got {indices.dtype} with shape {tuple(indices.shape)}")
    if indices.numel() and not indices.is_cuda:
        facts = memo(indices)
        if facts.get(("in_range", n_rows)):
            return
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= n_rows:
            raise IndexError(f"{name} must lie in [0, {n_rows}), found values in [{low}, {high}]")
        facts[("in_range", n_rows)] = True


def mark_in_range(indices: Tensor, n_rows: int) -> None:
    """Record that `indices` lie in [0, n_rows) (they were just produced by a top-k over n_rows)."""
    if not indices.is_cuda:
        memo(indices)[("in_range", n_rows)] = True
