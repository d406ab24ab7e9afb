"""Activation records: for each unit (an SAE latent or an MLP neuron), the held-out excerpts where it
is strongest and a set of random excerpts, as token strings with raw activations.

An excerpt is one eval window minus its first position (the position the SAE never sees), so
ctx_len - 1 tokens: 63 with the default 64-token windows (Bills et al. use 64-token excerpts).

One pass over the windows keeps, per unit, the `n_top` windows with the highest maximum activation
(a running top-k over (units, n_top) tensors: memory does not grow with the text). Random excerpts are
the same windows for every unit, drawn once with a seeded generator, so a unit that rarely fires
shows mostly zeros there, as it should.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from sae.activations import capture_activations, get_module
from sae.errors import UsageError
from sae.model import SparseAutoencoder, fire_counts

UnitActivations = Callable[[Tensor], Tensor]
"""Maps token windows (B, T) to the chosen units' activations at positions 1.. : (B, T - 1, n_units)."""


@dataclass
class Excerpt:
    tokens: list[str]
    """Token strings as the tokenizer decodes them one by one (leading spaces kept)."""

    activations: list[float]
    """The unit's raw activation at each token."""

    window: int | None = None
    """Index of the eval window it came from (its tokens are that window's positions 1..), when known."""

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


@dataclass
class UnitRecords:
    """What the explainer and the simulators see of one unit."""

    unit: int
    """Latent index (or neuron index)."""

    kind: str
    """"latent", "neuron" or "puzzle"."""

    top: list[Excerpt]
    """Top-activating excerpts, strongest first."""

    random: list[Excerpt]
    """Random excerpts (the same windows for every unit)."""

    extra: dict = field(default_factory=dict)

    def explanation_excerpts(self, count: int = 5) -> list[Excerpt]:
        """Top excerpts the explainer sees: ranks 0, 2, 4, ... (the odd ranks are kept for scoring)."""
        return self.top[0::2][:count]

    def scoring_top(self, count: int = 5) -> list[Excerpt]:
        """Top excerpts for scoring, disjoint from the explainer's: ranks 1, 3, 5, ..."""
        return self.top[1::2][:count]


class TokenStrings:
    """Token id -> its string, decoded one token at a time (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Tensor | list[int]) -> list[str]:
        strings = []
        for token_id in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if token_id not in self._cache:
                self._cache[token_id] = self.tokenizer.decode([token_id])
            strings.append(self._cache[token_id])
        return strings


@torch.no_grad()
def collect_records(
    windows: Tensor,
    unit_activations: UnitActivations,
    units: list[int],
    token_strings: Callable[[Tensor], list[str]],
    kind: str,
    n_top: int = 10,
    n_random: int = 20,
    batch_windows: int = 32,
    seed: int = 0,
) -> list[UnitRecords]:
    """Records for `units` (their activations come from `unit_activations`, in that order)."""
    n_windows = len(windows)
    generator = torch.Generator().manual_seed(seed)
    random_ids = torch.randperm(n_windows, generator=generator)[: min(n_random, n_windows)].sort().values
    n_top = min(n_top, n_windows)
    top_scores = top_ids = top_acts = None
    random_acts = []
    for first in range(0, n_windows, batch_windows):
        acts = unit_activations(windows[first : first + batch_windows]).float().cpu()  # (B, T-1, U)
        batch_ids = torch.arange(first, first + len(acts))
        per_unit = acts.permute(2, 0, 1)  # (U, B, T-1)
        scores = per_unit.amax(-1)  # (U, B)
        if top_scores is None:
            top_scores, top_ids, top_acts = scores, batch_ids.expand_as(scores), per_unit
        else:
            top_scores = torch.cat([top_scores, scores], 1)
            top_ids = torch.cat([top_ids, batch_ids.expand_as(scores)], 1)
            top_acts = torch.cat([top_acts, per_unit], 1)
        keep = top_scores.topk(min(n_top, top_scores.shape[1]), dim=1).indices  # bounded: (U, n_top)
        top_scores, top_ids = top_scores.gather(1, keep), top_ids.gather(1, keep)
        top_acts = top_acts.gather(1, keep[..., None].expand(-1, -1, top_acts.shape[-1]))
        in_batch = (random_ids >= first) & (random_ids < first + len(acts))
        random_acts.append(acts[random_ids[in_batch] - first])
    random_acts = torch.cat(random_acts)  # (n_random, T-1, U)

    def excerpt(window_id: int, activations: Tensor) -> Excerpt:
        return Excerpt(token_strings(windows[window_id, 1:]), activations.tolist(), window_id)

    records = []
    for column, unit in enumerate(units):
        top = [excerpt(int(window_id), top_acts[column, rank]) for rank, window_id in enumerate(top_ids[column])]
        random = [excerpt(int(window_id), random_acts[row, :, column]) for row, window_id in enumerate(random_ids)]
        records.append(UnitRecords(unit=unit, kind=kind, top=top, random=random))
    return records


def sae_latent_activations(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, latents: list[int]) -> UnitActivations:
    """The chosen latents' values (0 where a latent is not in a token's top k)."""
    module = get_module(model, hookpoint)
    device = next(model.parameters()).device
    column = torch.full((sae.cfg.n_latents,), -1, dtype=torch.long, device=sae.device)
    column[torch.tensor(latents, device=sae.device)] = torch.arange(len(latents), device=sae.device)

    def activations(input_ids: Tensor) -> Tensor:
        hidden = capture_activations(model, module, input_ids.to(device))[:, 1:]
        values, indices = sae.encode(hidden.flatten(0, 1).to(sae.dtype))
        chosen = column[indices]
        dense = torch.zeros(values.shape[0], len(latents) + 1, dtype=values.dtype, device=values.device)
        dense.scatter_add_(1, torch.where(chosen >= 0, chosen, len(latents)), values)  # the spare column absorbs the rest
        return dense[:, :-1].view(*hidden.shape[:2], len(latents))

    return activations


def module_unit_activations(model: nn.Module, module_name: str, units: list[int]) -> UnitActivations:
    """Chosen channels of a module's output, e.g. GPT-2's MLP neurons `transformer.h.2.mlp.act`."""
    module = get_module(model, module_name)
    device = next(model.parameters()).device
    index = torch.tensor(units, device=device)

    def activations(input_ids: Tensor) -> Tensor:
        return capture_activations(model, module, input_ids.to(device))[:, 1:].index_select(-1, index)

    return activations


@torch.no_grad()
def sae_codes(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, batch_windows: int = 32,
              last: int | None = None) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Per batch of `windows` (N, T): (its first window, positions per window P, values, indices), the SAE's
    codes (P * batch, k) of positions 1 .. last (default T - 1), window-major."""
    module = get_module(model, hookpoint)
    device = next(model.parameters()).device
    stop = None if last is None else last + 1
    for first in range(0, len(windows), batch_windows):
        hidden = capture_activations(model, module, windows[first : first + batch_windows].to(device))[:, 1:stop]
        values, indices = sae.encode(hidden.flatten(0, 1).to(sae.dtype))
        yield first, hidden.shape[1], values, indices


def latent_fire_counts(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, batch_windows: int = 32,
                       last: int | None = None) -> Tensor:
    """(n_latents,) how many tokens (positions 1 .. last, default all) each latent fired on."""
    counts = torch.zeros(sae.cfg.n_latents, dtype=torch.long)
    for _, _, values, indices in sae_codes(model, hookpoint, sae, windows, batch_windows, last):
        counts += fire_counts(values, indices, sae.cfg.n_latents)
    return counts


def mlp_neuron_module(hookpoint: str) -> str:
    """The MLP activation module of the block a GPT-2 hookpoint belongs to: transformer.h.L -> transformer.h.L.mlp.act."""
    parts = hookpoint.split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end]) + ".mlp.act"
    raise UsageError(f"cannot tell the block of hookpoint '{hookpoint}'; name the neuron module explicitly")
