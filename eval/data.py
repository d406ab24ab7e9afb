"""Held-out evaluation text: token windows the SAE's training did not read.

Where the text comes from, in order:
1. the split asked for (`--split`), as given;
2. the embedded corpus: its `validation` split;
3. a hub dataset with a `validation` or `test` split (whichever loads first);
4. otherwise (a local file or a hub dataset with one split) the training split, after skipping the
   tokens training read (`tokens_trained` in cfg.json). Training read its stream from the start, so
   what follows is unseen unless training looped over the whole dataset, which is then an error.
   NOT YET EXACT (issue 11): training reads whole shuffle blocks and each window gives ctx_len - 1
   activations, so it read more than ceil(tokens_trained / ctx_len) windows; and under data parallelism
   each rank may read whole files of its own. The fix records each stream's final position in cfg.json.
The report's `data.held_out` says which rule applied.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from sae.config import DataConfig
from sae.data import TokenWindows, is_local_dataset, load_text_dataset
from sae.embedded import CORPUS_NAME, EMBEDDED_MODEL_DIR

HELD_OUT_SPLITS = ("validation", "test")


def resolve_model_path(name: str) -> str:
    """The model named in a cfg.json: an embedded-model path from another checkout maps to this one's."""
    path = Path(name)
    if not path.exists() and path.name == EMBEDDED_MODEL_DIR.name and path.parent.name == EMBEDDED_MODEL_DIR.parent.name:
        return str(EMBEDDED_MODEL_DIR)
    return name


def held_out_windows(
    data: DataConfig,
    tokenizer,
    n_tokens: int,
    split: str = "",
    tokens_trained: int | None = None,
) -> tuple[Tensor, dict]:
    """(n_windows, ctx_len) int64 windows of held-out text, and a description of where they came from.

    n_windows = ceil(n_tokens / ctx_len), or fewer when the held-out text runs out first.

    `data` is the training data config (dataset, split, text column, ctx_len); `split` overrides the
    choice of held-out split. `tokens_trained` None forbids rule 4 (used during training, when the
    training split is still being read).
    """
    if n_tokens <= 0:
        raise ValueError(f"the number of eval tokens must be positive, got {n_tokens}")
    n_windows = math.ceil(n_tokens / data.ctx_len)
    skip_windows = 0
    if split:
        rule = f"split '{split}' (as asked)"
    elif held_out := held_out_split(data):
        split, rule = held_out
    else:
        if tokens_trained is None:
            raise ValueError(
                f"dataset '{data.dataset}' has no held-out split; name one that training does not read "
                "(a split, or another dataset)"
            )
        split = data.split
        skip_windows = math.ceil(tokens_trained / data.ctx_len)
        rule = f"training split '{split}' after the first {tokens_trained:,} tokens (what training read)"
    dataset = load_text_dataset(replace(data, split=split))
    windows = TokenWindows(dataset, tokenizer, data.ctx_len, data.text_column, loop=False)
    collected = []
    try:
        for _ in range(skip_windows):
            next(windows)
        for _ in range(n_windows):
            collected.append(next(windows))
    except StopIteration:
        pass
    if not collected:
        raise ValueError(f"no held-out text: {data.dataset} ({rule}) ran out after skipping {skip_windows * data.ctx_len:,} "
                         "tokens; pass a held-out split or dataset")
    description = {
        "dataset": data.dataset, "dataset_config": data.dataset_config, "split": split, "held_out": rule,
        "ctx_len": data.ctx_len, "windows": len(collected),
    }
    return torch.stack(collected), description


def held_out_split(data: DataConfig) -> tuple[str, str] | None:
    """(split, rule) of rules 2-3, the held-out split a dataset has of its own; None if it has none
    (a local file, or a hub dataset with one split), when only rule 4 or a named split is left."""
    if data.dataset == CORPUS_NAME:
        return "validation", "the embedded corpus' validation split"
    if not is_local_dataset(data.dataset) and (split := _first_loadable_split(data)):
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
