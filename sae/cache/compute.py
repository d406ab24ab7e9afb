"""Computing the activations: the LM cut after its last hookpoint, run on the stream's LM batches, cut into shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..activations import capture_many, check_context_length, get_site, hookpoint_widths, load_run_lm
from ..config import TrainConfig
from ..data import TokenWindows, load_text_dataset
from ..distributed import resolve_device
from .batching import LmBatches
from .format import STORAGE_DTYPES, CacheError

# ---------------------------------------------------------------- computing the activations


@dataclass
class _Lm:
    """The LM cut after its last hookpoint: activations of windows at every hookpoint, position 0 dropped,
    in the storage dtype, on CPU."""

    model: nn.Module
    hookpoints: list[str]
    modules: list[nn.Module]
    """The modules of `hookpoints`, in that order."""
    device: torch.device
    storage_dtype: torch.dtype

    def activations(self, input_ids: Tensor) -> list[Tensor]:
        """Per hookpoint, (windows, ctx_len - 1, d_in) for `input_ids` (windows, ctx_len): one LM forward for
        all of them (`capture_many`, which refuses activations that are not finite), as the stream does it.
        A CacheError if one does not fit the storage dtype (`_check_fits`), before anything is written."""
        captured = capture_many(self.model, self.modules, input_ids.to(self.device))
        stored = []
        for hookpoint, rows in zip(self.hookpoints, captured):
            rows = rows[:, 1:].float()
            stored.append(_check_fits(hookpoint, rows, rows.to(self.storage_dtype)).cpu())
        return stored


def _check_fits(hookpoint: str, rows: Tensor, stored: Tensor) -> Tensor:
    """`stored`, the float32 `rows` cast to the storage dtype, if every value of it is finite; else a CacheError
    naming the hookpoint, the largest |x| and the dtype's largest value: float16 (max 65504) overflows to inf
    where a model's residual stream grows large, and a cache of inf trains nothing."""
    if bool(stored.isfinite().all()):
        return stored
    name = str(stored.dtype).removeprefix("torch.")
    raise CacheError(f"activations at {hookpoint} overflow {name} storage: max |x| {rows.abs().max().item():.3g}, "
                     f"{name} holds at most {torch.finfo(stored.dtype).max:.6g}; use --storage_dtype bfloat16 or "
                     "float32 (in a new --out: a cache keeps the storage dtype it was started with)")


@dataclass
class _Shard:
    """One shard's worth of computed windows, and the token stream's state just after its last window."""

    first_window: int
    input_ids: Tensor
    activations: list[Tensor]
    """Per hookpoint, (windows * (ctx_len - 1), d_in) in the storage dtype."""
    windows_state: dict[str, Any]


def _compute_shards(lm: _Lm, windows: TokenWindows, lm_batches: LmBatches, shard_bounds: list[tuple[int, int]],
                    prefix: list[Tensor], on_rows: Callable[[int], None] = lambda rows: None) -> Iterator[_Shard]:
    """The shards [first, end) of `shard_bounds` (consecutive), computed in `lm_batches`' groups.

    `windows` yields window number shard_bounds[0][0] next; `prefix` holds the windows of its LM batch that
    come before it (so that batch is the stream's batch). The last LM batch reads windows past the last
    shard if it must (they are only run through the LM), which leaves `windows` past that point: each
    shard carries the state to continue from just after it.
    """
    first, stop = shard_bounds[0][0], shard_bounds[-1][1]
    batch_first = lm_batches.start(first)
    if len(prefix) != first - batch_first:
        raise AssertionError(f"window {first} needs the {first - batch_first} windows before it, got {len(prefix)}")
    shard_ends = {end for _, end in shard_bounds}
    states: dict[int, dict[str, Any]] = {}
    pending_bounds = list(shard_bounds)
    ids_parts: list[Tensor] = []
    activation_parts: list[list[Tensor]] = [[] for _ in lm.modules]  # per hookpoint
    next_window = first
    while batch_first < stop:
        batch_end = lm_batches.end(batch_first)
        batch = list(prefix) if batch_first < first else []
        while next_window < batch_end:
            batch.append(next(windows))
            next_window += 1
            if next_window in shard_ends:
                states[next_window] = windows.state_dict()
        input_ids = torch.stack(batch)
        activations = lm.activations(input_ids)
        window = max(batch_first, first)
        while window < min(batch_end, stop):
            shard_first, shard_end = pending_bounds[0]
            upto = min(shard_end, batch_end, stop)
            ids_parts.append(input_ids[window - batch_first : upto - batch_first])
            for parts, rows in zip(activation_parts, activations):
                parts.append(rows[window - batch_first : upto - batch_first])
            on_rows((upto - window) * activations[0].shape[1])
            window = upto
            if window == shard_end:
                pending_bounds.pop(0)
                yield _Shard(shard_first, torch.cat(ids_parts), [torch.cat(parts).flatten(0, 1) for parts in activation_parts],
                             states.pop(shard_end))
                ids_parts, activation_parts = [], [[] for _ in lm.modules]
        batch_first = batch_end


def _shard_bounds(first: int, stop: int, windows_per_shard: int) -> list[tuple[int, int]]:
    """[first, stop) cut into shards of windows_per_shard windows (the last may hold fewer)."""
    return [(start, min(start + windows_per_shard, stop)) for start in range(first, stop, windows_per_shard)]


def _token_windows(cfg: TrainConfig, tokenizer: Any) -> TokenWindows:
    """The token stream of a one-process training run of `cfg`, from its start."""
    return TokenWindows(load_text_dataset(cfg.data), tokenizer, cfg.data.ctx_len, cfg.data.text_column)


def _load_lm(cfg: TrainConfig, storage_dtype: str, hookpoints: list[str]) -> tuple[_Lm, Any, dict[str, int]]:
    """The config's LM cut after the last of `hookpoints` on its device ("auto" as in training), its
    tokenizer, and each hookpoint's width {name: d_in}."""
    device = resolve_device(cfg.device)
    model, tokenizer = load_run_lm(cfg, device)
    check_context_length(model, cfg.data.ctx_len)
    modules = [get_site(model, hookpoint) for hookpoint in hookpoints]
    d_in = hookpoint_widths(model, hookpoints)
    return _Lm(model, hookpoints, modules, device, STORAGE_DTYPES[storage_dtype]), tokenizer, d_in
