"""sae_kernels.sparse_decode, both backends, against a dense float64 reference: output and gradients."""

import pytest
import torch

import sae_kernels
from sae.model import sparse_decode as model_sparse_decode


def random_indices(n_rows, k, n_latents, pool=None):
    """Random latent indices with repeats across rows (a few shared latents) and within some rows."""
    pool = pool if pool is not None else n_latents
    latents = torch.randperm(n_latents)[:pool]
    indices = latents[torch.randint(0, pool, (n_rows, k))]
    indices[: n_rows // 2, 0] = latents[0]  # one latent in half of the rows
    if k > 1:
        indices[1, 1] = indices[1, 0]  # a repeat within a row adds up
    return indices


# (rows, d_in, n_latents, k, pool): the odd shape, k = 1, k = 70 drawn from 150 latents (the eager
# dense-over-support path, like AuxK), and k = 17 over 16 latents (more entries per row than latents:
# a latent-sharded rank's slice, where the winners of other ranks come in as repeats of latent 0).
CASES = [(23, 100, 1000, 5, None), (18, 100, 1000, 1, None), (14, 100, 1000, 70, 150), (9, 12, 16, 17, None)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[3]}")
@pytest.mark.parametrize("kind", ["random", "sum", "transposed"])
def test_output_and_gradients_match_float64(backend, dtype, case, kind, ref):
    n_rows, d_in, n_latents, k, pool = case
    values = torch.randn(n_rows, k, dtype=dtype).abs().requires_grad_(True)
    indices = random_indices(n_rows, k, n_latents, pool)
    W_dec = torch.randn(n_latents, d_in, dtype=dtype, requires_grad=True)
    x_hat = sae_kernels.sparse_decode(values, indices, W_dec, backend=backend)
    assert x_hat.dtype == dtype and x_hat.shape == (n_rows, d_in)

    values64, W64 = values.detach().double().requires_grad_(True), W_dec.detach().double().requires_grad_(True)
    expected = ref.dense_codes64(values64, indices, n_latents) @ W64
    tol = ref.tolerance(backend, dtype)
    ref.assert_close(x_hat, expected, tol, "x_hat")

    g = torch.randn(n_rows, d_in, dtype=torch.float64)
    if kind == "random":
        (x_hat * g.to(dtype)).sum().backward()
        (expected * g).sum().backward()
    elif kind == "sum":  # incoming gradient with stride 0
        x_hat.sum().backward()
        expected.sum().backward()
    else:  # incoming gradient is a transposed (column-major) view
        (x_hat.t() * g.t().to(dtype)).sum().backward()
        (expected * g).sum().backward()
    ref.assert_close(values.grad, values64.grad, tol, "grad values")
    ref.assert_close(W_dec.grad, W64.grad, tol, "grad W_dec")


def test_equals_the_model_embedding_bag_in_float64(backend, ref):
    values = torch.rand(19, 5, dtype=torch.float64)
    indices = random_indices(19, 5, 1000)
    W_dec = torch.randn(1000, 100, dtype=torch.float64)
    ours = sae_kernels.sparse_decode(values, indices, W_dec, backend=backend)
    ref.assert_close(ours, model_sparse_decode(values, indices, W_dec), ref.tolerance(backend, torch.float64))


def test_bfloat16(backend, ref):
    values = torch.rand(21, 5, dtype=torch.bfloat16, requires_grad=True)
    indices = random_indices(21, 5, 1000)
    W_dec = torch.randn(1000, 100, dtype=torch.bfloat16, requires_grad=True)
    x_hat = sae_kernels.sparse_decode(values, indices, W_dec, backend=backend)
    assert x_hat.dtype == torch.bfloat16
    values64, W64 = values.detach().double().requires_grad_(True), W_dec.detach().double().requires_grad_(True)
    expected = ref.dense_codes64(values64, indices, 1000) @ W64
    ref.assert_close(x_hat, expected, 3e-2, "x_hat")
    x_hat.sum().backward()
    expected.sum().backward()
    assert values.grad.dtype == W_dec.grad.dtype == torch.bfloat16
    ref.assert_close(values.grad, values64.grad, 3e-2, "grad values")
    ref.assert_close(W_dec.grad, W64.grad, 3e-2, "grad W_dec")


def test_empty_selection_decodes_to_zero(backend):
    W_dec = torch.randn(50, 8, requires_grad=True)
    values = torch.zeros(4, 0, requires_grad=True)
    x_hat = sae_kernels.sparse_decode(values, torch.zeros(4, 0, dtype=torch.int64), W_dec, backend=backend)
    assert torch.equal(x_hat, torch.zeros(4, 8))
    x_hat.sum().backward()
    assert torch.equal(W_dec.grad, torch.zeros(50, 8))


def test_bad_indices_are_rejected(backend):
    W_dec = torch.randn(50, 8)
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        sae_kernels.sparse_decode(torch.ones(2, 3), torch.tensor([[0, 1, 50], [2, 3, 4]]), W_dec, backend=backend)
    with pytest.raises(ValueError, match="int64"):
        sae_kernels.sparse_decode(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.int32), W_dec, backend=backend)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sae_kernels.sparse_decode(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.int64), W_dec, backend=backend)


def test_indices_modified_in_place_are_not_served_stale_facts(backend, ref):
    """Facts derived from an index tensor (range check, latent-major view) are memoised per tensor;
    an in-place change must invalidate them."""
    values = torch.rand(9, 5, dtype=torch.float64, requires_grad=True)
    indices = random_indices(9, 5, 1000)
    W_dec = torch.randn(1000, 100, dtype=torch.float64, requires_grad=True)
    sae_kernels.sparse_decode(values, indices, W_dec, backend=backend).sum().backward()
    indices[:, 0] = (indices[:, 0] + 1) % 1000
    W_dec.grad = None
    sae_kernels.sparse_decode(values, indices, W_dec, backend=backend).sum().backward()
    expected = ref.dense_codes64(values.detach(), indices, 1000).sum(0)[:, None].expand(1000, 100)
    ref.assert_close(W_dec.grad, expected, ref.tolerance(backend, torch.float64), "grad W_dec")
    indices[0, 0] = 1000
    with pytest.raises(IndexError):
        sae_kernels.sparse_decode(values, indices, W_dec, backend=backend)
