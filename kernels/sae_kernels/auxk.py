"""Triton kernel of the AuxK loss forward: decode the dead latents and take the residual error, fused.

    diff[n] = e[n] - sum_j w[n, j] * W_dec[idx[n, j]],     sq[n] = ||diff[n]||^2

One program per batch row walks the row in BLOCK_D column blocks; for each it gathers the k_aux decoder
row segments (contiguous) into a float32 accumulator and subtracts it from the residual, so e_hat is
never written. diff (float32) is kept for the backward, where d loss / d e_hat = -2 diff / var feeds
the decoder's row-dot and latent-major kernels (decode.py, encode.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .decode import BLOCK_K, block_d, gather_segment


@triton.jit
def _aux_residual_kernel(
    w_ptr, idx_ptr, table_ptr, e_ptr, diff_ptr, sq_ptr,
    K, D,
    stride_w, stride_idx, stride_table, stride_e_n, stride_e_d, stride_diff,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        acc = gather_segment(
            w_ptr, idx_ptr, table_ptr, row, cols, col_ok, K, stride_w, stride_idx, stride_table, BLOCK_K, BLOCK_D
        )
        e = tl.load(e_ptr + row * stride_e_n + cols * stride_e_d, mask=col_ok, other=0.0).to(tl.float32)
        diff = tl.where(col_ok, e - acc, 0.0)
        tl.store(diff_ptr + row * stride_diff + cols, diff, mask=col_ok)
        sq += diff * diff
    tl.store(sq_ptr + row, tl.sum(sq, axis=0))


def aux_residual(values: Tensor, indices: Tensor, table: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """diff = residual - sum_j values[:, j] table[indices[:, j]]  (N, d) float32, and sum(diff^2)."""
    n_rows, k = indices.shape
    d = table.shape[1]
    diff = torch.empty(n_rows, d, dtype=torch.float32, device=table.device)
    row_sq = torch.empty(n_rows, dtype=torch.float32, device=table.device)
    if n_rows == 0:
        return diff, row_sq.sum()
    values, indices = values.contiguous(), indices.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    _aux_residual_kernel[(n_rows,)](
        values, indices, table, residual, diff, row_sq,
        k, d,
        values.stride(0), indices.stride(0), table.stride(0), residual.stride(0), residual.stride(1), diff.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_D=block_d(d),
    )
    return diff, row_sq.sum()
