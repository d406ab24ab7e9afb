"""The data-dependent init: b_dec, the input scale and the tied encoder's fitted scale."""

import pytest
import torch

from sae.config import SaeConfig
from sae.initialization import ENCODER_SCALE_FLOOR, encoder_scale, estimate_input_scale, initialize_from_batch
from sae.model import SparseAutoencoder, geometric_median


def reference_decoded(sae: SparseAutoencoder, x: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """The decoded part (without b_dec) of `sae` with encoder weight `W_enc` and b_enc = 0, (N, d_in),
    in float64 dense torch."""
    pre = (x.double() - sae.b_dec.double()) @ W_enc.double().T
    values, indices = pre.topk(sae.cfg.k, dim=1)
    return torch.einsum("nk,nkd->nd", values.relu(), sae.W_dec.double()[indices])


def reference_fvu(sae: SparseAutoencoder, x: torch.Tensor, tied: torch.Tensor, encoder_scale: float) -> float:
    """fvu of `sae` with W_enc = `tied` * `encoder_scale` (b_enc = 0), in float64 dense torch."""
    x_hat = reference_decoded(sae, x, tied.double() * encoder_scale) + sae.b_dec.double()
    return ((x.double() - x_hat).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()).item()


def reference_least_squares_factor(sae: SparseAutoencoder, x: torch.Tensor, tied: torch.Tensor) -> float:
    """c* = argmin_c ||x - b_dec - c decoded||^2 for the tied init's decoded part, in float64."""
    decoded, target = reference_decoded(sae, x, tied), x.double() - sae.b_dec.double()
    return ((target * decoded).sum() / decoded.pow(2).sum()).item()


def fresh_sae(k: int, d_in: int = 24, n_latents: int = 200) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d_in=d_in, n_latents=n_latents, k=k, k_aux=16))


@pytest.mark.parametrize("k", [1, 7, 64])
def test_the_encoder_is_shrunk_only_as_far_as_starting_no_worse_than_b_dec(k):
    """The factor is the largest c <= 1 at which the first batch's reconstruction is no worse than
    b_dec alone: min(1, 2 c*), c* the least-squares factor, checked in float64 dense torch."""
    raw = torch.randn(300, 24, generator=torch.Generator().manual_seed(k)) * 2.5 + 0.7
    sae = fresh_sae(k)
    tied = sae.encoder.weight.clone()
    assert torch.equal(tied, sae.W_dec)
    scale = initialize_from_batch(sae, raw)
    x = raw * scale
    factor = (sae.encoder.weight / tied).mean().item()
    torch.testing.assert_close(sae.encoder.weight, tied * factor)  # one factor for the whole matrix
    best = reference_least_squares_factor(sae, x, tied)
    assert reference_fvu(sae, x, tied, best) <= min(reference_fvu(sae, x, tied, best * 0.99),
                                                    reference_fvu(sae, x, tied, best * 1.01))
    b_dec_alone = reference_fvu(sae, x, tied, 0.0)
    if k == 1:  # one latent: its value is the projection on a unit direction, already the best multiple
        assert factor == 1.0 and best == pytest.approx(1.0, rel=1e-6)
    else:  # k directions' projections overshoot
        assert best < 0.95 and factor == pytest.approx(min(1.0, 2 * best), rel=1e-5)
    assert reference_fvu(sae, x, tied, factor) <= b_dec_alone * (1 + 1e-6)
    if factor < 1:
        assert reference_fvu(sae, x, tied, factor * 1.01) > b_dec_alone


def test_encoder_scale_edge_cases():
    target = torch.randn(5, 3, dtype=torch.float64)
    assert encoder_scale(target, torch.zeros_like(target)) == 1.0  # nothing decoded
    assert encoder_scale(target, -target) == ENCODER_SCALE_FLOOR  # pointing away: the smaller the better
    assert encoder_scale(target, 1000 * target) == ENCODER_SCALE_FLOOR  # c* = 1/1000, floored
    assert encoder_scale(target, 4 * target) == pytest.approx(0.5)  # c* = 1/4


def test_without_the_fit_a_large_k_starts_worse_than_reconstructing_nothing():
    """The symptom that made k=64 end worse than k=8 on short runs; the fit removes it."""
    raw = torch.randn(512, 24, generator=torch.Generator().manual_seed(3))
    unfitted, fitted = fresh_sae(64), fresh_sae(64)
    scale = initialize_from_batch(unfitted, raw, fit_encoder_scale=False)
    assert initialize_from_batch(fitted, raw) == scale
    assert torch.equal(unfitted.encoder.weight, unfitted.W_dec)
    with torch.no_grad():
        assert unfitted(raw * scale).fvu > 1.5 and fitted(raw * scale).fvu < 1.01


def test_b_dec_init_methods_and_unscaled_inputs():
    raw = torch.randn(256, 24, generator=torch.Generator().manual_seed(5)).exp()  # skewed: median != mean
    for method, expected in [("geometric_median", geometric_median(raw * estimate_input_scale(raw))),
                             ("mean", (raw * estimate_input_scale(raw)).double().mean(0)), ("zeros", torch.zeros(24))]:
        sae = fresh_sae(4)
        initialize_from_batch(sae, raw, b_dec_init=method)
        torch.testing.assert_close(sae.b_dec, expected.float())
    sae = fresh_sae(4)
    assert initialize_from_batch(sae, raw, scale_inputs=False) == 1.0
    torch.testing.assert_close(sae.b_dec, geometric_median(raw).float())
    with pytest.raises(ValueError, match="b_dec_init 'median'"):
        initialize_from_batch(fresh_sae(4), raw, b_dec_init="median")


def test_fitting_the_scale_of_a_trained_encoder_is_refused():
    sae = fresh_sae(4)
    with torch.no_grad():
        sae.encoder.bias.fill_(0.1)
    with pytest.raises(ValueError, match="b_enc = 0"):
        initialize_from_batch(sae, torch.randn(32, 24))
