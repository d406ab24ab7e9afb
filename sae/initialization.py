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


ENCODER_SCALE_FLOOR = 1 / 64
"""The smallest factor `encoder_scale` gives: small latents, not vanishing ones (the decoder's gradient
is proportional to them)."""


def encoder_scale(target: Tensor, decoded: Tensor) -> float:
    """The factor for the tied encoder: the largest c <= 1 with ||target - c decoded||^2 <= ||target||^2,
    i.e. min(1, 2 c*) for the least-squares c* = <target, decoded> / ||decoded||^2 (both (N, d_in),
    b_dec taken off), and at least `ENCODER_SCALE_FLOOR`: where c* <= 0 (the decoded part points away
    from the target, as a transcoder's tied decoding can in a random-init LM) every c > 0 starts worse
    than b_dec alone, the less the smaller c. 1 when nothing decodes (a zero decoder)."""
    squared_norm = decoded.pow(2).sum()
    if squared_norm == 0:
        return 1.0
    best = ((target * decoded).sum() / squared_norm).item()
    return min(1.0, max(2 * best, ENCODER_SCALE_FLOOR))


@torch.no_grad()
def initialize_transcoder_from_batch(sae, inputs: Tensor, targets: Tensor, b_dec_init: str = "geometric_median",
                                     scale_inputs: bool = True, fit_encoder_scale: bool = True) -> tuple[float, float]:
    """A fresh transcoder's start from raw module inputs and outputs (N, d_in) each; returns (input scale,
    output scale), each s with E||s x||^2 = d_in over its side (1.0 without scale_inputs). Sets:
    - b_dec, the output's bias: from the scaled outputs, as an SAE's from its inputs;
    - b_enc = -W_enc mean(s x): each latent's pre-activation has mean 0 over the batch (sparsify's
      transcoder init);
    - with fit_encoder_scale, W_enc and b_enc times the factor `encoder_scale` fits between the outputs
      and the tied decoder's first prediction (an SAE's rule, with the outputs as the target). A zero
      decoder (normalize_decoder off) predicts nothing, and the factor is 1.

    Why b_enc: a transcoder's encoder subtracts no b_dec, and a module's input is far from centred (an
    MLP's input is a LayerNorm's output, whose mean is a large share of its norm). Uncentred, each latent
    starts with its own offset W_enc . mean(x): those far below zero seldom win the top-k, and once
    their pre-activations are negative on every token AuxK cannot revive them (its ReLU passes no
    gradient). Why the scale: the tied decoder maps a latent back along its input direction, which
    predicts the output poorly, so unscaled the first predictions are worse than b_dec alone.
    docs/transcoders.md has the measurements.

    Like `initialize_from_batch`, every rank passes the same global batch; the forward is collective."""
    input_scale = estimate_input_scale(inputs) if scale_inputs else 1.0
    output_scale = estimate_input_scale(targets) if scale_inputs else 1.0
    x = (inputs * input_scale).to(sae.b_dec.dtype)
    y = (targets * output_scale).to(sae.b_dec.dtype)
    sae.b_dec.copy_(initial_b_dec(y, b_dec_init))
    sae.encoder.bias.copy_(-(sae.encoder.weight.double() @ x.double().mean(0)))
    if fit_encoder_scale:
        decoded = (sae(x, None, batch_variance, target=y).x_hat - sae.b_dec - sae.skip(x)).double()
        scale = encoder_scale((y - sae.b_dec).double(), decoded)
        sae.encoder.weight.mul_(scale)
        sae.encoder.bias.mul_(scale)
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
