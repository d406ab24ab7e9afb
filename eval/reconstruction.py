"""Reconstruction and sparsity of an SAE over many batches: nmse, fvu, mse, L0, latent density.

Sums are kept in float64 so that a long eval does not drift; the ratios are taken at the end:

    fvu  = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   fraction of variance unexplained (Gao et al.'s
                                                       "normalized MSE"; what training logs as `fvu`,
                                                       there with batch means); mean(x) is the mean over
                                                       all eval tokens
    nmse = sum ||x - x_hat||^2 / sum ||x||^2             error relative to the activations' energy (the
                                                       normalisation of OpenAI's sparse_autoencoder code);
                                                       a residual stream's large mean makes it < fvu
    mse  = sum ||x - x_hat||^2 / (tokens * d_in)         per-element squared error, raw units
    l0   = mean number of latents with a non-zero value per token
    never_fired_frac = fraction of latents with a non-zero value on none of the `never_fired_tokens`
                       eval tokens. Not training's `dead_frac` (latents silent for the last `dead_tokens`
                       training tokens, the AuxK set): over a short eval a rare but live latent can be
                       silent, so the token count goes with the fraction.
    dense_frac       = fraction of latents firing on more than DENSE_DENSITY (10%) of the eval tokens: a
                       latent that fires that often says little about any one token (the threshold is ours;
                       the density histogram has the whole distribution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sae.model import fire_counts

DENSE_DENSITY = 0.1

# Edges of the latent-density histogram, in log10(fraction of tokens a latent fires on).
DENSITY_BIN_EDGES = [edge / 2 for edge in range(-16, 1)]  # -8.0, -7.5, ..., 0.0


@dataclass
class ReconstructionStats:
    """Running sums for one SAE. `update` with each batch; `summary` at the end."""

    n_latents: int
    mean: Tensor
    """Mean activation over the eval tokens, (d_in,): the centre for the fvu denominator."""

    def __post_init__(self):
        self.mean = self.mean.double()
        self.tokens = 0
        self.d_in = self.mean.numel()
        self.squared_error = 0.0
        self.energy = 0.0
        self.centered_energy = 0.0
        self.active_latents = 0
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor) -> None:
        """x, x_hat (N, d_in); values, indices (N, k): one batch of activations and its encoding."""
        x, x_hat = x.double(), x_hat.double()
        self.tokens += x.shape[0]
        self.squared_error += (x - x_hat).pow(2).sum().item()
        self.energy += x.pow(2).sum().item()
        self.centered_energy += (x - self.mean.to(x.device)).pow(2).sum().item()
        self.active_latents += int((values > 0).sum().item())
        self.fire_counts += fire_counts(values, indices, self.n_latents)

    def summary(self) -> dict:
        """nmse, fvu, mse, l0, never_fired_frac and never_fired_tokens, dense_frac, and the density histogram (see
        the module docstring)."""
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated")
        density = self.fire_counts.double() / self.tokens
        fired = density[density > 0]
        log_density = fired.log10().clamp(DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[-1]).tolist()
        counts = [0] * (len(DENSITY_BIN_EDGES) - 1)
        for value in log_density:  # bins [a, b); the last one also takes density 1
            counts[min(int((value - DENSITY_BIN_EDGES[0]) * 2), len(counts) - 1)] += 1
        return {
            "nmse": _ratio(self.squared_error, self.energy),
            "fvu": _ratio(self.squared_error, self.centered_energy),
            "mse": self.squared_error / (self.tokens * self.d_in),
            "l0": self.active_latents / self.tokens,
            "never_fired_frac": float((self.fire_counts == 0).double().mean().item()),
            "never_fired_tokens": self.tokens,
            "dense_frac": float((density > DENSE_DENSITY).double().mean().item()),
            "density_histogram": {
                "log10_bin_edges": list(DENSITY_BIN_EDGES),
                "counts": counts,
                "never_fired": int((self.fire_counts == 0).sum().item()),
            },
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan
