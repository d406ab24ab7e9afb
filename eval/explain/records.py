"""Activation records: for each unit (an SAE latent or an MLP neuron), the held-out excerpts where it
is strongest and a set of random excerpts, as token strings with raw activations.

A neuron is read where every family has its MLP's neurons: the input of the MLP's output projection
(`find_mlp_neurons`; gated MLPs included), or the output of a module the user names (`NeuronSite`).

A latent's activations are the SAE's codes of what it encodes (`encode_windows`): its hookpoint's output,
or a transcoder's module's input.

An excerpt is one eval window minus its first position (the position the SAE never sees), so
ctx_len - 1 tokens: 63 with the default 64-token windows (Bills et al. use 64-token excerpts).

One pass over the windows keeps, per unit, the `n_top` windows with the highest maximum activation
(a running top-k over (units, n_top) tensors: memory does not grow with the text). The explainer sees
the top excerpts of even rank; scoring uses those of odd rank and the random excerpts, so no scoring
excerpt is one the explainer saw. Random excerpts come from one seeded draw of windows, the same for
every unit except that a unit skips the windows of its own explanation excerpts (the next windows of
the draw take their place): a unit that rarely fires shows mostly zeros there, as it should.

With `n_quantiles`, each unit also gets activating excerpts across its activation distribution, for
detection and fuzzing (Paulo et al. 2024 draw activating examples across activation quantiles, not only
the top ones): its activating windows (maximum > 0) ranked by maximum, cut into `n_quantiles` bins of
equal size, one window drawn from each; never one of its top or random windows. The pass keeps every
window's maximum per unit ((units, windows) floats); a second pass reads the drawn windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, NamedTuple

import torch
from torch import Tensor, nn

from sae.activations import capture_activations, capture_many, get_module, get_site, module_name_summary
from sae.config import input_site
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
    """Random excerpts: windows of one seeded draw, none of them an explanation excerpt's window."""

    quantile: list[Excerpt] = field(default_factory=list)
    """Activating excerpts, one per bin of the unit's activation distribution, strongest bin first
    (`collect_records`' n_quantiles); none from a top or random excerpt's window."""

    extra: dict = field(default_factory=dict)

    def explanation_excerpts(self, count: int = 5) -> list[Excerpt]:
        """Top excerpts the explainer sees: ranks 0, 2, 4, ... (the odd ranks are kept for scoring)."""
        return [self.top[rank] for rank in explanation_ranks(len(self.top))][:count]

    def scoring_top(self, count: int = 5) -> list[Excerpt]:
        """Top excerpts for scoring, disjoint from the explainer's: ranks 1, 3, 5, ..."""
        return self.top[1::2][:count]


def explanation_ranks(n_top: int) -> range:
    """Ranks of the top excerpts an explainer may see (0, 2, 4, ...); no scoring excerpt comes from their windows."""
    return range(0, n_top, 2)


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
    n_quantiles: int = 0,
) -> list[UnitRecords]:
    """Records for `units` (their activations come from `unit_activations`, in that order).

    Each unit gets `n_random` random excerpts (fewer only when `windows` has too few windows besides
    its explanation excerpts'), and up to `n_quantiles` quantile excerpts (module docstring)."""
    n_windows = len(windows)
    n_top = min(n_top, n_windows)
    # enough windows in the draw for every unit to skip its explanation windows and keep n_random
    pool_ids = random_window_draw(n_windows, n_random + len(explanation_ranks(n_top)), seed)
    top_scores = top_ids = top_acts = pool_acts = None
    maxima = []  # (U, B) per batch: every window's maximum per unit, for the quantile draw
    for first in range(0, n_windows, batch_windows):
        acts = unit_activations(windows[first : first + batch_windows]).float().cpu()  # (B, T-1, U)
        batch_ids = torch.arange(first, first + len(acts))
        per_unit = acts.permute(2, 0, 1)  # (U, B, T-1)
        scores = per_unit.amax(-1)  # (U, B)
        if n_quantiles:
            maxima.append(scores)
        if top_scores is None:
            top_scores, top_ids, top_acts = scores, batch_ids.expand_as(scores), per_unit
            pool_acts = acts.new_zeros(len(pool_ids), *acts.shape[1:])  # (pool, T-1, U)
        else:
            top_scores = torch.cat([top_scores, scores], 1)
            top_ids = torch.cat([top_ids, batch_ids.expand_as(scores)], 1)
            top_acts = torch.cat([top_acts, per_unit], 1)
        keep = top_scores.topk(min(n_top, top_scores.shape[1]), dim=1).indices  # bounded: (U, n_top)
        top_scores, top_ids = top_scores.gather(1, keep), top_ids.gather(1, keep)
        top_acts = top_acts.gather(1, keep[..., None].expand(-1, -1, top_acts.shape[-1]))
        in_batch = ((pool_ids >= first) & (pool_ids < first + len(acts))).nonzero().squeeze(1)
        pool_acts[in_batch] = acts[pool_ids[in_batch] - first]

    def excerpt(window_id: int, activations: Tensor) -> Excerpt:
        return Excerpt(token_strings(windows[window_id, 1:]), activations.tolist(), window_id)

    records = []
    for column, unit in enumerate(units):
        top = [excerpt(int(window_id), top_acts[column, rank]) for rank, window_id in enumerate(top_ids[column])]
        seen = {int(top_ids[column, rank]) for rank in explanation_ranks(n_top)}
        rows = held_out_rows(pool_ids, seen, n_random)
        random = [excerpt(int(pool_ids[row]), pool_acts[row, :, column]) for row in rows]
        records.append(UnitRecords(unit=unit, kind=kind, top=top, random=random))
    if n_quantiles and records:
        add_quantile_excerpts(records, windows, unit_activations, torch.cat(maxima, 1), token_strings, n_quantiles,
                              batch_windows, seed)
    return records


def quantile_window_ids(maxima: Tensor, excluded: list[set[int]], n_quantiles: int, seed: int) -> list[list[int]]:
    """Per unit (a row of `maxima`, (U, N) window maxima), one window drawn at random (seeded) from each of
    `n_quantiles` equal bins of its activating windows (maximum > 0, none in `excluded[unit]`) ranked by
    maximum, strongest bin first; fewer windows than bins fill as many bins."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for row, skip in zip(maxima, excluded, strict=True):
        ranked = [w for w in torch.argsort(row, descending=True, stable=True).tolist() if row[w] > 0 and w not in skip]
        bins = [ranked[len(ranked) * q // n_quantiles : len(ranked) * (q + 1) // n_quantiles] for q in range(n_quantiles)]
        chosen.append([b[int(torch.randint(len(b), (1,), generator=generator))] for b in bins if b])
    return chosen


@torch.no_grad()
def add_quantile_excerpts(records: list[UnitRecords], windows: Tensor, unit_activations: UnitActivations, maxima: Tensor,
                          token_strings: Callable[[Tensor], list[str]], n_quantiles: int, batch_windows: int, seed: int) -> None:
    """Fills each record's `quantile` excerpts (records in the order of the units of `unit_activations`):
    windows from `quantile_window_ids`, away from the record's top and random windows, read in one more
    pass over just those windows."""
    excluded = [{excerpt.window for excerpt in record.top + record.random} for record in records]
    chosen = quantile_window_ids(maxima, excluded, n_quantiles, seed)
    wanted = sorted({window for ids in chosen for window in ids})
    if not wanted:
        return
    row_of = {window: row for row, window in enumerate(wanted)}
    acts = torch.cat([unit_activations(windows[wanted[first : first + batch_windows]]).float().cpu()
                      for first in range(0, len(wanted), batch_windows)])  # (len(wanted), T-1, U)
    for column, (record, ids) in enumerate(zip(records, chosen)):
        record.quantile = [Excerpt(token_strings(windows[w, 1:]), acts[row_of[w], :, column].tolist(), w) for w in ids]


def random_window_draw(n_windows: int, count: int, seed: int) -> Tensor:
    """(min(count, n_windows),) distinct window ids in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_windows, generator=generator)[:count]


def held_out_rows(pool_ids: Tensor, seen: set[int], count: int) -> list[int]:
    """Rows of the first `count` windows of the draw `pool_ids` that are not in `seen`, in window order."""
    rows = [row for row, window_id in enumerate(pool_ids.tolist()) if window_id not in seen][:count]
    return sorted(rows, key=lambda row: int(pool_ids[row]))


class WindowCodes(NamedTuple):
    """What an SAE encodes (`encoded_site`) at positions 1 .. of a batch of windows, and its codes of it."""

    hidden: Tensor
    """(B, P, d_in) on the SAE's device, in the LM's dtype."""
    values: Tensor
    """(B * P, k) window-major."""
    indices: Tensor
    """(B * P, k) int64."""


def encoded_site(sae: SparseAutoencoder, hookpoint: str) -> str:
    """The activation site (sae.activations.get_site) whose activations `sae` at `hookpoint` encodes: the
    hookpoint's output for an SAE; for a transcoder, which predicts module `hookpoint`'s output, that
    module's input (HOOKPOINT:input)."""
    return input_site(hookpoint) if sae.cfg.transcode else hookpoint


@torch.no_grad()
def encode_windows(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, input_ids: Tensor,
                   last: int | None = None) -> WindowCodes:
    """Run the LM on `input_ids` (B, T) up to `hookpoint` and the SAE on positions 1 .. last (default
    T - 1) of what it encodes (`encoded_site`): position 0 is never encoded, as in training. Every latent
    section of the eval (explain, N2G, probe, ablation) reads an SAE's codes through here."""
    stop = None if last is None else last + 1
    device = next(model.parameters()).device
    site = encoded_site(sae, hookpoint)
    hidden = capture_many(model, [get_site(model, site)], input_ids.to(device))[0][:, 1:stop].to(sae.device)
    if hidden.shape[-1] != sae.cfg.d_in:
        what = f"the input of {hookpoint} has" if sae.cfg.transcode else f"{hookpoint} outputs"
        raise UsageError(f"the SAE takes d_in={sae.cfg.d_in}, but {what} {hidden.shape[-1]} features")
    values, indices = sae.encode(hidden.flatten(0, 1).to(sae.dtype))
    return WindowCodes(hidden, values, indices)


def cat_codes(values: list[Tensor], indices: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The codes of several batches, values and indices each (N_b, c_b), as one (N, c) pair. A BatchTopK SAE's
    codes are as wide as the busiest token of their batch, so narrower batches are padded with value 0 at
    latent 0, an entry every reader of codes skips (a latent fires where its value is > 0)."""
    width = max(codes.shape[1] for codes in values)

    def padded(codes: Tensor) -> Tensor:
        return torch.nn.functional.pad(codes, (0, width - codes.shape[1]))

    return torch.cat([padded(codes) for codes in values]), torch.cat([padded(codes) for codes in indices])


def sae_latent_activations(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, latents: list[int]) -> UnitActivations:
    """The chosen latents' values (0 where a latent is not in a token's top k)."""
    get_module(model, hookpoint)  # a wrong name fails here, not at the first call
    column = torch.full((sae.cfg.n_latents,), -1, dtype=torch.long, device=sae.device)
    column[torch.tensor(latents, dtype=torch.long, device=sae.device)] = torch.arange(len(latents), device=sae.device)

    def activations(input_ids: Tensor) -> Tensor:
        hidden, values, indices = encode_windows(model, hookpoint, sae, input_ids)
        chosen = column[indices]
        dense = torch.zeros(values.shape[0], len(latents) + 1, dtype=values.dtype, device=values.device)
        dense.scatter_add_(1, torch.where(chosen >= 0, chosen, len(latents)), values)  # the spare column absorbs the rest
        return dense[:, :-1].view(*hidden.shape[:2], len(latents))

    return activations


def neuron_activations(model: nn.Module, site: NeuronSite, units: list[int]) -> UnitActivations:
    """Chosen neurons of `site`, e.g. Llama's MLP neurons: the input of `model.layers.2.mlp.down_proj`."""
    get_module(model, site.module)  # a wrong name fails here, not at the first call
    device = next(model.parameters()).device
    index = torch.tensor(units, device=device)

    def activations(input_ids: Tensor) -> Tensor:
        return capture_neurons(model, site, input_ids.to(device))[:, 1:].index_select(-1, index)

    return activations


@torch.no_grad()
def sae_codes(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, batch_windows: int = 32,
              last: int | None = None) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Per batch of `windows` (N, T): (its first window, positions per window P, values, indices), the SAE's
    codes (P * batch, k) of positions 1 .. last (default T - 1), window-major."""
    for first in range(0, len(windows), batch_windows):
        hidden, values, indices = encode_windows(model, hookpoint, sae, windows[first : first + batch_windows], last)
        yield first, hidden.shape[1], values, indices


def latent_fire_counts(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor, batch_windows: int = 32,
                       last: int | None = None) -> Tensor:
    """(n_latents,) how many tokens (positions 1 .. last, default all) each latent fired on."""
    counts = torch.zeros(sae.cfg.n_latents, dtype=torch.long)
    for _, _, values, indices in sae_codes(model, hookpoint, sae, windows, batch_windows, last):
        counts += fire_counts(values, indices, sae.cfg.n_latents)
    return counts


@dataclass(frozen=True)
class NeuronSite:
    """Where an LM's neurons are read: the output channels of a module, or the input of one (an MLP's
    output projection, whose input is the MLP's neurons in every family, gated ones included)."""

    module: str
    """The module's name in `model.named_modules()`."""
    reads: Literal["input", "output"]

    def __str__(self) -> str:
        return f"the {self.reads} of {self.module}"


MLP_NAMES = ("mlp", "ffn", "feed_forward")
"""Names of a block's MLP child (GPT-2, GPT-NeoX, Llama and kin, Phi: mlp; MPT: ffn; Llama 4: feed_forward)."""

OUTPUT_PROJECTIONS = ("c_proj", "dense_4h_to_h", "down_proj", "fc2", "fc_out")
"""Names of an MLP's output projection: GPT-2 (and GPT-BigCode), GPT-NeoX (and Bloom, Falcon), gated
MLPs (Llama, Mistral, Qwen2, Gemma, Gemma2, Phi3, OLMo), Phi, GPT-J. Its input is act(W_in x) or, gated,
act(W_gate x) * (W_up x): the neurons."""


def named_neuron_site(model: nn.Module, module_name: str) -> NeuronSite:
    """The output channels of the module the user named (--neuron_module); one line when it is not a module."""
    modules = dict(model.named_modules())
    if module_name not in modules:
        raise UsageError(f"--neuron_module '{module_name}' is not a module of {type(model).__name__}; modules are: "
                         f"{module_name_summary([name for name in modules if name])}")
    return NeuronSite(module_name, "output")


def find_mlp_neurons(model: nn.Module, hookpoint: str) -> NeuronSite | None:
    """The MLP neurons of the block `hookpoint` belongs to (the module path up to its layer number, e.g.
    transformer.h.2, gpt_neox.layers.2, model.layers.2): the input of the output projection of the
    block's MLP child. The projection is the child of a known name, else the MLP's last nn.Linear child
    that maps back to the width the MLP reads. None when there is no such block, MLP or projection. A
    transcoder's hookpoint, the MLP itself (transformer.h.2.mlp), gives that MLP's neurons."""
    parts = hookpoint.split(".")
    blocks = [".".join(parts[:end]) for end in range(len(parts), 0, -1) if parts[end - 1].isdigit()]  # innermost first
    modules = dict(model.named_modules())
    mlp = next((f"{block}.{name}" for block in blocks for name in MLP_NAMES if f"{block}.{name}" in modules), None)
    if mlp is None:
        return None
    children = dict(modules[mlp].named_children())
    projection = next((name for name in OUTPUT_PROJECTIONS if name in children), None)
    if projection is None:
        linears = [(name, child) for name, child in children.items() if isinstance(child, nn.Linear)]
        back = [name for name, child in linears if child.out_features == linears[0][1].in_features]
        projection = back[-1] if back else None
    return None if projection is None else NeuronSite(f"{mlp}.{projection}", "input")


def no_neurons_note(model: nn.Module, hookpoint: str) -> str:
    """Why the neuron baseline is missing, and how to get it."""
    return (f"no MLP neurons found for hookpoint {hookpoint} in {type(model).__name__} (looked for the output "
            f"projection of the MLP child ({'/'.join(MLP_NAMES)}) of its numbered block): the neuron baseline is "
            "skipped; --neuron_module NAME names a module whose output channels are the neurons")


class _Captured(Exception):
    """Raised by the capture hook once it has the neurons: the rest of the LM is not needed."""


@torch.no_grad()
def capture_neurons(model: nn.Module, site: NeuronSite, input_ids: Tensor) -> Tensor:
    """The neurons at `site` for `input_ids` (B, T): (B, T, n_neurons)."""
    module = get_module(model, site.module)
    if site.reads == "output":
        return capture_activations(model, module, input_ids)
    captured = []

    def hook(_module, inputs):
        captured.append(inputs[0])
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        model(input_ids=input_ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{site.module} did not run in the forward pass")
    return captured[0]
