"""The public ops: autograd Functions over two backends with the same semantics.

Backends: "triton" (kernels in encode.py, decode.py, auxk.py; for CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and "torch" (eager.py). Chosen per call: CUDA tensors go to Triton when it is
installed, everything else to torch; SAE_KERNELS=torch|triton (read at each call) or the `backend=`
argument forces one. Both share the forward selection (select.py) and the latent-major view (csc.py).

Backward passes are sparse (Gao et al. 2024, appendix D): with S the (N, n) matrix of selected
pre-activation gradients, dW_enc = S^T (x - b_dec), db_enc = S^T 1, dx = S W_enc, and
db_dec = -W_enc^T (S^T 1): the batch is reduced before the mat-vec. Nothing of size (N, n_latents) is
ever formed.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from . import eager
from .csc import check_indices, mark_in_range
from .select import encode_select

BACKENDS = ("torch", "triton")
_triton_backend: SimpleNamespace | None = None


def triton_available() -> bool:
    """Whether the `triton` package can be imported (it is Linux-only). Does not import it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None or has no spec
        return False


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """"torch" or "triton" for tensors on `device`: `requested`, else $SAE_KERNELS, else by device."""
    name = (requested or os.environ.get("SAE_KERNELS", "") or "auto").strip().lower()
    if name == "eager":
        name = "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (SAE_KERNELS / backend=): expected 'torch' or 'triton'")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("the triton backend was requested but triton is not installed (it is Linux-only)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
                "anything imports triton to run its kernels on CPU tensors in the interpreter"
            )
    return name


def _impl(name: str) -> Any:
    """The module-like object holding a backend's primitives (see eager.py for their contracts)."""
    global _triton_backend
    if name == "torch":
        return eager
    if _triton_backend is None:
        from . import auxk, decode, encode  # imports triton

        _triton_backend = SimpleNamespace(
            gather_rows=decode.gather_rows,
            row_dots=decode.row_dots,
            scatter_rows=encode.scatter_rows,
            aux_residual=auxk.aux_residual,
        )
    return _triton_backend


# ---- encode -------------------------------------------------------------------------------------


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, sorted, backend):
        xc = x - b_dec if b_dec is not None else x
        values, indices = encode_select(xc, W_enc, b_enc, k, sorted)
        mark_in_range(indices, W_enc.shape[0])
        ctx.save_for_backward(xc, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.backend = backend
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        xc, W_enc, values, indices = ctx.saved_tensors
        need_x, need_W, need_b, need_b_dec = ctx.needs_input_grad[:4]
        impl = _impl(ctx.backend)
        # Gradient of the pre-activations at the selected entries: ReLU passes it where the value is > 0.
        grad_pre = grad_values * (values > 0)
        grad_x = grad_W = grad_b = grad_b_dec = None
        if need_W or need_b or need_b_dec:
            grad_W, sums = impl.scatter_rows(
                grad_pre, indices, xc, W_enc.shape[0], want_rows=need_W, want_sums=need_b or need_b_dec,
                out_dtype=W_enc.dtype,
            )
            if need_b:
                grad_b = sums.to(W_enc.dtype)
            if need_b_dec:
                grad_b_dec = -(W_enc.t().to(sums.dtype) @ sums).to(xc.dtype)
        if need_x:
            grad_x = impl.gather_rows(grad_pre, indices, W_enc, out_dtype=xc.dtype)
        return grad_x, grad_W, grad_b, grad_b_dec, None, None, None


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    k: int,
    *,
    b_dec: Tensor | None = None,
    sorted: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """TopK encoder with a sparse backward: pre = W_enc (x - b_dec) + b_enc, top k per row, then ReLU.

    x (N, d) (cast to W_enc's dtype); W_enc (n_latents, d); b_enc (n_latents,) or None; b_dec (d,) or
    None, the pre-bias subtracted from x (its gradient is reduced over the batch before the mat-vec).
    Returns (values (N, k), indices (N, k) int64): the selected pre-activations after ReLU (ReLU after
    the selection, so indices are defined even when fewer than k are positive), in no particular
    order unless `sorted` (then descending).

    AuxK's selection among the dead latents is this op on their rows alone (W_enc[dead], b_enc[dead]),
    its indices mapped back through `dead`: the other latents' pre-activations are never computed.
    """
    if x.dim() != 2 or W_enc.dim() != 2 or x.shape[1] != W_enc.shape[1]:
        raise ValueError(
            f"topk_encode: x must be (N, d) and W_enc (n_latents, d), got {tuple(x.shape)} and {tuple(W_enc.shape)}"
        )
    n_latents = W_enc.shape[0]
    if not 1 <= k <= n_latents:
        raise ValueError(f"topk_encode: k must be in [1, n_latents={n_latents}], got {k}")
    name = resolve_backend(x.device, backend)
    return _TopKEncode.apply(x.to(W_enc.dtype), W_enc, b_enc, b_dec, int(k), bool(sorted), name)


# ---- decode -------------------------------------------------------------------------------------


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, backend):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.backend = backend
        return _impl(backend).gather_rows(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        impl = _impl(ctx.backend)
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = impl.row_dots(grad_out, W_dec, indices, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W, _ = impl.scatter_rows(values, indices, grad_out, W_dec.shape[0], out_dtype=W_dec.dtype)
        return grad_values, None, grad_W, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, backend: str | None = None) -> Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]]  ->  (N, d) in W_dec's dtype. No bias.

    values (N, K) (cast to W_dec's dtype), indices (N, K) int64 in [0, n_latents), W_dec (n_latents, d).
    Backward: d values = dot products at the K indices only; d W_dec = the transposed sparse product.
    """
    _check_sparse(values, indices, W_dec, "sparse_decode")
    name = resolve_backend(values.device, backend)
    return _SparseDecode.apply(values.to(W_dec.dtype), indices, W_dec, name)


# ---- AuxK ---------------------------------------------------------------------------------------


class _AuxKLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, residual, backend):
        diff, sum_sq = _impl(backend).aux_residual(values, indices, W_dec, residual)
        target = residual.to(diff.dtype)
        total_variance = (target - target.mean(0)).pow(2).sum()
        loss = sum_sq / total_variance
        is_nan = loss.isnan()
        ctx.save_for_backward(values, indices, W_dec, diff, total_variance, is_nan)
        ctx.backend = backend
        # float32 at least (a bf16 decoder's loss is still accumulated and returned in float32)
        return torch.where(is_nan, torch.zeros_like(loss), loss).to(torch.promote_types(W_dec.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_loss):
        values, indices, W_dec, diff, total_variance, is_nan = ctx.saved_tensors
        impl = _impl(ctx.backend)
        # loss = sum (e - e_hat)^2 / var  =>  d loss / d e_hat = -2 (e - e_hat) / var; zero where NaN -> 0.
        grad_e_hat = diff * (-2 * grad_loss.to(diff.dtype) / total_variance)
        grad_e_hat = torch.where(is_nan, torch.zeros_like(grad_e_hat), grad_e_hat)
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = impl.row_dots(grad_e_hat, W_dec, indices, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W, _ = impl.scatter_rows(values, indices, grad_e_hat, W_dec.shape[0], out_dtype=W_dec.dtype)
        return grad_values, None, grad_W, None, None


def auxk_loss(
    aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor, residual: Tensor, *, backend: str | None = None
) -> Tensor:
    """AuxK loss (Gao et al. 2024, section 2.4): how well the dead latents reconstruct the residual.

    aux_values, aux_indices (N, k_aux): the dead latents' selection (topk_encode on their rows, its
    indices mapped back to all latents); W_dec (n_latents, d); residual (N, d) = x - x_hat, detached
    here. Returns the scalar sum ||e - e_hat||^2 / sum ||e - mean_batch(e)||^2 with e_hat =
    sparse_decode(aux_values, aux_indices, W_dec) (no bias), NaN replaced by 0 (also its gradient); 0
    when k_aux = 0. The decode and the squared error are fused (the Triton kernel never writes e_hat).
    The loss is float32 for a half-precision W_dec, else W_dec's dtype.
    """
    _check_sparse(aux_values, aux_indices, W_dec, "auxk_loss")
    if residual.shape != (aux_values.shape[0], W_dec.shape[1]):
        expected = (aux_values.shape[0], W_dec.shape[1])
        raise ValueError(f"auxk_loss: residual must be (N, d) = {expected}, got {tuple(residual.shape)}")
    if aux_indices.shape[1] == 0:
        return W_dec.new_zeros((), dtype=torch.promote_types(W_dec.dtype, torch.float32))
    name = resolve_backend(aux_values.device, backend)
    return _AuxKLoss.apply(aux_values.to(W_dec.dtype), aux_indices, W_dec, residual.detach(), name)


def _check_sparse(values: Tensor, indices: Tensor, W_dec: Tensor, op: str) -> None:
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"{op}: values and indices must both be (N, K), got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if W_dec.dim() != 2:
        raise ValueError(f"{op}: W_dec must be (n_latents, d), got {tuple(W_dec.shape)}")
    check_indices(indices, W_dec.shape[0], f"{op}: indices")
