"""Text in, token windows out: HF `datasets` streaming -> tokenizer -> fixed windows of ctx_len tokens.

Documents are concatenated with the tokenizer's end-of-text token between them and cut into windows
of exactly `ctx_len` tokens (no padding). The stream's position is a small JSON-able state (the
dataset's own `state_dict()` plus the tokens read but not yet emitted), so a run resumes exactly.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any, Iterator

import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from .config import DataConfig
from .embedded import CORPUS_NAME
from .embedded.corpus import build_corpus
from .errors import MissingFileError, UsageError
from .splits import SPLITS, document_split

# Builders of `datasets` for local files, by extension.
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_text_dataset(cfg: DataConfig, split: str | None = None, rank: int = 0, world_size: int = 1) -> IterableDataset:
    """A streaming dataset of documents for `cfg`, sharded to this rank (disjoint across ranks).

    `cfg.dataset` is the embedded corpus name, a local file / folder / glob, or a hub dataset name.
    Local files have the embedded corpus' three splits, chosen per document by a hash of its text
    (`sae.splits`): `train` streams the 95% of documents that are neither `validation` nor `test`.
    """
    split = split or cfg.split
    if cfg.dataset == CORPUS_NAME:
        files = build_corpus(Path(cfg.data_dir) / CORPUS_NAME)
        if split not in files:
            raise UsageError(f"the embedded corpus has splits {sorted(files)}, not '{split}'")
        dataset = load_dataset("json", data_files={split: str(files[split])}, split=split, streaming=True)
    elif is_local_dataset(cfg.dataset):
        if split not in SPLITS:
            raise UsageError(f"a local dataset has the splits {list(SPLITS)} (chosen per document by a hash of its "
                             f"text), not '{split}'")
        files = _local_files(cfg.dataset)
        builder = _LOCAL_BUILDERS[Path(files[0]).suffix.lower()]
        dataset = load_dataset(builder, data_files={"all": files}, split="all", streaming=True)
        dataset = dataset.filter(_in_split, fn_kwargs={"split": split, "text_column": cfg.text_column})
    else:
        dataset = load_dataset(cfg.dataset, cfg.dataset_config, split=split, streaming=True)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset


def _in_split(document: dict, split: str, text_column: str) -> bool:
    """Whether a local document belongs to `split`. One without a text keeps its place, so that
    TokenWindows names the missing column."""
    text = document.get(text_column)
    return not isinstance(text, str) or document_split(text) == split


def is_local_dataset(name: str) -> bool:
    """True when `name` is a local file, folder or glob rather than a hub dataset name."""
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or any(char in name for char in "*?[")
        or Path(name).suffix.lower() in _LOCAL_BUILDERS
    )


def local_file_sizes(cfg: DataConfig) -> dict[str, int] | None:
    """{path: size in bytes} of a local dataset's files; None for the embedded corpus or a hub dataset.
    A record of what training read (cfg.json `text_read`) is replayable only while these are unchanged."""
    if cfg.dataset == CORPUS_NAME or not is_local_dataset(cfg.dataset):
        return None
    return {path: Path(path).stat().st_size for path in _local_files(cfg.dataset)}


def text_read_record(positions: list[dict[str, Any]], cfg: DataConfig) -> dict[str, Any]:
    """cfg.json's `text_read`: where each data-parallel replica's stream stopped reading (its
    `TokenWindows.read_position`, in replica order) and the local files' sizes then. eval/data.py's
    held-out rule 4 replays it."""
    return {"replicas": len(positions), "streams": positions, "file_sizes": local_file_sizes(cfg)}


def _local_files(pattern: str) -> list[str]:
    """Data files for a local path: the file itself, every data file under a folder, or a glob's matches."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        candidates = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in _LOCAL_BUILDERS)
    elif path.is_file():
        candidates = [str(path)]
    else:
        candidates = sorted(glob.glob(str(path)))
    if not candidates:
        raise MissingFileError(f"data file not found: {pattern}")
    suffixes = {Path(c).suffix.lower() for c in candidates}
    unknown = suffixes - set(_LOCAL_BUILDERS)
    if unknown or len({_LOCAL_BUILDERS[s] for s in suffixes}) != 1:
        raise UsageError(f"{pattern}: data files must all be one of {sorted(_LOCAL_BUILDERS)}; found {sorted(suffixes)}")
    return candidates


def read_position(windows_state: dict[str, Any]) -> dict[str, Any]:
    """A TokenWindows state without its pending tokens: where the documents read end (see TokenWindows.read_position)."""
    return {key: value for key, value in windows_state.items() if key != "pending"}


class TokenWindows:
    """Endless (or single-pass) iterator of (ctx_len,) int64 token windows from a text dataset.

    After the last document it starts the dataset again (a new epoch) unless `loop=False`.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        tokenizer: Any,
        ctx_len: int,
        text_column: str = "text",
        docs_per_batch: int = 64,
        loop: bool = True,
    ):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.ctx_len = ctx_len
        self.text_column = text_column
        self.docs_per_batch = docs_per_batch
        self.loop = loop
        self.separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._initial_dataset_state = copy.deepcopy(dataset.state_dict())
        self.epoch = 0
        self._documents_this_epoch = 0
        self._pending: list[int] = []
        self._documents: Iterator[dict] = iter(dataset)

    def __iter__(self) -> "TokenWindows":
        return self

    def __next__(self) -> torch.Tensor:
        while len(self._pending) < self.ctx_len:
            self._read_documents()
        window = self._pending[: self.ctx_len]
        del self._pending[: self.ctx_len]
        return torch.tensor(window, dtype=torch.long)

    def _read_documents(self) -> None:
        texts = []
        for document in self._documents:
            if self.text_column not in document:
                raise KeyError(f"text column '{self.text_column}' not in the dataset; columns: {sorted(document)}")
            if document[self.text_column]:
                texts.append(document[self.text_column])
            if len(texts) == self.docs_per_batch:
                break
        if not texts:  # the dataset is exhausted
            if not self.loop:
                raise StopIteration
            if self._documents_this_epoch == 0:
                raise UsageError("the dataset has no non-empty documents")
            self.epoch += 1
            self._documents_this_epoch = 0
            self.dataset.load_state_dict(copy.deepcopy(self._initial_dataset_state))
            self._documents = iter(self.dataset)
            return
        self._documents_this_epoch += len(texts)
        for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            self._pending.extend(ids)
            self._pending.extend(self.separator)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: epoch, the dataset's own state and the tokens read but not emitted."""
        return {
            "epoch": self.epoch,
            "documents_this_epoch": self._documents_this_epoch,
            "dataset": copy.deepcopy(self.dataset.state_dict()),
            "pending": list(self._pending),
        }

    def read_position(self) -> dict[str, Any]:
        """Where the documents read so far end: `state_dict()` without the tokens read but not yet emitted.

        A stream of the same dataset loaded from it with no pending tokens (`{**position, "pending": []}`)
        reads only documents this one has not: what eval/data.py's held-out rule 4 replays."""
        return read_position(self.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self._documents_this_epoch = state["documents_this_epoch"]
        self._pending = list(state["pending"])
        self.dataset.load_state_dict(copy.deepcopy(state["dataset"]))
        self._documents = iter(self.dataset)
