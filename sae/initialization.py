"""The data-dependent part of an SAE's initialisation, from the run's first batch of activations.

Gao et al. 2024 (§2, "Scaling and evaluating sparse autoencoders") initialise the decoder with random
unit-norm rows, tie the encoder to it (W_enc = W_dec^T), set b_dec to the geometric median of a batch
and scale the inputs to a fixed mean squared norm. Their reference code (openai/sparse_autoencoder,
train.py, `init_from_data_`) also rescales the tied encoder: it divides W_enc by the mean norm of
x_hat - b_dec over 256 random unit directions added to b_dec, so that such an input reconstructs to
norm 1 on average. We rescale it too, by another rule, fitted to the first batch of data.

Why the scale: at init every latent value is a projection of x - b_dec on a random unit direction,
and the k largest of them are kept and decoded with those unit directions. Their sum overshoots more
the larger k is, until at large k the first reconstruction is worse than b_dec alone. Multiplying
W_enc by c (b_enc is zero at init, so every latent value, and the reconstruction, scales by c and the
TopK choice does not change) has a least-squares best c*. We take the largest c <= 1 that starts no
worse than b_dec alone, min(1, 2 c*): the tied encoder unscaled at small k, where it does not
overshoot, and shrunk only as far as needed at large k. Not c* itself: an init that does not overshoot
at all lets the first latents to win keep winning, and leaves many latents dead at small k.
docs/peers.md ("The encoder init, and large k") has the factors and the ablations on the embedded model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .model import batch_variance, geometric_median


def estimate_input_scale(activations: Tensor) -> float:
    """s such that E||s x||^2 = d_in over the given activations (N, d_in)."""
    mean_squared_norm = activations.double().pow(2).sum(-1).mean()
    return math.sqrt(activations.shape[-1] / mean_squared_norm.item())


def initial_b_dec(x: Tensor, method: str) -> Tensor:
    """b_dec at the start, (d_in,), from the (scaled) batch x (N, d_in): "geometric_median" (Gao et al.),
    "mean" or "zeros"."""
    if method == "geometric_median":
        return geometric_median(x)
    if method == "mean":
        return x.double().mean(0)
    if method == "zeros":
        return x.new_zeros(x.shape[1])
    raise ValueError(f"unknown b_dec_init '{method}'; expected geometric_median, mean or zeros")


def encoder_scale(target: Tensor, decoded: Tensor) -> float:
    """The factor for the tied encoder: the largest c <= 1 with ||target - c decoded||^2 <= ||target||^2,
    i.e. min(1, 2 c*) for the least-squares c* = <target, decoded> / ||decoded||^2 (both (N, d_in),
    b_dec taken off). 1 when nothing decodes, or when the decoded part points away from the target."""
    squared_norm = decoded.pow(2).sum()
    if squared_norm == 0:
        return 1.0
    best = ((target * decoded).sum() / squared_norm).item()
    return min(1.0, 2 * best) if best > 0 else 1.0


@torch.no_grad()
def initialize_transcoder_from_batch(sae, inputs: Tensor, targets: Tensor, b_dec_init: str = "geometric_median",
                                     scale_inputs: bool = True) -> tuple[float, float]:
    """A fresh transcoder's start from raw module inputs and outputs (N, d_in) each: (input scale, output
    scale), each s with E||s x||^2 = d_in over its side (1.0 without scale_inputs), and b_dec, the output's
    bias, from the scaled outputs as an SAE's from its inputs. Its decoder starts at zero, so there is no
    encoder scale to fit (`encoder_scale` would find nothing decoded)."""
    input_scale = estimate_input_scale(inputs) if scale_inputs else 1.0
    output_scale = estimate_input_scale(targets) if scale_inputs else 1.0
    sae.b_dec.copy_(initial_b_dec((targets * output_scale).to(sae.b_dec.dtype), b_dec_init))
    return input_scale, output_scale


@torch.no_grad()
def initialize_from_batch(sae, batch: Tensor, b_dec_init: str = "geometric_median", scale_inputs: bool = True,
                          fit_encoder_scale: bool = True) -> float:
    """Set b_dec, and scale the encoder, of a freshly initialised `sae` from the raw activations `batch`
    (N, d_in), and return the input scale the run multiplies activations by (1.0 without scale_inputs).

    `sae` may hold only this rank's latents (`SparseAutoencoder(layout=)`): every rank of the run passes
    the same global batch, so every rank sets the same numbers; the forward pass is then collective."""
    input_scale = estimate_input_scale(batch) if scale_inputs else 1.0
    x = (batch * input_scale).to(sae.b_dec.dtype)
    sae.b_dec.copy_(initial_b_dec(x, b_dec_init))
    if fit_encoder_scale:
        if sae.encoder.bias.abs().max() > 0:
            raise ValueError("fit_encoder_scale needs b_enc = 0 (a fresh SAE): scaling W_enc then scales every latent value")
        target = (x - sae.b_dec).double()
        decoded = (sae(x, None, batch_variance).x_hat - sae.b_dec).double()
        sae.encoder.weight.mul_(encoder_scale(target, decoded))
    return input_scale
