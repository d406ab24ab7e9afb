"""Triton kernel of the sparse encoder backward: per-latent sums over the latent-major view.

    rows[i] = sum over entries e of latent i of w[e] * src[row[e]]     (dW_enc with src = x - b_dec,
    sums[i] = sum over entries e of latent i of w[e]                    dW_dec with src = dL/dx_hat)

One program per (group of BLOCK_L latents, block of d). The entries of each latent are a contiguous run
of the latent-major view (csc.py); at step t a program reads the t-th entry of each of its latents and
loads the matching source row segments as one (BLOCK_L, BLOCK_D) tile (contiguous along d),
accumulating in float32. Each output row is written once: no atomics, no zero-fill pass, and the same
summation order on every run (deterministic). A group runs as many steps as its busiest latent has
entries; a latent that fires on most tokens makes its group the longest program of the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .csc import latent_major
from .decode import block_d

BLOCK_L = 16


@triton.jit
def _scatter_rows_kernel(
    w_ptr, rows_ptr, offsets_ptr, src_ptr, out_ptr, sums_ptr,
    n_latents, D,
    stride_src_n, stride_src_d, stride_out,
    WITH_ROWS: tl.constexpr, WITH_SUMS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    latents = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    latent_ok = latents < n_latents
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(offsets_ptr + latents, mask=latent_ok, other=0)
    count = tl.load(offsets_ptr + latents + 1, mask=latent_ok, other=0) - start
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    # Step t reads the t-th entry of every latent of the group (one source row segment per latent).
    for t in range(0, tl.max(count, axis=0)):
        live = t < count
        w = tl.load(w_ptr + start + t, mask=live, other=0.0).to(tl.float32)
        if WITH_SUMS:
            total += w
        if WITH_ROWS:
            rows = tl.load(rows_ptr + start + t, mask=live, other=0)
            tile = tl.load(
                src_ptr + rows[:, None] * stride_src_n + cols[None, :] * stride_src_d,
                mask=live[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tile * w[:, None]
    if WITH_ROWS:
        out = out_ptr + latents[:, None].to(tl.int64) * stride_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=latent_ok[:, None] & col_ok[None, :])
    if WITH_SUMS:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + latents, total, mask=latent_ok)


def scatter_rows(
    weights: Tensor,
    indices: Tensor,
    src: Tensor,
    n_latents: int,
    want_rows: bool = True,
    want_sums: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Per-latent sums S^T @ src (n, d) and S^T 1 (n,) float32. See eager.scatter_rows.

    src (N, d) may have any strides (a stride-0 incoming gradient is read in place).
    """
    d, device = src.shape[1], src.device
    rows_out = torch.empty(n_latents, d, dtype=out_dtype or src.dtype, device=device) if want_rows else None
    sums = torch.empty(n_latents, dtype=torch.float32, device=device) if want_sums else None
    if not (want_rows or want_sums):
        return None, None
    if indices.numel() == 0:
        if rows_out is not None:
            rows_out.zero_()
        if sums is not None:
            sums.zero_()
        return rows_out, sums
    view = latent_major(indices, n_latents)
    sorted_weights = weights.reshape(-1)[view.perm].contiguous()
    bd = block_d(d)
    grid = (triton.cdiv(n_latents, BLOCK_L), triton.cdiv(d, bd) if want_rows else 1)
    _scatter_rows_kernel[grid](
        sorted_weights, view.rows, view.offsets, src,
        rows_out if want_rows else sorted_weights, sums if want_sums else sorted_weights,
        n_latents, d,
        src.stride(0), src.stride(1), rows_out.stride(0) if want_rows else 0,
        WITH_ROWS=want_rows, WITH_SUMS=want_sums,
        BLOCK_L=BLOCK_L, BLOCK_D=bd,
    )
    return rows_out, sums
