"""Ablation sparsity: how sparse a latent's downstream effect on the logits is (Gao et al. 2024, §4.5).

With the SAE's reconstruction spliced in (positions >= 1, as in the downstream loss), take a position t
where latent j fires and remove its contribution z_j * W_dec[j] from the reconstruction at t only. The
logits at positions t .. t + T - 1 change by Δ (T x V numbers; V the vocabulary). A constant shift of a
position's logits changes nothing after the softmax, so each position's median difference is subtracted.
The metric of that ablation is

    (‖Δ‖₁ / ‖Δ‖₂)² / (V · T)

the "effective number of vocabulary tokens affected" as a fraction of all V · T: 1/(V·T) when a single
logit moves, 1 when every logit moves by the same amount. Smaller is sparser. Gao et al. use T = 16.

A transcoder at module M is measured the same way on its own splice: its prediction of M's output from M's
input (skip path included) replaces M's output, and latent j's ablation removes z_j · W_dec[j] from that
prediction; the latents it fires on are its codes of M's input (records.encode_windows).

A latent's value is the mean over its ablations (up to `ablations_per_latent` positions where it fires,
drawn at random); the report gives the mean over the sampled live latents and their distribution. An
ablation that changes no logit beyond a constant (Δ = 0 after the median) has no ratio: it is counted
under `no_effect` and left out of the means. A value with nothing to measure (a latent whose every
ablation had no effect, a mean over no latents) is None (eval/missing.py).

Batching: one forward carries, for a batch of windows, the spliced run and up to m ablations of each
window (the i-th variant ablates each window's i-th chosen occurrence), so the layers before the
hookpoint run once per batch and the layers after it once for all (1 + m) x B rows (eval/splice.py).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae.activations import get_module
from sae.errors import UsageError
from sae.model import SparseAutoencoder

from .explain.records import latent_fire_counts, sae_codes
from .missing import mean_or_none
from .splice import SpliceRunner

ROWS_PER_FORWARD = 64
"""Sequences per LM forward after the hookpoint (each holds ctx_len x vocab logits)."""


@dataclass(frozen=True)
class Occurrence:
    """One ablation: latent `latent` fires at `position` of window `window`."""

    window: int
    position: int
    latent: int


def effect_sparsity(delta: Tensor) -> float | None:
    """(‖Δ‖₁/‖Δ‖₂)² / Δ.numel() of logit differences `delta` (T, V) after subtracting each position's
    median over the vocabulary; None when nothing but constant shifts remains."""
    centred = delta.double() - delta.double().median(dim=-1, keepdim=True).values
    l2 = centred.norm()
    if l2 == 0:
        return None
    return float((centred.abs().sum() / l2) ** 2 / centred.numel())


@torch.no_grad()
def choose_occurrences(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, n_latents: int,
                       per_latent: int, horizon: int, seed: int = 0, batch_windows: int = 16,
                       latents: list[int] | None = None) -> list[Occurrence]:
    """Up to `per_latent` random firing positions of each of `n_latents` random live latents (or of
    `latents`), at positions 1 .. ctx_len - horizon so that `horizon` later logits exist.

    Two passes: the first counts firings to find the live latents, the second keeps the firing
    positions of the chosen ones only (memory: their firings, not every token's k codes)."""
    last = windows.shape[1] - horizon  # the last position whose horizon fits in the window
    if last < 1:
        raise UsageError(f"ablation horizon {horizon} needs windows longer than {horizon} tokens, got {windows.shape[1]}")
    rng = random.Random(seed)
    if latents is None:
        live = torch.nonzero(latent_fire_counts(model, hookpoint, sae, windows, batch_windows, last)).flatten().tolist()
        latents = sorted(rng.sample(live, min(n_latents, len(live))))
    chosen = torch.tensor(latents, dtype=torch.long)
    found_latents, found_windows, found_positions = [], [], []
    for first, positions, values, indices in sae_codes(model, hookpoint, sae, windows, batch_windows, last):
        values, indices = values.cpu(), indices.cpu()
        row, slot = torch.nonzero((values > 0) & torch.isin(indices, chosen), as_tuple=True)
        found_latents.append(indices[row, slot])
        found_windows.append(first + torch.div(row, positions, rounding_mode="floor"))
        found_positions.append(1 + row % positions)
    found_latents, found_windows, found_positions = (torch.cat(found) for found in (found_latents, found_windows, found_positions))
    occurrences = []
    for latent in latents:
        places = sorted(zip(found_windows[found_latents == latent].tolist(), found_positions[found_latents == latent].tolist()))
        for window, position in sorted(rng.sample(places, min(per_latent, len(places)))):
            occurrences.append(Occurrence(window, position, latent))
    return occurrences


class _AblationVariants:
    """Replacements for one batch: variant 0 the SAE's reconstruction, variant i >= 1 the same with each
    window's i-th occurrence removed (windows with fewer occurrences get the plain reconstruction)."""

    def __init__(self, sae: SparseAutoencoder, runner: SpliceRunner, per_window: list[list[Occurrence]], start: int):
        self.sae = sae
        self.runner = runner
        self.per_window = per_window
        self.start = start
        self.x_hat: Tensor | None = None
        self.scale: Tensor | None = None
        self.values: Tensor | None = None
        self.indices: Tensor | None = None

    def reconstruction(self, acts: Tensor) -> Tensor:
        x = self.runner.sae_input(acts, self.sae.cfg.transcode).flatten(0, 1).to(self.sae.dtype)
        x_hat, values, indices = self.sae.reconstruct(x)  # overwritten each call (splice.Replacement)
        self.values, self.indices = values.view(*acts.shape[:2], -1), indices.view(*acts.shape[:2], -1)
        self.scale = self.sae.output_scale(x).view(*acts.shape[:2], 1)
        self.x_hat = x_hat.view(acts.shape)
        return self.x_hat.to(acts.dtype)

    def ablation(self, variant: int):
        def replace(acts: Tensor) -> Tensor:
            ablated = self.x_hat.clone()
            for window, occurrences in enumerate(self.per_window):
                if variant < len(occurrences):
                    occurrence = occurrences[variant]
                    column = occurrence.position - self.start
                    slot = self.indices[window, column] == occurrence.latent
                    value = self.values[window, column][slot].sum()
                    ablated[window, column] -= value * self.scale[window, column] * self.sae.W_dec[occurrence.latent]
            return ablated.to(acts.dtype)

        return replace


def _batches(by_window: dict[int, list[int]]) -> list[list[int]]:
    """Windows grouped so that each forward's (1 + most occurrences in a window) x windows rows stay
    within ROWS_PER_FORWARD (a window alone may exceed it)."""
    batches, batch, depth = [], [], 0
    for window in sorted(by_window):
        new_depth = max(depth, len(by_window[window]))
        if batch and (1 + new_depth) * (len(batch) + 1) > ROWS_PER_FORWARD:
            batches.append(batch)
            batch, new_depth = [], len(by_window[window])
        batch.append(window)
        depth = new_depth
    return batches + ([batch] if batch else [])


@torch.no_grad()
def ablation_effects(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor,
                     occurrences: list[Occurrence], horizon: int = 16) -> tuple[list[float | None], int]:
    """effect_sparsity of each occurrence's ablation over the logits at positions t .. t + horizon - 1
    (in the order given), and the vocabulary size."""
    runner = SpliceRunner(model, get_module(model, hookpoint), start=1)
    device = next(model.parameters()).device
    by_window: dict[int, list[int]] = defaultdict(list)
    for number, occurrence in enumerate(occurrences):
        by_window[occurrence.window].append(number)
    results: list[float | None] = [None] * len(occurrences)
    vocab = 0
    for batch in _batches(by_window):
        per_window = [[occurrences[number] for number in by_window[window]] for window in batch]
        depth = max(map(len, per_window))
        variants = _AblationVariants(sae, runner, per_window, start=1)
        replacements = [variants.reconstruction, *(variants.ablation(i) for i in range(depth))]
        logits = runner.logits(windows[batch].to(device), replacements)  # (1 + depth, B, T, V)
        vocab = logits.shape[-1]
        for row, window in enumerate(batch):
            for variant, number in enumerate(by_window[window]):
                span = slice(occurrences[number].position, occurrences[number].position + horizon)
                results[number] = effect_sparsity(logits[1 + variant, row, span] - logits[0, row, span])
    return results, vocab


def ablation_section(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, n_latents: int,
                     per_latent: int = 4, horizon: int = 16, seed: int = 0, batch_windows: int = 16,
                     latents: list[int] | None = None) -> dict:
    """The report's `ablation_sparsity` section: mean, distribution and per-latent values."""
    sae = sae.eval()
    occurrences = choose_occurrences(model, hookpoint, sae, windows, n_latents, per_latent, horizon, seed,
                                     batch_windows, latents)
    effects, vocab = ablation_effects(model, hookpoint, sae, windows, occurrences, horizon)
    per_latent_effects: dict[int, list[float]] = defaultdict(list)
    for occurrence, effect in zip(occurrences, effects):
        if effect is not None:
            per_latent_effects[occurrence.latent].append(effect)
    latent_means = {occurrence.latent: mean_or_none(per_latent_effects[occurrence.latent]) for occurrence in occurrences}
    measured = sorted(value for value in latent_means.values() if value is not None)
    measured_effects = [effect for effect in effects if effect is not None]
    return {
        "mean": mean_or_none(measured),
        "median": _quantile(measured, 0.5),
        "quantiles": {str(q): _quantile(measured, q) for q in (0.1, 0.25, 0.75, 0.9)},
        "mean_over_ablations": mean_or_none(measured_effects),
        "latents": len(measured),
        "ablations": len(measured_effects),
        "no_effect": len(effects) - len(measured_effects),
        "horizon": horizon,
        "vocab": vocab,
        "per_latent": {str(latent): value for latent, value in sorted(latent_means.items())},
    }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between the nearest ranks of an ascending list; None for an empty one."""
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
