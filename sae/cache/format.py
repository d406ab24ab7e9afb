"""The cache's on-disk format: names, manifest (read, check, write), identity, errors, shard files and their checks."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_to_bytes
from torch import Tensor

from ..config import TrainConfig, to_dict
from ..model import atomic_write
from .batching import windows_per_block

FORMAT = "sae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
DEFAULT_SHARD_TOKENS = 2**17
"""Activation rows per shard unless --shard_tokens says otherwise (64 MiB of float32 at d_in=128)."""

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64"}
_SHARD_FILE = re.compile(r"^shard-\d{5,}\.safetensors$")
_TEMP_FILE = re.compile(r"^\.(shard-\d{5,}\.safetensors|manifest\.json)\.tmp-\d+$")  # atomic_write's names

IDENTITY_KEYS = (
    "model", "hookpoint", "model_dtype", "storage_dtype", "ctx_len", "dataset", "dataset_config", "split",
    "text_column", "lm_batch_windows", "windows_per_block",
)
"""Manifest keys that must match for a resume to add to a cache: they decide what every row is."""

_MANIFEST_KEYS = IDENTITY_KEYS + (
    "format", "format_version", "d_in", "tokens_per_window", "windows_per_shard", "shards", "n_windows",
    "n_tokens", "windows_state", "complete",
)
_SHARD_KEYS = ("file", "first_window", "windows", "rows", "bytes", "sha256")


class CacheError(ValueError):
    """A cache folder that cannot be used as it is: unreadable manifest, other version, other config."""


class CorruptShardError(CacheError):
    """A shard listed in the manifest whose file is missing, truncated or not the bytes that were written."""


# ---------------------------------------------------------------- manifest and shard files


def cache_identity(cfg: TrainConfig, storage_dtype: str) -> dict[str, Any]:
    """The manifest keys that say what every cached row is (IDENTITY_KEYS), for `cfg`."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, not {storage_dtype!r}")
    return {
        "model": cfg.model,
        "hookpoint": cfg.hookpoint,
        "model_dtype": cfg.model_dtype,
        "storage_dtype": storage_dtype,
        "ctx_len": cfg.data.ctx_len,
        "dataset": cfg.data.dataset,
        "dataset_config": cfg.data.dataset_config,
        "split": cfg.data.split,
        "text_column": cfg.data.text_column,
        "lm_batch_windows": cfg.data.lm_batch_windows,
        "windows_per_block": windows_per_block(cfg),
    }


def check_same_identity(manifest: dict[str, Any], identity: dict[str, Any], directory: Path) -> None:
    """Refuse to add to a cache built for another model, hookpoint, data or LM batching."""
    differing = [f"{key}: {manifest.get(key)!r} in the cache, {identity[key]!r} requested"
                 for key in IDENTITY_KEYS if manifest.get(key) != identity[key]]
    if differing:
        raise CacheError(
            f"{directory} holds a cache of something else ({'; '.join(differing)}). Use another --out, or delete "
            f"{directory} to rebuild it (windows_per_block follows from batch_size, shuffle_buffer_tokens and ctx_len)"
        )



def _new_manifest(identity: dict[str, Any], d_in: int, windows_per_shard: int, windows_state: dict[str, Any],
                  cfg: TrainConfig) -> dict[str, Any]:
    """The manifest of an empty cache.

    format, format_version   "sae-activation-cache", 1
    IDENTITY_KEYS            model, hookpoint, model_dtype, storage_dtype, ctx_len, dataset, dataset_config,
                             split, text_column, lm_batch_windows, windows_per_block
    d_in, tokens_per_window  row width; rows per window (ctx_len - 1)
    windows_per_shard        windows per new shard (each shard entry has its own count)
    shards                   complete shards in order: {file, first_window, windows, rows, bytes, sha256}
    n_windows, n_tokens      totals over the listed shards (n_tokens = activation rows)
    windows_state            TokenWindows.state_dict() after the last listed shard (where a resume continues)
    complete                 whether the last build reached the number of tokens it was asked for
    train_config             the full config it was built with (for the record only)
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **identity,
        "d_in": d_in,
        "tokens_per_window": identity["ctx_len"] - 1,
        "windows_per_shard": windows_per_shard,
        "shards": [],
        "n_windows": 0,
        "n_tokens": 0,
        "windows_state": windows_state,
        "complete": False,
        "train_config": to_dict(cfg),
    }


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the cache in `directory`, checked for version, keys and consistent shard entries."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no activation cache in {directory}: {path} not found (build one with python -m sae.cache)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an activation cache manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format version {manifest.get('format_version')}; this code reads version "
                         f"{FORMAT_VERSION}: rebuild the cache with python -m sae.cache")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CacheError(f"{path} lacks the key(s) {', '.join(missing)}")
    _check_shard_entries(manifest, path)
    return manifest


def _check_shard_entries(manifest: dict[str, Any], path: Path) -> None:
    """The shard entries must tile windows 0..n_windows in order, with rows = windows * tokens_per_window."""
    next_window = 0
    for number, entry in enumerate(manifest["shards"]):
        missing = [key for key in _SHARD_KEYS if key not in entry]
        if missing:
            raise CacheError(f"{path}: shard entry {number} lacks the key(s) {', '.join(missing)}")
        if entry["first_window"] != next_window or entry["rows"] != entry["windows"] * manifest["tokens_per_window"]:
            raise CacheError(f"{path}: shard entry {number} ({entry['file']}) does not follow the one before it "
                             f"(first_window {entry['first_window']}, expected {next_window})")
        next_window += entry["windows"]
    if manifest["n_windows"] != next_window or manifest["n_tokens"] != next_window * manifest["tokens_per_window"]:
        raise CacheError(f"{path}: n_windows {manifest['n_windows']} / n_tokens {manifest['n_tokens']} do not add up "
                         f"to the {next_window} windows of its shards")


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (temp file, fsync, rename, fsync of the folder)."""
    text = _manifest_text(manifest)
    atomic_write(directory / MANIFEST, lambda tmp: _write_bytes(tmp, text.encode()))
    _fsync_dir(directory)


def _manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one line per key and per shard entry (the token-stream state stays on one line)."""
    lines = []
    for key, value in manifest.items():
        if key == "shards" and value:
            entries = ",\n".join(f"  {json.dumps(entry)}" for entry in value)
            lines.append(f' "shards": [\n{entries}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` (one function, so that tests can simulate a crash half way through)."""
    with open(path, "wb") as file:
        file.write(data)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(directory: Path, entry: dict[str, Any], check_hash: bool) -> str | None:
    """What is wrong with a listed shard's file (missing, other size, other sha256), or None if nothing."""
    path = directory / entry["file"]
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"it has {size:,} bytes, the manifest says {entry['bytes']:,}"
    if check_hash:
        digest = _sha256_of_file(path)
        if digest != entry["sha256"]:
            return f"its sha256 is {digest[:16]}..., the manifest says {entry['sha256'][:16]}..."
    return None


def _corrupt_shard_message(directory: Path, entry: dict[str, Any], problem: str) -> str:
    return (f"shard {directory / entry['file']} is truncated or corrupt: {problem}. It was not read; rebuild it "
            f"with `python -m sae.cache --out {directory} --resume` and the --config/overrides the cache was built with")


def _write_shard(directory: Path, number: int, first_window: int, input_ids: Tensor, activations: Tensor) -> dict[str, Any]:
    """Write shard `number` atomically; its manifest entry (size and sha256 of the bytes written)."""
    data = safetensors_to_bytes(
        {"activations": activations.contiguous(), "input_ids": input_ids.contiguous()},
        metadata={"first_window": str(first_window)},  # one key: safetensors orders several at random
    )
    name = _shard_name(number)
    atomic_write(directory / name, lambda tmp: _write_bytes(tmp, data))
    _fsync_dir(directory)
    return {"file": name, "first_window": first_window, "windows": len(input_ids), "rows": len(activations),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
