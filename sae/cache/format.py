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
from ..errors import MissingFileError, UserError
from ..files import atomic_write
from .batching import windows_per_block

FORMAT = "sae-activation-cache"
FORMAT_VERSION = 2
"""Version written. Version 1 caches (one hookpoint, "hookpoint" key, one "activations" tensor) are still read."""
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOCK = ".lock"
DEFAULT_SHARD_TOKENS = 2**17
"""Activation rows per shard unless --shard_tokens says otherwise (64 MiB of float32 at d_in=128)."""

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64"}
_SHARD_FILE = re.compile(r"^shard-\d{5,}\.safetensors$")
_TEMP_FILE = re.compile(r"^\.(shard-\d{5,}\.safetensors|manifest\.json)\.tmp-\d+$")  # atomic_write's names

IDENTITY_KEYS = (
    "model", "hookpoints", "model_dtype", "storage_dtype", "ctx_len", "dataset", "dataset_config", "split",
    "text_column", "lm_batch_windows", "windows_per_block",
)
"""Manifest keys that must match for a resume to add to a cache: they decide what every row is. The
hookpoints are a list: which hookpoints, and in which order (the order of the shards' tensors)."""

_MANIFEST_KEYS = IDENTITY_KEYS + (
    "format", "format_version", "d_in", "tokens_per_window", "windows_per_shard", "shards", "n_windows",
    "n_tokens", "windows_state", "complete",
)
_V1_KEYS = tuple("hookpoint" if key == "hookpoints" else key for key in _MANIFEST_KEYS)
_SHARD_KEYS = ("file", "first_window", "windows", "rows", "bytes", "sha256")


class CacheError(UserError, ValueError):
    """A cache folder that cannot be used as it is: unreadable manifest, other version, other config."""


class CorruptShardError(CacheError):
    """A shard listed in the manifest whose file is missing, truncated or not the bytes that were written."""


# ---------------------------------------------------------------- manifest and shard files


def run_hookpoints(cfg: TrainConfig) -> list[str]:
    """The hookpoints a training run of `cfg` reads, in order (`TrainConfig.hookpoints`)."""
    return cfg.hookpoints


def check_hookpoint_list(hookpoints: list[str]) -> list[str]:
    """`hookpoints` as a list, refused if empty, with an empty name or with a name twice."""
    hookpoints = list(hookpoints)
    if not hookpoints or not all(isinstance(name, str) and name for name in hookpoints):
        raise ValueError(f"a cache needs one or more hookpoint names, got {hookpoints!r}")
    twice = sorted({name for name in hookpoints if hookpoints.count(name) > 1})
    if twice:
        raise ValueError(f"hookpoint(s) {', '.join(twice)} listed more than once in {hookpoints}")
    return hookpoints


def cache_identity(cfg: TrainConfig, storage_dtype: str, hookpoints: list[str] | None = None) -> dict[str, Any]:
    """The manifest keys that say what every cached row is (IDENTITY_KEYS), for `cfg`.

    "hookpoints" is `hookpoints` if given (the CLI's --hookpoints), else `run_hookpoints(cfg)`.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, not {storage_dtype!r}")
    return {
        "model": cfg.model_identity,
        "hookpoints": check_hookpoint_list(run_hookpoints(cfg) if hookpoints is None else hookpoints),
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


def check_same_identity(manifest: dict[str, Any], identity: dict[str, Any], directory: Path,
                        hookpoints_subset: bool = False) -> None:
    """Refuse to add to (or train from) a cache built for other hookpoints, model, data or LM batching.

    `hookpoints_subset=True` (for reading) accepts a cache that holds the requested hookpoints among others,
    in any order: a hookpoint's rows do not depend on which others were captured in the same forward.
    """
    def same(key: str) -> bool:
        if key == "hookpoints" and hookpoints_subset:
            return set(identity[key]) <= set(manifest.get(key) or ())
        return manifest.get(key) == identity[key]

    differing = [f"{key}: {manifest.get(key)!r} in the cache, {identity[key]!r} requested"
                 for key in IDENTITY_KEYS if not same(key)]
    if differing:
        raise CacheError(
            f"{directory} holds a cache of something else ({'; '.join(differing)}). Use another --out, or delete "
            f"{directory} to rebuild it (windows_per_block follows from batch_size, shuffle_buffer_tokens and ctx_len)"
        )


def activations_tensor(manifest: dict[str, Any], index: int) -> str:
    """Name, in every shard, of the activations of hookpoint number `index` of manifest["hookpoints"]:
    "activations.<index>" (version 2); "activations" in a version 1 cache (one hookpoint)."""
    return "activations" if manifest["format_version"] == 1 else f"activations.{index}"


def _new_manifest(identity: dict[str, Any], d_in: dict[str, int], windows_per_shard: int, windows_state: dict[str, Any],
                  cfg: TrainConfig) -> dict[str, Any]:
    """The manifest of an empty cache.

    format, format_version   "sae-activation-cache", 2
    IDENTITY_KEYS            model, hookpoints (list of module names, in shard-tensor order), model_dtype,
                             storage_dtype, ctx_len, dataset, dataset_config, split, text_column,
                             lm_batch_windows, windows_per_block
    d_in                     row width of each hookpoint: {name: width}, in the order of "hookpoints"
    tokens_per_window        rows per window (ctx_len - 1), the same for every hookpoint
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
    """The manifest of the cache in `directory`, checked for version, keys and consistent shard entries.

    A version 1 manifest is returned in version 2's shape ("hookpoints": [its "hookpoint"], "d_in":
    {hookpoint: d_in}), keeping "format_version": 1, which says its shards name the tensor "activations".
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"no activation cache in {directory}: {path} not found (build one with python -m sae.cache)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an activation cache manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if version not in READ_VERSIONS:
        raise CacheError(f"{path} has format version {version}; this code reads versions "
                         f"{' and '.join(map(str, READ_VERSIONS))}: rebuild the cache with python -m sae.cache")
    missing = [key for key in (_V1_KEYS if version == 1 else _MANIFEST_KEYS) if key not in manifest]
    if missing:
        raise CacheError(f"{path} lacks the key(s) {', '.join(missing)}")
    if version == 1:  # in version 2's shape, key order kept
        hookpoint = manifest["hookpoint"]
        upgraded = {"hookpoint": ("hookpoints", [hookpoint]), "d_in": ("d_in", {hookpoint: manifest["d_in"]})}
        manifest = dict(upgraded.get(key, (key, value)) for key, value in manifest.items())
    _check_hookpoints(manifest, path)
    _check_shard_entries(manifest, path)
    return manifest


def _check_hookpoints(manifest: dict[str, Any], path: Path) -> None:
    """"hookpoints" must be a list of distinct names and "d_in" give each one's width, in that order."""
    hookpoints, d_in = manifest["hookpoints"], manifest["d_in"]
    try:
        check_hookpoint_list(hookpoints if isinstance(hookpoints, list) else [])
    except ValueError as error:
        raise CacheError(f"{path}: \"hookpoints\" is not a list of distinct module names ({error})") from None
    if not isinstance(d_in, dict) or list(d_in) != hookpoints or not all(isinstance(w, int) and w > 0 for w in d_in.values()):
        raise CacheError(f"{path}: \"d_in\" must give the width of each of {hookpoints} in that order, got {d_in!r}")


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


def _write_shard(directory: Path, number: int, first_window: int, input_ids: Tensor,
                 activations: list[Tensor]) -> dict[str, Any]:
    """Write shard `number` (version 2: one tensor per hookpoint, "activations.<index>") atomically; its
    manifest entry (size and sha256 of the bytes written)."""
    tensors = {f"activations.{index}": rows.contiguous() for index, rows in enumerate(activations)}
    data = safetensors_to_bytes(
        tensors | {"input_ids": input_ids.contiguous()},
        metadata={"first_window": str(first_window)},  # one key: safetensors orders several at random
    )
    name = _shard_name(number)
    atomic_write(directory / name, lambda tmp: _write_bytes(tmp, data))
    _fsync_dir(directory)
    return {"file": name, "first_window": first_window, "windows": len(input_ids), "rows": len(activations[0]),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
