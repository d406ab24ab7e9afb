"""sae_kernels.auxk_loss, and the whole SAE forward on the ops, against sae.model in float64."""

import math

import pytest
import torch

import sae_kernels
from sae import SaeConfig, SparseAutoencoder
from sae.model import ForwardOutput, normalized_mse


def forward_with_ops(sae: SparseAutoencoder, x, dead_mask=None, backend=None) -> ForwardOutput:
    """SparseAutoencoder.forward written on the kernels ops (the integration proposed for sae/model.py)."""
    cfg = sae.cfg
    x = x.to(sae.dtype)
    use_aux = dead_mask is not None and cfg.auxk_coef > 0
    # Multi-TopK needs the top 4k; sorted, its first k columns are the top k.
    k = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else cfg.k
    encoded = sae_kernels.topk_encode(
        x, sae.encoder.weight, sae.encoder.bias, k, b_dec=sae.b_dec,
        dead_mask=dead_mask if use_aux else None, k_aux=cfg.k_aux, sorted=cfg.multi_topk, backend=backend,
    )
    values, indices = encoded[0], encoded[1]
    latent_acts, latent_indices = values[:, : cfg.k], indices[:, : cfg.k]
    x_hat = sae_kernels.sparse_decode(latent_acts, latent_indices, sae.W_dec, backend=backend) + sae.b_dec
    fvu = normalized_mse(x, x_hat)
    zero = fvu.new_zeros(())
    auxk = sae_kernels.auxk_loss(encoded[2], encoded[3], sae.W_dec, x - x_hat, backend=backend) if use_aux else zero
    multi_topk_fvu = zero
    if cfg.multi_topk:
        multi_topk_fvu = normalized_mse(x, sae_kernels.sparse_decode(values, indices, sae.W_dec, backend=backend) + sae.b_dec)
    loss = fvu + cfg.auxk_coef * auxk + multi_topk_fvu / 8
    return ForwardOutput(x_hat, latent_acts, latent_indices, fvu, auxk, multi_topk_fvu, loss)


def random_sae(dtype=torch.float64, **cfg) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=100, n_latents=1000, k=5, **cfg), dtype=dtype)
    with torch.no_grad():
        sae.encoder.weight.normal_().div_(10)
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
        sae.W_dec.normal_()
        sae.set_decoder_norm_to_unit_norm()
    return sae


@pytest.mark.parametrize(
    "cfg,dead_frac",
    [({"k_aux": 64}, 0.3), ({"k_aux": 7}, 0.3), ({"k_aux": 64, "multi_topk": True}, 0.3), ({"k_aux": 64}, 0.0)],
    ids=["aux-support", "aux-sparse", "multi-topk", "none-dead"],
)
def test_sae_forward_on_the_ops_equals_sae_model(backend, cfg, dead_frac, ref):
    sae = random_sae(**cfg)
    x = torch.randn(26, 100, dtype=torch.float64) * 2
    dead = torch.rand(1000) < dead_frac
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]

    expected = sae(x, dead)
    expected.loss.backward()
    expected_grads = ref.grads(*params)
    ours = forward_with_ops(sae, x, dead, backend=backend)
    ours.loss.backward()

    tol = ref.tolerance(backend, torch.float64)
    order, expected_order = ours.latent_indices.argsort(1), expected.latent_indices.argsort(1)
    assert torch.equal(ours.latent_indices.gather(1, order), expected.latent_indices.gather(1, expected_order))
    ref.assert_close(ours.latent_acts.gather(1, order), expected.latent_acts.gather(1, expected_order), tol, "acts")
    for name in ["x_hat", "fvu", "auxk_loss", "multi_topk_fvu", "loss"]:
        ref.assert_close(getattr(ours, name), getattr(expected, name), tol, name)
    if dead_frac:
        assert ours.auxk_loss > 0
    for name, got, want in zip(["W_enc", "b_enc", "W_dec", "b_dec"], ref.grads(*params), expected_grads):
        ref.assert_close(got, want, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k_aux,pool", [(64, 300), (6, None)])
def test_loss_and_gradients_match_float64(backend, dtype, k_aux, pool, ref):
    n_rows, d_in, n_latents = 22, 100, 1000
    pool = pool or n_latents
    latents = torch.randperm(n_latents)[:pool]
    indices = torch.stack([latents[torch.randperm(pool)[:k_aux]] for _ in range(n_rows)])
    values = torch.rand(n_rows, k_aux, dtype=dtype).requires_grad_(True)
    W_dec = torch.randn(n_latents, d_in, dtype=dtype).requires_grad_(True)
    residual = torch.randn(n_rows, d_in, dtype=dtype, requires_grad=True)  # must not receive a gradient

    loss = sae_kernels.auxk_loss(values, indices, W_dec, residual, backend=backend)
    assert loss.shape == () and loss.dtype == dtype
    values64, W64 = values.detach().double().requires_grad_(True), W_dec.detach().double().requires_grad_(True)
    e = residual.detach().double()
    expected = normalized_mse(e, ref.dense_codes64(values64, indices, n_latents) @ W64)
    tol = ref.tolerance(backend, dtype)
    ref.assert_close(loss, expected, tol, "loss")

    (3 * loss).backward()
    (3 * expected).backward()
    ref.assert_close(values.grad, values64.grad, tol, "grad values")
    ref.assert_close(W_dec.grad, W64.grad, tol, "grad W_dec")
    assert residual.grad is None


def test_nan_becomes_zero_with_zero_gradient_and_inf_stays(backend):
    W_dec = torch.randn(50, 8, requires_grad=True)
    values = torch.zeros(4, 3, requires_grad=True)  # e_hat = 0
    indices = torch.randint(0, 50, (4, 3))
    loss = sae_kernels.auxk_loss(values, indices, W_dec, torch.zeros(4, 8), backend=backend)  # 0 / 0
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(W_dec.grad, torch.zeros(50, 8)) and torch.equal(values.grad, torch.zeros(4, 3))
    # Constant non-zero residual: variance 0, error > 0, loss +inf (only NaN is replaced, as in sae.model).
    loss = sae_kernels.auxk_loss(values, indices, W_dec, torch.ones(4, 8), backend=backend)
    assert loss.item() == math.inf


def test_no_dead_latents_gives_zero(backend):
    W_dec = torch.randn(50, 8)
    loss = sae_kernels.auxk_loss(torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.int64), W_dec, torch.randn(4, 8), backend=backend)
    assert loss.item() == 0


def test_bfloat16(backend, ref):
    values = torch.rand(12, 64, dtype=torch.bfloat16, requires_grad=True)
    indices = torch.stack([torch.randperm(200)[:64] for _ in range(12)])
    W_dec = torch.randn(1000, 100, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(12, 100, dtype=torch.bfloat16)
    loss = sae_kernels.auxk_loss(values, indices, W_dec, residual, backend=backend)
    values64, W64 = values.detach().double().requires_grad_(True), W_dec.detach().double().requires_grad_(True)
    expected = normalized_mse(residual.double(), ref.dense_codes64(values64, indices, 1000) @ W64)
    ref.assert_close(loss, expected, 3e-2, "loss")
    loss.backward()
    expected.backward()
    ref.assert_close(values.grad, values64.grad, 3e-2, "grad values")
    ref.assert_close(W_dec.grad, W64.grad, 3e-2, "grad W_dec")
