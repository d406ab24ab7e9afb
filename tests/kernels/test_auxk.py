"""sae_kernels.auxk_loss, and the SAE training forward's AuxK on each backend, against float64 references."""

import math

import pytest
import torch

import sae_kernels
from sae import SaeConfig, SparseAutoencoder


def normalized_mse(target, prediction):
    return (target - prediction).pow(2).sum() / (target - target.mean(0)).pow(2).sum()


def random_sae(dtype=torch.float64, **cfg) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=100, n_latents=1000, k=5, **cfg), dtype=dtype)
    with torch.no_grad():
        sae.encoder.weight.normal_().div_(10)
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
        sae.W_dec.normal_()
        sae.set_decoder_norm_to_unit_norm()
    return sae


def fired_then_dead(dead_before):
    """A dead-mask function in the trainer's order (OpenAI's): the batch's firing is counted first, so
    a latent that fires in this batch is not trained as dead on it."""
    def dead_mask(indices, acts):
        fired = torch.zeros_like(dead_before)
        fired[indices[acts > 0]] = True
        return dead_before & ~fired
    return dead_mask


def dense_codes(pre, k):
    """ReLU of the top k of each row of pre (N, n), zero elsewhere: (N, n)."""
    top = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())


def reference_forward64(cfg, params, x, dead_before):
    """The training forward in float64 with dense (N, n_latents) codes: losses and the dead mask used."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc.t() + b_enc
    codes = dense_codes(pre, cfg.k)
    x_hat = codes @ W_dec + b_dec
    fvu = normalized_mse(x, x_hat)
    dead = dead_before & ~(codes > 0).any(0)
    auxk = fvu.new_zeros(())
    k_aux = min(cfg.k_aux, int(dead.sum()))
    if k_aux:
        aux_codes = dense_codes(pre.masked_fill(~dead, -math.inf), k_aux)
        auxk = normalized_mse((x - x_hat).detach(), aux_codes @ W_dec)
    multi_topk_fvu = fvu.new_zeros(())
    if cfg.multi_topk:
        multi_topk_fvu = normalized_mse(x, dense_codes(pre, 4 * cfg.k) @ W_dec + b_dec)
    loss = fvu + cfg.auxk_weight * auxk + multi_topk_fvu / 8
    return dict(x_hat=x_hat, fvu=fvu, auxk_loss=auxk, multi_topk_fvu=multi_topk_fvu, loss=loss, codes=codes, dead=dead)


@pytest.mark.parametrize(
    "cfg,dead_frac",
    [({"k_aux": 64}, 0.3), ({"k_aux": 7}, 0.3), ({"k_aux": 500}, 0.3), ({"k_aux": 64, "multi_topk": True}, 0.3),
     ({"k_aux": 64}, 0.0)],
    ids=["aux-support", "aux-sparse", "aux-all-dead", "multi-topk", "none-dead"],
)
def test_sae_training_forward_with_auxk_equals_float64_reference(backend, cfg, dead_frac, ref, monkeypatch):
    """SparseAutoencoder.forward as the trainer calls it (a dead-mask function: the batch's firing
    first, then AuxK on the dead latents' rows alone), on each backend's ops, against dense float64."""
    monkeypatch.setenv("SAE_KERNELS", backend)
    sae = random_sae(**cfg)
    x = torch.randn(26, 100, dtype=torch.float64) * 2
    dead_before = torch.rand(1000) < dead_frac
    if dead_frac:
        dead_before[sae.encoder.bias.detach().topk(3).indices] = True  # they fire: the order matters
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]

    ours = sae(x, fired_then_dead(dead_before))
    ours.loss.backward()
    expected = reference_forward64(sae.cfg, leaves, x, dead_before)
    expected["loss"].backward()

    if dead_frac:
        assert (dead_before & ~expected["dead"]).any(), "no dead latent fired: the order is not tested"
        assert ours.auxk_loss > 0
    tol = ref.tolerance(backend, torch.float64)
    codes = torch.zeros(26, 1000, dtype=torch.float64).scatter(1, ours.latent_indices, ours.latent_acts.detach())
    ref.assert_close(codes, expected["codes"], tol, "codes")
    for name in ["x_hat", "fvu", "auxk_loss", "multi_topk_fvu", "loss"]:
        ref.assert_close(getattr(ours, name), expected[name], tol, name)
    for name, param, leaf in zip(["W_enc", "b_enc", "W_dec", "b_dec"], params, leaves):
        ref.assert_close(param.grad, leaf.grad, tol, f"grad {name}")


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
