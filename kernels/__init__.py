"""Sparse TopK-SAE ops (Gao et al. 2024, appendix D) behind one set of autograd functions.

    values, indices = kernels.topk_encode(x, W_enc, b_enc, k, b_dec=None)
    values, indices, aux_values, aux_indices = kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec,
                                                                   dead_mask=dead, k_aux=512)
    x_hat = kernels.sparse_decode(values, indices, W_dec)              # no bias
    loss = kernels.auxk_loss(aux_values, aux_indices, W_dec, x - x_hat)  # residual detached inside

CUDA tensors run Triton kernels, CPU tensors the eager torch twins; SAE_KERNELS=torch|triton forces one
(triton on CPU tensors needs TRITON_INTERPRET=1). No backward forms an (N, n_latents) tensor.

Files: ops.py (autograd + dispatch), select.py (matmul + top-k selection), csc.py (latent-major view),
eager.py (torch primitives), encode.py / decode.py / auxk.py (Triton kernels, imported only when the
triton backend is first used). The training-step benchmark, which times the SAE module too, is
`python -m sae.bench`.

This package shares its import name with Hugging Face's `kernels`; importing it must stay light and
must never need triton (transformers only probes it).
"""

from .ops import auxk_loss, resolve_backend, sparse_decode, topk_encode, triton_available

__all__ = ["topk_encode", "sparse_decode", "auxk_loss", "resolve_backend", "triton_available"]
