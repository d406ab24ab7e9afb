"""Which units the explain pipeline and N2G look at, and their records: random live SAE latents (or
chosen ones), random neurons (the MLP's of the hookpoint's block), and the derangement that pairs each unit
with another one for the shuffled controls."""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from sae.errors import UsageError
from sae.model import SparseAutoencoder

from .records import (
    NeuronSite, TokenStrings, UnitRecords, capture_neurons, collect_records, latent_fire_counts, neuron_activations,
    sae_latent_activations,
)


def pick(candidates: list[int], count: int, seed: int) -> list[int]:
    """`count` of `candidates` at random (seeded), in increasing order."""
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    return sorted(chosen)


def latent_records(model: nn.Module, tokenizer, sae: SparseAutoencoder, hookpoint: str, windows: Tensor,
                   n_units: int = 50, latents: list[int] | None = None, seed: int = 0, batch_windows: int = 32,
                   n_quantiles: int = 0) -> list[UnitRecords]:
    """Records of `latents`, or of `n_units` latents drawn at random among those alive on `windows` (with
    `n_quantiles` quantile excerpts each, records.collect_records)."""
    if latents is None:
        counts = latent_fire_counts(model, hookpoint, sae, windows, batch_windows)
        latents = pick(torch.nonzero(counts).flatten().tolist(), n_units, seed)
    bad = [latent for latent in latents if not 0 <= latent < sae.cfg.n_latents]
    if bad:
        raise UsageError(f"latent ids {bad} are out of range for an SAE with {sae.cfg.n_latents} latents")
    activations = sae_latent_activations(model, hookpoint, sae, latents)
    return collect_records(windows, activations, latents, TokenStrings(tokenizer), "latent", batch_windows=batch_windows, seed=seed,
                           n_quantiles=n_quantiles)


def neuron_records(model: nn.Module, tokenizer, site: NeuronSite, windows: Tensor, n_units: int = 50, seed: int = 0,
                   batch_windows: int = 32, n_quantiles: int = 0) -> list[UnitRecords]:
    """Records of `n_units` random neurons of `site` (e.g. `find_mlp_neurons`: the MLP of the hookpoint's block)."""
    width = capture_neurons(model, site, windows[:1, :2].to(next(model.parameters()).device)).shape[-1]
    neurons = pick(list(range(width)), n_units, seed)
    activations = neuron_activations(model, site, neurons)
    return collect_records(windows, activations, neurons, TokenStrings(tokenizer), "neuron", batch_windows=batch_windows, seed=seed,
                           n_quantiles=n_quantiles)


def derangement(count: int, seed: int) -> list[int]:
    """A permutation with no fixed point (identity when count < 2)."""
    if count < 2:
        return list(range(count))
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        if all(index != value for index, value in enumerate(order)):
            return order
