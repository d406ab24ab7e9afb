"""The encoder forward: one dense matmul, then the top k per row.

Shared by both backends: the dense part is the library matmul (Gao et al. appendix D also keep it
dense), then torch.topk, in row chunks of bounded size on every device (`chunk_rows`). On CPU the
pre-activations go into a reused buffer; they are never saved for the backward.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

PRE_ACTIVATION_BUDGET = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
"""Bytes of pre-activations held at once, per device type (others use CUDA's): the batch goes through
in row chunks within this budget, so memory stays bounded for any batch and width (on CUDA 32768 rows
x 1M latents would otherwise be 64 GiB in bf16). Top k is per row, so chunking leaves it exact. Chunks
are large because the matmul loses efficiency on short row blocks (measured on CPU: 256-row chunks
cost ~1.3x a single 4096-row matmul)."""


def chunk_rows(n_rows: int, n_latents: int, device: torch.device, element_size: int) -> int:
    """Rows per encoder chunk: all of them if they fit the device's budget, else as many as do (>= 1)."""
    budget = PRE_ACTIVATION_BUDGET.get(device.type, PRE_ACTIVATION_BUDGET["cuda"])
    return max(1, min(n_rows, budget // max(1, n_latents * element_size)))

_workspace = threading.local()  # per thread: {(device, dtype): flat buffer}


def _pre_buffer(rows: int, n_latents: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """A reused (rows, n_latents) buffer for the pre-activations on CPU, None on other devices.

    Allocating ~200 MB afresh every step costs tens of milliseconds of page faults on CPU (the
    allocator returns large blocks to the OS); CUDA's caching allocator already reuses its memory.
    The buffer never escapes encode_select, so reusing it across calls is safe; each thread has its own.
    """
    if device.type != "cpu":
        return None
    buffers = _workspace.__dict__.setdefault("buffers", {})
    size = rows * n_latents
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=dtype, device=device)
        buffers[(device, dtype)] = buffer
    return buffer[:size].view(rows, n_latents)


def clear_workspace() -> None:
    """Free this thread's CPU pre-activation buffers (they are rebuilt on the next call)."""
    _workspace.__dict__.pop("buffers", None)


TOPK_GROUP = 8
"""Columns per group in the CPU top-k (see topk_rows)."""


def topk_rows(pre: Tensor, k: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """Top k of each row of `pre` (M, n): (values (M, k), indices (M, k) int64), before any ReLU.

    On CPU, for wide rows, a two-stage search that does the same selection ~25% faster than
    torch.topk on the whole row (measured at 4096 x 12288, k = 32, 2 threads: 52 vs 70 ms). Split
    the first g*m columns into m = n // g strided groups (group j = columns j, j + m, ..., j + (g-1) m),
    take each group's max (a cheap vectorised pass), keep the k groups with the largest maxima and
    search only their k*g columns plus the n - g*m leftover columns.
    Why it is exact: the k kept maxima are k distinct elements of the row, so the k-th largest value
    v_k is >= the smallest kept maximum t. An element > v_k lies in a group whose max is > t, which
    is therefore kept; and either every kept maximum is >= v_k (k candidates >= v_k) or some kept
    maximum is < v_k, in which case every group holding an element >= v_k was kept. Either way the
    candidates contain a full top k, so the values equal torch.topk's; among equal values the
    choice of indices may differ (torch.topk does not define it either). NaN ranks highest in both.
    """
    n_rows, n = pre.shape
    g = TOPK_GROUP
    m = n // g
    if pre.device.type != "cpu" or m < 4 * k:
        return pre.topk(k, dim=1, sorted=sorted)
    group_max = pre[:, : g * m].unflatten(1, (g, m)).amax(1)  # (M, m)
    _, groups = group_max.topk(k, dim=1, sorted=False)
    columns = (groups[:, :, None] + torch.arange(0, g * m, m, device=pre.device)).reshape(n_rows, k * g)
    if g * m < n:
        leftover = torch.arange(g * m, n, device=pre.device).expand(n_rows, -1)
        columns = torch.cat([columns, leftover], 1)
    values, where = pre.gather(1, columns).topk(k, dim=1, sorted=sorted)
    return values, columns.gather(1, where)


def encode_select(
    xc: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int, sorted: bool = False
) -> tuple[Tensor, Tensor]:
    """pre = xc W_enc^T + b_enc; top k per row; ReLU after the selection (as sae.model does).

    xc (N, d) is the centred input x - b_dec; W_enc (n, d); b_enc (n,) or None. Returns values (N, k)
    in W_enc's dtype and indices (N, k) int64.
    """
    n_rows = xc.shape[0]
    device, dtype = xc.device, W_enc.dtype
    values = torch.empty(n_rows, k, dtype=dtype, device=device)
    indices = torch.empty(n_rows, k, dtype=torch.int64, device=device)
    n_latents = W_enc.shape[0]
    chunk = chunk_rows(n_rows, n_latents, device, W_enc.element_size())
    weight_t = W_enc.t()
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = xc[start:stop]
        pre = _pre_buffer(stop - start, n_latents, device, dtype)
        if b_enc is not None:
            pre = torch.addmm(b_enc, rows, weight_t, out=pre)
        else:
            pre = torch.mm(rows, weight_t, out=pre)
        top, where = topk_rows(pre, k, sorted)
        values[start:stop] = top.relu_()
        indices[start:stop] = where
    return values, indices
