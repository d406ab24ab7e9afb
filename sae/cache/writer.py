"""Building a cache: a new one, or resuming / repairing one (one writer per folder, one manifest update per shard)."""

from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import TokenWindows
from .batching import LmBatches, lm_batches_for, windows_for_training
from .compute import _compute_shards, _Lm, _load_lm, _shard_bounds, _token_windows
from .format import (
    _SHARD_FILE,
    _TEMP_FILE,
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    CacheError,
    _new_manifest,
    _write_manifest,
    _write_shard,
    cache_identity,
    check_same_identity,
    read_manifest,
    shard_problem,
)
from .reader import ActivationCache

# ---------------------------------------------------------------- building a cache


@dataclass
class BuildReport:
    """What a build did: the cache's totals, and what this run wrote and how fast."""

    out: Path
    hookpoints: list[str]
    n_windows: int
    n_tokens: int
    bytes_total: int
    windows_written: int
    tokens_written: int
    bytes_written: int
    shards_rewritten: list[str]
    files_removed: list[str]
    seconds: float
    """Time spent computing and writing shards (the model load and checks not included)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


def build_cache(cfg: TrainConfig, out_dir: str | Path, tokens: int | None = None, shard_tokens: int | None = None,
                storage_dtype: str | None = None, resume: bool = False, progress: bool = True,
                hookpoints: list[str] | None = None) -> BuildReport:
    """Write (or add to, or repair) the activation cache of `cfg` in `out_dir` until it holds `tokens` rows.

    It caches `hookpoints`, in that order, all from one LM forward per batch; left out, the hookpoints a
    training run of `cfg` reads (`run_hookpoints`: its variants' hookpoints, or `cfg.hookpoint`). `tokens` defaults to what a training run of `cfg` reads; it is rounded up to whole windows. A folder
    that already has a manifest for the same IDENTITY_KEYS is resumed whether or not `resume` is set:
    stray and corrupt shard files are deleted and rewritten, then the stream continues after the last
    listed shard. A manifest for anything else (other hookpoints, or another order, included) is refused
    with the differing keys named, and so is adding to a version 1 cache (it can only be read).
    `shard_tokens` and `storage_dtype` default to the existing cache's, else DEFAULT_SHARD_TOKENS and float32.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens_per_window = cfg.data.ctx_len - 1
    target_windows = -(-(tokens or windows_for_training(cfg) * tokens_per_window) // tokens_per_window)
    with _WriterLock(out):
        existing = read_manifest(out) if (out / MANIFEST).exists() else None
        if resume and existing is None:
            print(f"{out} has no manifest: nothing to resume, starting a new cache")
        storage_dtype = storage_dtype or (existing["storage_dtype"] if existing else "float32")
        identity = cache_identity(cfg, storage_dtype, hookpoints)
        if existing is not None:
            check_same_identity(existing, identity, out)
            if existing["format_version"] != FORMAT_VERSION:
                raise CacheError(f"{out} holds a version {existing['format_version']} cache (written by an older "
                                 f"sae.cache): it can be read and trained from, but not added to or repaired. Build a "
                                 f"new one in another --out, or delete {out} to rebuild it")

        lm, tokenizer, d_in = _load_lm(cfg, storage_dtype, identity["hookpoints"])
        lm_batches = lm_batches_for(cfg)
        if existing is not None and existing["d_in"] != d_in:
            raise CacheError(f"{out / MANIFEST} has the widths (d_in) {existing['d_in']}, but those hookpoints of "
                             f"{cfg.model} have widths {d_in}")

        windows_per_shard = (-(-shard_tokens // tokens_per_window) if shard_tokens
                             else existing["windows_per_shard"] if existing
                             else -(-DEFAULT_SHARD_TOKENS // tokens_per_window))
        if existing is None:
            manifest = _new_manifest(identity, d_in, windows_per_shard, _token_windows(cfg, tokenizer).state_dict(), cfg)
        else:
            manifest = dict(existing, windows_per_shard=windows_per_shard)
        files_removed = _remove_unlisted_files(out, manifest)
        manifest["complete"] = manifest["n_windows"] >= target_windows
        _write_manifest(out, manifest)

        started = time.perf_counter()
        bar = _progress_bar(target_windows, manifest["n_windows"], tokens_per_window, progress)
        try:
            rewritten = _rewrite_corrupt_shards(out, manifest, lm, lm_batches, _token_windows(cfg, tokenizer))
            written = _append_shards(out, manifest, lm, lm_batches, _token_windows(cfg, tokenizer), target_windows, bar)
        finally:  # an error or Ctrl-C is then printed on a line of its own
            bar.close()
        seconds = time.perf_counter() - started
    return BuildReport(
        out=out, hookpoints=list(manifest["hookpoints"]), n_windows=manifest["n_windows"], n_tokens=manifest["n_tokens"],
        bytes_total=sum(entry["bytes"] for entry in manifest["shards"]),
        windows_written=sum(entry["windows"] for entry in written),
        tokens_written=sum(entry["rows"] for entry in written),
        bytes_written=sum(entry["bytes"] for entry in written),
        shards_rewritten=rewritten, files_removed=files_removed, seconds=seconds,
    )


class _WriterLock:
    """An exclusive lock on DIR/.lock for the duration of a build: two writers would delete each other's files."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.file = None

    def __enter__(self) -> "_WriterLock":
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise CacheError(f"another process is writing the cache in {self.path.parent} (it holds {self.path})") from None
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _remove_unlisted_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Delete shard files the manifest does not list and leftover temporary files: a crash's remains."""
    listed = {entry["file"] for entry in manifest["shards"]}
    removed = []
    for path in sorted(directory.iterdir()):
        if (_SHARD_FILE.match(path.name) and path.name not in listed) or _TEMP_FILE.match(path.name):
            path.unlink()
            removed.append(path.name)
    if removed:
        print(f"removed {len(removed)} file(s) left by an interrupted build: {', '.join(removed)}")
    return removed


def _rewrite_corrupt_shards(directory: Path, manifest: dict[str, Any], lm: _Lm, lm_batches: LmBatches,
                            replay: TokenWindows) -> list[str]:
    """Delete and recompute every listed shard whose file is missing or differs from the manifest.

    The token stream is replayed from the start (tokenizer only) up to each bad shard, which is then
    recomputed in the same LM batches as the first time; the manifest entry gets the new bytes' hash.
    """
    bad = [(number, entry, problem) for number, entry in enumerate(manifest["shards"])
           if (problem := shard_problem(directory, entry, check_hash=True)) is not None]
    for _, entry, problem in bad:
        print(f"shard {entry['file']} is truncated or corrupt ({problem}): deleting and rewriting it")
        (directory / entry["file"]).unlink(missing_ok=True)
    start_state = replay.state_dict()
    position = 0  # windows read from `replay`
    for number, entry, _ in bad:
        first, stop = entry["first_window"], entry["first_window"] + entry["windows"]
        batch_first = lm_batches.start(first)
        if batch_first < position:  # its LM batch began in the shard just rewritten: replay from the start
            replay.load_state_dict(start_state)
            position = 0
        for _ in range(position, batch_first):
            next(replay)
        prefix = [next(replay) for _ in range(batch_first, first)]
        (shard,) = _compute_shards(lm, replay, lm_batches, [(first, stop)], prefix)
        new_entry = _write_shard(directory, number, first, shard.input_ids, shard.activations)
        if new_entry["sha256"] != entry["sha256"]:
            print(f"note: the rewritten {entry['file']} differs from the bytes first written (nondeterministic LM kernels?)")
        manifest["shards"][number] = new_entry
        _write_manifest(directory, manifest)
        replay.load_state_dict(shard.windows_state)
        position = stop
    return [entry["file"] for _, entry, _ in bad]


def _append_shards(directory: Path, manifest: dict[str, Any], lm: _Lm, lm_batches: LmBatches, windows: TokenWindows,
                   target_windows: int, bar: Any) -> list[dict[str, Any]]:
    """Compute and write the shards from the manifest's end up to `target_windows`, one manifest update each."""
    first = manifest["n_windows"]
    if first >= target_windows:
        return []
    windows.load_state_dict(manifest["windows_state"])
    batch_first = lm_batches.start(first)
    prefix = list(ActivationCache(directory).input_ids(batch_first, first - batch_first)) if batch_first < first else []
    written = []
    bounds = _shard_bounds(first, target_windows, manifest["windows_per_shard"])
    for shard in _compute_shards(lm, windows, lm_batches, bounds, prefix, on_rows=bar.update):
        entry = _write_shard(directory, len(manifest["shards"]), shard.first_window, shard.input_ids, shard.activations)
        manifest["shards"].append(entry)
        manifest["n_windows"] += entry["windows"]
        manifest["n_tokens"] += entry["rows"]
        manifest["windows_state"] = shard.windows_state
        manifest["complete"] = manifest["n_windows"] >= target_windows
        _write_manifest(directory, manifest)
        written.append(entry)
    return written


def _progress_bar(target_windows: int, done_windows: int, tokens_per_window: int, enabled: bool) -> Any:
    """A tqdm bar counting activation rows (tokens) toward the target."""
    from tqdm.auto import tqdm

    total = max(target_windows, done_windows) * tokens_per_window
    return tqdm(total=total, initial=done_windows * tokens_per_window, unit="tok", unit_scale=True,
                dynamic_ncols=True, disable=not enabled, desc="caching")
