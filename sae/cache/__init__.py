"""On-disk activation cache: run the LM once, then train (many times) by reading activations from disk.

    python -m sae.cache --config configs/default.yaml --tokens 10_000_000 --out cache/default
    python -m sae.cache --config configs/default.yaml --tokens 10_000_000 --out cache/default --resume
    python -m sae.cache --out cache/default --verify          # check every shard's sha256, build nothing

Every `TrainConfig` key is accepted as an override (`--hookpoint`, `--model`, `--data.dataset`, `--device`).
`--tokens N` is the number of activation rows wanted (rounded up to whole windows); left out, it is what a
training run of the config reads (`windows_for_training`). The hookpoints cached are those a training run of
the config reads (`run_hookpoints`: the variants' hookpoints, a variant without one taking `hookpoint`, each
once, in order; just `hookpoint` without variants), or `--hookpoints h1,h2,...` (that order).

What is stored
--------------
The activations of whole token windows in stream order, unshuffled. For each window of `ctx_len` tokens
from `TokenWindows` (the config's dataset, tokenizer, ctx_len and text column; one process, rank 0 of 1)
the cache holds each hookpoint's output at positions 1..ctx_len-1 (all hookpoints from one LM forward,
`capture_many`, that stops after the last): position 0 is dropped exactly as `ActivationStream` drops it. The LM sees the windows in the same groups as when streaming (ActivationStream
asks its LMWindowSource for blocks of `windows_per_block` windows, each run in LM batches of
`lm_batch_windows` from the block's start, see `LmBatches`), in `model_dtype`, so the cached rows are
bitwise the rows the stream computes. `CachedWindows` is the source that hands them to an ActivationStream
instead (all cached hookpoints, or a subset); the shuffle happens there, in memory, as when streaming:
cache -> shuffle -> train equals stream -> train.
Only float32 storage of a float32 (or lower precision) model is bitwise equal to streaming;
`--storage_dtype bfloat16` or `float16` halves the size and rounds every activation.

Layout of DIR
-------------
    manifest.json             what the cache is and which shards are complete (see `format._new_manifest`);
                              "hookpoints": [names], "d_in": {name: width} (format version 2)
    shard-00000.safetensors   "activations.<i>" (windows*(ctx_len-1), d_in of hookpoint i) in the storage
    shard-00001.safetensors   dtype, one per hookpoint (i = its index in manifest["hookpoints"]), and
    ...                       "input_ids" (windows, ctx_len) int64; windows_per_shard windows each (the last
                              may hold fewer)

Version 1 caches (one hookpoint: manifest "hookpoint" and an int "d_in", shards with one "activations")
are still read, as a one-hookpoint cache; adding to or repairing one is refused (rebuild it). Builds write
version 2.

Ctrl-C stops a build with one line (exit status 130, `cli.INTERRUPTED_STATUS`): the windows its listed shards
hold, and the command to resume it, which is the same command. Activations that do not fit the storage dtype
(float16 overflows past 65504) stop a build before the shard is written, naming the hookpoint; `--verify` also
checks that every stored activation is finite.

Crash safety: a shard is written to a hidden temporary name, fsynced and renamed (`atomic_write`), and only
then is the manifest rewritten, atomically too, to list it. The manifest is the only truth: a shard file it
does not list (a crash between the rename and the manifest), a leftover temporary file, or a listed shard
whose size or sha256 differs from the manifest is deleted and written again on resume, never read. A resume
continues the token stream from the state saved in the manifest after its last shard; a corrupt shard in
the middle is recomputed by replaying the token stream (tokenizer only) up to it. One writer per folder at a
time (a lock file enforces it); readers only ever see shards the manifest lists.

Modules: `format` (manifest, identity, errors, shard files), `batching` (which windows the LM sees together),
`compute` (the LM cut after the last hookpoint, shards of activations), `writer` (`build_cache`: build, resume,
repair), `reader` (`ActivationCache`, `CachedWindows`), `cli` (`main`, run by `python -m sae.cache`).
"""

from __future__ import annotations

from .batching import LmBatches, lm_batches_for, windows_for_training, windows_per_block
from .cli import main
from .format import (
    DEFAULT_SHARD_TOKENS,
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    LOCK,
    MANIFEST,
    READ_VERSIONS,
    STORAGE_DTYPES,
    CacheError,
    CorruptShardError,
    cache_identity,
    check_same_identity,
    read_manifest,
    run_hookpoints,
    shard_problem,
)
from .reader import ActivationCache, CachedWindows
from .writer import BuildReport, build_cache

__all__ = [
    "DEFAULT_SHARD_TOKENS", "FORMAT", "FORMAT_VERSION", "IDENTITY_KEYS", "LOCK", "MANIFEST", "READ_VERSIONS", "STORAGE_DTYPES",
    "ActivationCache", "BuildReport", "CacheError", "CachedWindows", "CorruptShardError", "LmBatches",
    "build_cache", "cache_identity", "check_same_identity", "lm_batches_for", "main", "read_manifest",
    "run_hookpoints", "shard_problem", "windows_for_training", "windows_per_block",
]
