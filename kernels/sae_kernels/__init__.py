"""Sparse TopK-SAE ops (Gao et al. 2024, appendix D) behind one set of autograd functions.

    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
    x_hat = sae_kernels.sparse_decode(values, indices, W_dec) + b_dec          # the op adds no bias
    # AuxK: the same op on the dead latents' rows only (dead: (n_dead,) int64), indices mapped back
    aux_values, local = sae_kernels.topk_encode(x, W_enc[dead], b_enc[dead], min(k_aux, len(dead)), b_dec=b_dec)
    loss = sae_kernels.auxk_loss(aux_values, dead[local], W_dec, x - x_hat)   # residual detached inside

CUDA tensors run Triton kernels, CPU tensors the eager torch twins; SAE_KERNELS=torch|triton forces one
(triton on CPU tensors needs TRITON_INTERPRET=1). No backward forms an (N, n_latents) tensor.

Files: ops.py (autograd + dispatch), select.py (matmul + top-k selection), csc.py (latent-major view),
eager.py (torch primitives), encode.py / decode.py / auxk.py (Triton kernels, imported only when the
triton backend is first used). The training-step benchmark, which times the SAE module too, is
`python -m sae.bench`.

The package lives in the top-level folder `kernels/`, which has no `__init__.py` of its own: the import
name `kernels` belongs to Hugging Face's package (a requirement of transformers), and a plain
`import kernels` run from the repository root must still find that one. Importing this package stays
light and never needs triton (the eager ops work where triton is absent).
"""

from .ops import auxk_loss, resolve_backend, sparse_decode, topk_encode, triton_available

__all__ = ["topk_encode", "sparse_decode", "auxk_loss", "resolve_backend", "triton_available"]
