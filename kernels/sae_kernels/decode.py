"""Triton kernels of the sparse decoder: the row gather (forward) and the row dot products (values' grad).

    gather_rows:  out[n] = sum_j w[n, j] * table[idx[n, j]]        one program per (row, block of d)
    row_dots:     out[n, j] = <grad[n], table[idx[n, j]]>           one program per (row, block of K)

Table rows are contiguous, so each program loads (BLOCK_K, BLOCK_D) tiles of whole row segments:
coalesced along d. Loads are cast to float32 before any arithmetic (fp32 accumulation; bf16/fp16
inputs are only ever loaded and stored), results are cast to the output's dtype on store. The gather
also serves the encoder's input gradient (S @ W_enc). Block sizes are fixed (no autotuning, which
needs a real GPU timer: the interpreter has none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_K = 16
MAX_BLOCK_D = 256


def block_d(d: int) -> int:
    """Columns per program: the whole row up to MAX_BLOCK_D."""
    return min(MAX_BLOCK_D, triton.next_power_of_2(max(d, 1)))


@triton.jit
def gather_segment(
    w_ptr, idx_ptr, table_ptr, row, cols, col_ok, K, stride_w, stride_idx, stride_table,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """sum_j w[row, j] * table[idx[row, j], cols] as a float32 (BLOCK_D,) vector."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        idx = tl.load(idx_ptr + row * stride_idx + ks, mask=k_ok, other=0)
        w = tl.load(w_ptr + row * stride_w + ks, mask=k_ok, other=0.0).to(tl.float32)
        tile = tl.load(
            table_ptr + idx[:, None] * stride_table + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile * w[:, None], axis=0)
    return acc


@triton.jit
def _gather_rows_kernel(
    w_ptr, idx_ptr, table_ptr, out_ptr,
    K, D,
    stride_w, stride_idx, stride_table, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = gather_segment(
        w_ptr, idx_ptr, table_ptr, row, cols, col_ok, K, stride_w, stride_idx, stride_table, BLOCK_K, BLOCK_D
    )
    tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _row_dots_kernel(
    grad_ptr, table_ptr, idx_ptr, out_ptr,
    K, D,
    stride_grad_n, stride_grad_d, stride_table, stride_idx, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    idx = tl.load(idx_ptr + row * stride_idx + ks, mask=k_ok, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(grad_ptr + row * stride_grad_n + cols * stride_grad_d, mask=col_ok, other=0.0).to(tl.float32)
        tile = tl.load(
            table_ptr + idx[:, None] * stride_table + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile * g[None, :], axis=1)
    tl.store(out_ptr + row * stride_out + ks, acc.to(out_ptr.dtype.element_ty), mask=k_ok)


def _row_major(table: Tensor) -> Tensor:
    """The kernels index table rows with a row stride and unit column stride."""
    return table if table.stride(1) == 1 else table.contiguous()


def gather_rows(weights: Tensor, indices: Tensor, table: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """sum_j weights[:, j] * table[indices[:, j]]  ->  (N, d). See eager.gather_rows."""
    n_rows, d = indices.shape[0], table.shape[1]
    if indices.shape[1] == 0 or n_rows == 0:
        return torch.zeros(n_rows, d, dtype=out_dtype or table.dtype, device=table.device)
    weights, indices, table = weights.contiguous(), indices.contiguous(), _row_major(table)
    out = torch.empty(n_rows, d, dtype=out_dtype or table.dtype, device=table.device)
    bd = block_d(d)
    _gather_rows_kernel[(n_rows, triton.cdiv(d, bd))](
        weights, indices, table, out,
        indices.shape[1], d,
        weights.stride(0), indices.stride(0), table.stride(0), out.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_D=bd,
    )
    return out


def row_dots(grad: Tensor, table: Tensor, indices: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[n, j] = <grad[n], table[indices[n, j]]>  ->  (N, K); grad may have any strides (even 0)."""
    n_rows, k = indices.shape
    out = torch.empty(n_rows, k, dtype=out_dtype or table.dtype, device=table.device)
    if n_rows == 0 or k == 0:
        return out
    indices = indices.contiguous()
    table = _row_major(table)
    _row_dots_kernel[(n_rows, triton.cdiv(k, BLOCK_K))](
        grad, table, indices, out,
        k, table.shape[1],
        grad.stride(0), grad.stride(1), table.stride(0), indices.stride(0), out.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_D=block_d(table.shape[1]),
    )
    return out
