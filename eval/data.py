"""Held-out evaluation text: token windows the SAE's training did not read.

Where the text comes from, in order:
1. the split asked for (`--split`), as given, unless it is the training split of the training
   dataset: that one is read past what training read (rule 4), or refused;
2. the embedded corpus and local data files: their `validation` split (documents chosen by a hash of
   their text, `sae.splits`, which the training split never contains);
3. a hub dataset with a `validation` or `test` split (whichever loads first);
4. otherwise (a hub dataset with one split) the training split, past what training read. The trainer records in cfg.json (`text_read`) where each data-parallel replica's stream
   stopped: the end of the last document it read, including documents it tokenized but never trained
   on. The eval replays each replica's shard from that point, so every window it uses comes from a
   document no replica read; a replica that went past the end of its shard (a second epoch) read all
   of it and gives nothing. Several SAEs evaluated together skip the furthest any of them read. A
   folder without the record (older versions, other tools), SAEs trained with different numbers of
   replicas, or local files whose sizes changed since training are refused: name a `--split`.
The report's `data.held_out` says which rule applied.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from sae.activations import is_folder_path
from sae.config import DataConfig
from sae.data import TokenWindows, is_local_dataset, load_text_dataset, local_file_sizes
from sae.embedded import CORPUS_NAME, EMBEDDED_MODEL_DIR
from sae.errors import MissingFileError, UsageError

HELD_OUT_SPLITS = ("validation", "test")


def resolve_model_path(name: str) -> str:
    """The model named in a cfg.json: an embedded-model path from another checkout maps to this one's."""
    path = Path(name)
    if not path.exists() and path.name == EMBEDDED_MODEL_DIR.name and path.parent.name == EMBEDDED_MODEL_DIR.parent.name:
        return str(EMBEDDED_MODEL_DIR)
    return name


def check_recorded_model(name: str, cfg_json: Path) -> None:
    """Before anything loads: a model folder that `cfg_json` records but that is no longer there (moved,
    or recorded relative to another working folder) fails in one line naming both and --model. A name
    that may be a hub id ("gpt2", "org/name") is left to the loader."""
    if is_folder_path(name) and not Path(name).expanduser().exists():
        raise MissingFileError(f"the model folder {name} that {cfg_json} records does not exist (moved?); "
                               "pass --model with where it is now (a folder or a hub name)")


def held_out_windows(
    data: DataConfig,
    tokenizer,
    n_tokens: int,
    split: str = "",
    read_by_training: list[dict | None] | None = None,
    training_dataset: bool = True,
) -> tuple[Tensor, dict]:
    """(n_windows, ctx_len) int64 windows of held-out text, and a description of where they came from.

    n_windows = ceil(n_tokens / ctx_len), or fewer when the held-out text runs out first.

    `data` is the training data config (dataset, split, text column, ctx_len), or another dataset's
    (`training_dataset=False`: all of it is held out); `split` overrides the choice of held-out split.
    `read_by_training` holds the cfg.json `text_read` record of each SAE to be evaluated (None for a
    folder without one); None itself forbids rule 4 (used during training, when the training split is
    still being read).
    """
    if n_tokens <= 0:
        raise ValueError(f"the number of eval tokens must be positive, got {n_tokens}")
    n_windows = math.ceil(n_tokens / data.ctx_len)
    where = f"dataset '{data.dataset}' has no held-out split"
    if split == data.split and training_dataset:
        # the training text itself: only what training did not read of it (rule 4)
        where = f"split '{split}' of '{data.dataset}' is the text training reads"
        split = ""
    elif split:
        rule = f"split '{split}' (as asked)"
    elif held_out := held_out_split(data):
        split, rule = held_out
    if split:
        streams = [TokenWindows(load_text_dataset(replace(data, split=split)), tokenizer, data.ctx_len, data.text_column,
                                loop=False)]
    else:
        split = data.split
        streams = unread_streams(data, tokenizer, read_by_training, where)
        rule = (f"training split '{split}' past what training read (cfg.json text_read: "
                f"{len(read_by_training[0]['streams'])} replica stream(s), {len(streams)} with text left)")
    collected = _round_robin(streams, n_windows)
    if not collected:
        raise UsageError(f"no held-out text: {data.dataset} ({rule}) has none left; pass a held-out split or dataset")
    description = {
        "dataset": data.dataset, "dataset_config": data.dataset_config, "split": split, "held_out": rule,
        "ctx_len": data.ctx_len, "windows": len(collected),
    }
    return torch.stack(collected), description


def unread_streams(data: DataConfig, tokenizer, read_by_training: list[dict | None] | None,
                   where: str) -> list[TokenWindows]:
    """Rule 4: per data-parallel replica with text left, its shard of the training split from just past
    the furthest any of the SAEs' training read (single pass). Refuses what cannot be replayed exactly,
    with `where` (why rule 4 applies) at the start of the message."""
    if read_by_training is None:
        raise UsageError(f"{where}; name one that training does not read (a split, or another dataset)")
    if not read_by_training or any(record is None for record in read_by_training):
        raise UsageError(f"{where}, and cfg.json does not record what training read of it ('text_read'; folders "
                         "from older versions or other tools); pass --split with text training did not read")
    replicas = sorted({record["replicas"] for record in read_by_training})
    if len(replicas) > 1:
        raise UsageError(f"{where}, and these SAEs were trained with {replicas} data-parallel replicas, which read "
                         "different parts of it; evaluate them separately, or pass --split")
    sizes = local_file_sizes(data)
    for record in read_by_training:
        if record["file_sizes"] != sizes:
            raise UsageError(f"{where}, and its files changed since training (sizes then {record['file_sizes']}, now "
                             f"{sizes}), so what training read cannot be replayed; pass --split")
    streams = []
    for replica in range(replicas[0]):
        positions = [record["streams"][replica] for record in read_by_training]
        if any(position["epoch"] > 0 for position in positions):
            continue  # that replica went past the end of its shard: it read all of it
        furthest = max(positions, key=lambda position: position["documents_this_epoch"])
        shard = load_text_dataset(data, rank=replica, world_size=replicas[0])
        windows = TokenWindows(shard, tokenizer, data.ctx_len, data.text_column, loop=False)
        try:
            windows.load_state_dict({**furthest, "pending": []})
        except (KeyError, ValueError, TypeError, IndexError) as error:
            raise UsageError(f"{where}, and cfg.json's record of what training read of it does not replay "
                             f"({type(error).__name__}: {error}); pass --split") from None
        streams.append(windows)
    return streams


def _round_robin(streams: list[TokenWindows], n_windows: int) -> list[Tensor]:
    """Up to n_windows windows taken in turn from each stream, until all run out."""
    collected: list[Tensor] = []
    active = list(streams)
    while active and len(collected) < n_windows:
        for windows in list(active):
            try:
                collected.append(next(windows))
            except StopIteration:
                active.remove(windows)
            if len(collected) == n_windows:
                break
    return collected


def held_out_split(data: DataConfig) -> tuple[str, str] | None:
    """(split, rule) of rules 2-3, the held-out split a dataset has of its own; None if it has none
    (a hub dataset with one split), when only rule 4 or a named split is left."""
    if data.dataset == CORPUS_NAME:
        return "validation", "the embedded corpus' validation split"
    if is_local_dataset(data.dataset):
        return "validation", "the local files' validation split (documents chosen by hash)"
    if split := _first_loadable_split(data):
        return split, f"the dataset's '{split}' split"
    return None


def _first_loadable_split(data: DataConfig) -> str | None:
    for candidate in HELD_OUT_SPLITS:
        if candidate == data.split:
            continue
        try:
            dataset = load_text_dataset(data, split=candidate)
            next(iter(dataset))
            return candidate
        except (ValueError, KeyError, StopIteration):
            continue
    return None
