"""Eager torch twins of the Triton kernels: the CPU path, with the same semantics.

Every function here is one sparse primitive of the TopK SAE step. A pair (weights (N, K), indices
(N, K) int64) stands for the sparse (N, n) matrix S with S[n, indices[n, j]] += weights[n, j]. The
primitives never form an (N, n_latents) tensor:

    gather_rows(w, idx, table)         S @ table                    (N, d)   decode forward; encoder dx
    row_dots(grad, table, idx)         (grad @ table^T)[n, idx]     (N, K)   gradient of the values
    scatter_rows(w, idx, src, n)       S^T @ src, S^T 1             (n, d)   dW_dec, dW_enc (+ db_enc)
    aux_residual(w, idx, table, e)     e - S @ table, its sum of squares     AuxK forward

Half-precision inputs are computed in float32 (the Triton kernels accumulate in float32 too) and the
results cast back; float64 stays float64, which is what the tests compare against.

An index set that is dense over the few latents it touches (AuxK: k_aux = 512 of ~1,200 dead latents)
is better served by a dense matmul restricted to those latents than by row gathers: the "support" path
below builds an (N, u) block where u <= K / DENSE_MIN_DENSITY distinct latents are touched, so its size
stays proportional to the sparse data, never to n_latents.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .csc import latent_major, memo

DENSE_MIN_K = 64
"""Index sets with fewer entries per row always take the sparse path (no support count needed)."""

DENSE_MIN_DENSITY = 0.125
"""Take the support path when K >= DENSE_MIN_DENSITY * (number of distinct latents touched)."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the dtype itself for float32/float64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Support:
    """The u distinct latents an index set touches, and each entry's position among them."""

    def __init__(self, latents: Tensor, local: Tensor):
        self.latents = latents  # (u,) int64, distinct
        self.local = local  # (N, K) int64 in [0, u)

    def block(self, weights: Tensor, dtype: torch.dtype) -> Tensor:
        """The pair as a dense (N, u) matrix (repeated entries in a row add up)."""
        out = torch.zeros(self.local.shape[0], len(self.latents), dtype=dtype, device=weights.device)
        return out.scatter_add_(1, self.local, weights.to(dtype))


def _support(indices: Tensor, n_latents: int) -> _Support | None:
    """The support of `indices` when the pair is dense enough over it to use matmuls, else None.
    Memoised per index tensor: an AuxK step asks three times (its forward, values' grad, W_dec's)."""
    k = indices.shape[1]
    if k < DENSE_MIN_K or indices.shape[0] == 0:
        return None
    facts = memo(indices)
    if ("support", n_latents) not in facts:
        present = torch.bincount(indices.reshape(-1), minlength=n_latents) > 0
        support = None
        if k >= DENSE_MIN_DENSITY * int(present.sum()):
            position = torch.cumsum(present, 0) - 1
            support = _Support(present.nonzero().squeeze(1), position[indices])
        facts[("support", n_latents)] = support
    return facts[("support", n_latents)]


def gather_rows(weights: Tensor, indices: Tensor, table: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """sum_j weights[:, j] * table[indices[:, j]]  ->  (N, d).

    weights (N, K), indices (N, K) int64; table (n, d). Result in `out_dtype` (default table.dtype),
    accumulated in acc_dtype(table.dtype).
    """
    n_rows = indices.shape[0]
    dtype = acc_dtype(table.dtype)
    tab = table.to(dtype)
    if indices.shape[1] == 0:
        out = torch.zeros(n_rows, table.shape[1], dtype=dtype, device=table.device)
    elif (support := _support(indices, table.shape[0])) is not None:
        out = support.block(weights, dtype) @ tab[support.latents]
    else:
        out = F.embedding_bag(indices, tab, per_sample_weights=weights.to(dtype), mode="sum")
    return out.to(out_dtype or table.dtype)


def row_dots(grad: Tensor, table: Tensor, indices: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[n, j] = <grad[n], table[indices[n, j]]>  ->  (N, K): the sampled product (grad @ table^T)[n, idx].

    grad (N, d) with any strides; table (n, d); indices (N, K) int64.
    """
    dtype = acc_dtype(table.dtype)
    n_rows, k = indices.shape
    if k == 0 or n_rows == 0:
        return torch.zeros(n_rows, k, dtype=out_dtype or table.dtype, device=table.device)
    grad = grad.to(dtype)
    tab = table.to(dtype)
    support = _support(indices, table.shape[0])
    if support is not None:
        out = (grad @ tab[support.latents].t()).gather(1, support.local)
    elif k >= table.shape[0]:  # more entries per row than rows in the table (repeats): CSR can't hold them
        out = (grad @ tab.t()).gather(1, indices)
    else:
        out = _sampled_dots(grad, tab, indices)
    return out.to(out_dtype or table.dtype)


def _sampled_dots(grad: Tensor, tab: Tensor, indices: Tensor) -> Tensor:
    """Sparse path of row_dots: torch's CSR sampled matmul (SDDMM) with the pattern of `indices`.

    CSR wants increasing column indices in each row, so sort each row's indices (N x K, cheap) and
    put the results back in the caller's order.
    """
    n_rows, k = indices.shape
    sorted_idx, order = indices.sort(dim=1)
    crow = torch.arange(0, n_rows * k + 1, k, device=indices.device)
    pattern_values = torch.ones(n_rows * k, dtype=tab.dtype, device=tab.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, sorted_idx.reshape(-1), pattern_values, size=(n_rows, tab.shape[0]), check_invariants=False
        )
        sampled = torch.sparse.sampled_addmm(pattern, grad.contiguous(), tab.t(), beta=0.0)
    values = sampled.values().view(n_rows, k)
    return torch.empty_like(values).scatter_(1, order, values)


def scatter_rows(
    weights: Tensor,
    indices: Tensor,
    src: Tensor,
    n_latents: int,
    want_rows: bool = True,
    want_sums: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Per-latent sums: rows[i] = sum of weights[n, j] * src[n] over entries with indices[n, j] = i,
    and sums[i] = sum of those weights.  ->  (rows (n, d) in out_dtype or src.dtype, sums (n,) float32/64).

    The transposed sparse product S^T @ src (and S^T 1). A sparse pair goes latent by latent through
    the latent-major view (an embedding_bag with one bag per latent), a dense one through a matmul.
    """
    dtype = acc_dtype(src.dtype)
    device = src.device
    rows = sums = None
    empty = indices.shape[1] == 0
    support = None if empty else _support(indices, n_latents)
    if want_rows:
        src_acc = src.to(dtype).contiguous()
        if empty or support is not None:
            rows = torch.zeros(n_latents, src.shape[1], dtype=dtype, device=device)
        else:
            view = latent_major(indices, n_latents)
            sorted_weights = weights.to(dtype).reshape(-1)[view.perm]
            rows = F.embedding_bag(view.rows, src_acc, view.offsets, per_sample_weights=sorted_weights, mode="sum",
                                   include_last_offset=True)
    if want_sums:
        sums = torch.zeros(n_latents, dtype=dtype, device=device)
        if not empty and support is None:
            sums.index_add_(0, indices.reshape(-1), weights.to(dtype).reshape(-1))
    if support is not None:
        block = support.block(weights, dtype)
        if want_rows:
            rows.index_add_(0, support.latents, block.t() @ src_acc)
        if want_sums:
            sums.index_add_(0, support.latents, block.sum(0))
    if rows is not None:
        rows = rows.to(out_dtype or src.dtype)
    return rows, sums


def aux_residual(values: Tensor, indices: Tensor, table: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """diff = residual - sum_j values[:, j] table[indices[:, j]]  (N, d) and sum(diff^2), both in acc dtype."""
    dtype = acc_dtype(table.dtype)
    diff = residual.to(dtype) - gather_rows(values, indices, table, out_dtype=dtype)
    return diff, diff.pow(2).sum()
