"""Reading a cache: `ActivationCache` (any run of windows, checked against the manifest) and `CachedWindows`
(the activations of the next windows, looping: the source an ActivationStream reads instead of the LM)."""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..activations import WindowRows
from ..data import read_position
from .format import (
    _SAFETENSORS_DTYPES,
    CacheError,
    CorruptShardError,
    _corrupt_shard_message,
    activations_tensor,
    read_manifest,
    shard_problem,
)

# ---------------------------------------------------------------- reading a cache


class ActivationCache:
    """Read-only view of a cache folder: activations (at any of its hookpoints) and token ids of any run of
    windows, in stream order. Reads format versions 1 and 2 (`manifest` is in version 2's shape for both).

    Opening checks the manifest and that every listed shard file exists with the listed size (a
    truncated shard is refused before anything is read); `verify=True` also checks every sha256 and that every
    stored activation is finite. At most two shard files are open at a time (memory-mapped by safetensors;
    nothing is unpickled).
    """

    _OPEN_SHARDS = 2

    def __init__(self, directory: str | Path, verify: bool = False):
        self.directory = Path(directory)
        self._manifest = read_manifest(self.directory)
        self._shards: list[dict[str, Any]] = self._manifest["shards"]
        self._first_windows = [entry["first_window"] for entry in self._shards]
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._check_shards(check_hash=verify)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (a copy)."""
        return json.loads(json.dumps(self._manifest))

    @property
    def n_windows(self) -> int:
        return self._manifest["n_windows"]

    @property
    def n_tokens(self) -> int:
        """Activation rows: n_windows * (ctx_len - 1)."""
        return self._manifest["n_tokens"]

    @property
    def hookpoints(self) -> list[str]:
        """The cached hookpoints, in the cache's order."""
        return list(self._manifest["hookpoints"])

    @property
    def d_in_of(self) -> dict[str, int]:
        """Width of each cached hookpoint: {hookpoint: d_in}, in the cache's order."""
        return dict(self._manifest["d_in"])

    @property
    def hookpoint(self) -> str:
        """The first cached hookpoint (the only one of a single-hookpoint cache)."""
        return self._manifest["hookpoints"][0]

    @property
    def d_in(self) -> int:
        """Width of the first cached hookpoint."""
        return self._manifest["d_in"][self.hookpoint]

    @property
    def ctx_len(self) -> int:
        return self._manifest["ctx_len"]

    @property
    def tokens_per_window(self) -> int:
        return self._manifest["tokens_per_window"]

    @property
    def complete(self) -> bool:
        """Whether the build that wrote it reached the number of tokens it was asked for."""
        return self._manifest["complete"]

    def verify(self) -> None:
        """Check the sha256 of every shard, then that every stored activation is finite; CorruptShardError naming
        every bad one, or a CacheError naming the first shard with NaN or inf values."""
        self._check_shards(check_hash=True)

    def _check_shards(self, check_hash: bool) -> None:
        """Every listed shard file must exist with its listed size (and sha256, and finite activations: `verify`):
        else CorruptShardError naming each bad one."""
        problems = [_corrupt_shard_message(self.directory, entry, problem) for entry in self._shards
                    if (problem := shard_problem(self.directory, entry, check_hash)) is not None]
        if problems:
            raise CorruptShardError("\n".join(problems))
        if check_hash:
            for number in range(len(self._shards)):
                self._check_finite(number)

    def _check_finite(self, number: int) -> None:
        """A CacheError naming shard `number` and a hookpoint where it holds NaN or inf: its hash matches, so the
        values were written so (float16 storage that overflowed, before sae.cache checked for that)."""
        for index, hookpoint in enumerate(self._manifest["hookpoints"]):
            rows = self._shard(number).get_tensor(activations_tensor(self._manifest, index))
            bad = int((~rows.isfinite()).sum())
            if bad:
                raise CacheError(f"shard {self.directory / self._shards[number]['file']} holds {bad:,} NaN or inf "
                                 f"activation value(s) at {hookpoint} (of {rows.numel():,}; storage dtype "
                                 f"{self._manifest['storage_dtype']}): training on it would give nan; build the cache "
                                 "again in a new --out (with --storage_dtype bfloat16 or float32 if it was float16)")

    def index_of(self, hookpoint: str) -> int:
        """Position of `hookpoint` among the cached ones; CacheError listing them if it is not cached."""
        if hookpoint not in self._manifest["hookpoints"]:
            raise CacheError(f"hookpoint '{hookpoint}' is not in the cache in {self.directory}, which holds "
                             f"{', '.join(self._manifest['hookpoints'])}")
        return self._manifest["hookpoints"].index(hookpoint)

    def read_windows(self, first_window: int, count: int, hookpoint: str | None = None) -> Tensor:
        """Activations at `hookpoint` (None: the first cached one) of windows first_window .. first_window+count-1:
        (count*(ctx_len-1), d_in) float32."""
        index = 0 if hookpoint is None else self.index_of(hookpoint)
        name = activations_tensor(self._manifest, index)
        pieces = self._read(name, first_window, count, self.tokens_per_window)
        if not pieces:
            return torch.zeros(0, self._manifest["d_in"][self._manifest["hookpoints"][index]])
        return torch.cat(pieces).float()

    def input_ids(self, first_window: int, count: int) -> Tensor:
        """Token ids of windows first_window .. first_window+count-1: (count, ctx_len) int64."""
        pieces = self._read("input_ids", first_window, count, 1)
        return torch.cat(pieces) if pieces else torch.zeros(0, self.ctx_len, dtype=torch.long)

    def _read(self, name: str, first_window: int, count: int, rows_per_window: int) -> list[Tensor]:
        """Rows of tensor `name` for the windows asked for, one piece per shard they span."""
        if first_window < 0 or count < 0 or first_window + count > self.n_windows:
            raise IndexError(f"windows {first_window}..{first_window + count - 1} ({count} from {first_window}) are "
                             f"out of range: the cache in {self.directory} holds windows 0..{self.n_windows - 1}")
        pieces = []
        window, stop = first_window, first_window + count
        while window < stop:
            number = bisect.bisect_right(self._first_windows, window) - 1
            entry = self._shards[number]
            upto = min(stop, entry["first_window"] + entry["windows"])
            start = window - entry["first_window"]
            rows = self._shard(number).get_slice(name)[start * rows_per_window : (upto - entry["first_window"]) * rows_per_window]
            pieces.append(rows)
            window = upto
        return pieces

    def _shard(self, number: int) -> Any:
        """The open safetensors file of shard `number` (opened, checked against the manifest, on first use)."""
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        entry = self._shards[number]
        path = self.directory / entry["file"]
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:
            raise CorruptShardError(_corrupt_shard_message(self.directory, entry, f"safetensors cannot open it ({error})")) from None
        self._check_shard_header(handle, entry)
        self._open[number] = handle
        while len(self._open) > self._OPEN_SHARDS:
            self._open.popitem(last=False)
        return handle

    def _check_shard_header(self, handle: Any, entry: dict[str, Any]) -> None:
        """The shard's tensors must have the shapes and dtypes the manifest implies."""
        expected = {
            activations_tensor(self._manifest, index): ([entry["rows"], d_in], self._manifest["storage_dtype"])
            for index, d_in in enumerate(self._manifest["d_in"].values())
        } | {"input_ids": ([entry["windows"], self.ctx_len], "int64")}
        for name, (shape, dtype) in expected.items():
            if name not in handle.keys():
                problem = f"it has no tensor '{name}'"
            else:
                tensor = handle.get_slice(name)
                found_dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())
                if list(tensor.get_shape()) == shape and found_dtype == dtype:
                    continue
                problem = f"'{name}' is {found_dtype} {list(tensor.get_shape())}, the manifest implies {dtype} {shape}"
            raise CorruptShardError(_corrupt_shard_message(self.directory, entry, problem))


class CachedWindows:
    """The activations of the next windows of a cache, in order, looping over it (epochs): the cache's
    stand-in for `LMWindowSource` (the LM + TokenWindows pair) as the source of an ActivationStream.

    Like that source it has `ctx_len`, `hookpoints` and returns one tensor per hookpoint, in `hookpoints`
    order: the ones asked for (a subset of the cached ones, any order), by default all, in the cache's
    order. Its state is JSON-able: the next window and the passes made. Past
    the cache's end it starts again from window 0; that differs from streaming, whose token stream goes
    on with new windows, so a run equals its streamed twin only while it reads fewer windows than the
    cache holds (see `windows_for_training`).
    """

    def __init__(self, cache: ActivationCache, hookpoints: list[str] | None = None):
        if cache.n_windows == 0:
            raise CacheError(f"the cache in {cache.directory} holds no windows")
        hookpoints = cache.hookpoints if hookpoints is None else list(hookpoints)
        if not hookpoints or len(set(hookpoints)) != len(hookpoints):
            raise ValueError(f"CachedWindows needs one or more distinct hookpoints, got {hookpoints}")
        for hookpoint in hookpoints:
            cache.index_of(hookpoint)  # a clear error if it is not cached
        self.cache = cache
        self.ctx_len = cache.ctx_len
        self.hookpoints = hookpoints
        self.next_window = 0
        self.epoch = 0

    def next_activations(self, n_windows: int) -> WindowRows:
        """The `WindowRows` of the next n_windows windows (per hookpoint, (n_windows*(ctx_len-1), d_in)
        float32, and their tokens), from the start again after the end."""
        pieces: list[list[Tensor]] = [[] for _ in self.hookpoints]
        token_ids: list[Tensor] = []
        remaining = n_windows
        while remaining > 0:
            count = min(remaining, self.cache.n_windows - self.next_window)
            for parts, hookpoint in zip(pieces, self.hookpoints):
                parts.append(self.cache.read_windows(self.next_window, count, hookpoint))
            token_ids.append(self.cache.input_ids(self.next_window, count)[:, 1:].flatten())
            self.next_window += count
            remaining -= count
            if self.next_window == self.cache.n_windows:
                self.next_window = 0
                self.epoch += 1
        d_in = self.cache.d_in_of
        activations = [torch.cat(parts) if parts else torch.zeros(0, d_in[hookpoint]) for parts, hookpoint in zip(pieces, self.hookpoints)]
        return WindowRows(activations, torch.cat(token_ids) if token_ids else torch.zeros(0, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the next window to hand out and the number of full passes made."""
        return {"next_window": self.next_window, "epoch": self.epoch}

    def text_read(self) -> dict[str, Any]:
        """The end of the text the cache was built from (its token stream's read position): a run
        reading the cache read at most that much text, in a one-process stream's order."""
        return read_position(self.cache.manifest["windows_state"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not 0 <= state["next_window"] < self.cache.n_windows:
            raise ValueError(f"cached-windows state next_window={state['next_window']} is outside the cache in "
                             f"{self.cache.directory}, which holds {self.cache.n_windows} windows")
        self.next_window = state["next_window"]
        self.epoch = state["epoch"]
