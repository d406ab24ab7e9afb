"""Text in, token windows out: HF `datasets` streaming -> tokenizer -> fixed windows of ctx_len tokens.

Documents are concatenated with the tokenizer's end-of-text token between them and cut into windows
of exactly `ctx_len` tokens (no padding). The stream's position is a small JSON-able state (the
dataset's own `state_dict()` plus the tokens read but not yet emitted), so a run resumes exactly.
"""

from __future__ import annotations

import codecs
import copy
import glob
import sys
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from .config import DataConfig
from .embedded import CORPUS_NAME
from .embedded.corpus import build_corpus
from .errors import MissingFileError, UsageError
from .splits import SPLITS, document_split

# Builders of `datasets` for local files, by extension.
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# The files behind each dataset load_text_dataset made of local files, for TokenWindows' message when one
# of them is not UTF-8 (the decode error itself does not say which file it came from).
_LOCAL_FILES_OF: "weakref.WeakKeyDictionary[IterableDataset, list[str]]" = weakref.WeakKeyDictionary()


def load_text_dataset(cfg: DataConfig, split: str | None = None, rank: int = 0, world_size: int = 1) -> IterableDataset:
    """A streaming dataset of documents for `cfg`, sharded to this rank (disjoint across ranks).

    `cfg.dataset` is the embedded corpus name, a local file / folder / glob, or a hub dataset name.
    Local files have the embedded corpus' three splits, chosen per document by a hash of its text
    (`sae.splits`): `train` streams the 95% of documents that are neither `validation` nor `test`.
    """
    split = split or cfg.split
    local_files = None
    if cfg.dataset == CORPUS_NAME:
        files = build_corpus(Path(cfg.data_dir) / CORPUS_NAME)
        if split not in files:
            raise UsageError(f"the embedded corpus has splits {sorted(files)}, not '{split}'")
        dataset = load_dataset("json", data_files={split: str(files[split])}, split=split, streaming=True)
    elif is_local_dataset(cfg.dataset):
        if split not in SPLITS:
            raise UsageError(f"a local dataset has the splits {list(SPLITS)} (chosen per document by a hash of its "
                             f"text), not '{split}'")
        local_files = _local_files(cfg.dataset)
        builder = _LOCAL_BUILDERS[Path(local_files[0]).suffix.lower()]
        try:
            dataset = load_dataset(builder, data_files={"all": local_files}, split="all", streaming=True)
        except StopIteration:  # the json builder reads the columns off the first record, and found none
            raise UsageError(f"{cfg.dataset} has no documents: its data file(s) are empty") from None
        dataset = dataset.filter(_in_split, fn_kwargs={"split": split, "text_column": cfg.text_column, "source": cfg.dataset})
    else:
        dataset = load_dataset(cfg.dataset, cfg.dataset_config, split=split, streaming=True)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if local_files is not None:
        _LOCAL_FILES_OF[dataset] = local_files
    return dataset


def _in_split(document: dict, split: str, text_column: str, source: str) -> bool:
    """Whether a local document belongs to `split`; a UsageError naming `source` (the data files) when
    it has no `text_column`, or something other than text there. A null text keeps its place (an empty document)."""
    if text_column not in document:
        raise UsageError(f"{source} has no column '{text_column}' (its columns: {', '.join(sorted(document))}); name "
                         "the text column with --data.text_column (python -m eval: --text_column)")
    text = document[text_column]
    if text is not None and not isinstance(text, str):
        raise UsageError(f"column '{text_column}' of {source} holds {type(text).__name__} values, not text")
    return text is None or document_split(text) == split


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

    After the last document it starts the dataset again (a new epoch; the first time, a note on stderr says
    so) unless `loop=False`. A document that is empty or only whitespace is skipped.
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
        self._tokens_this_epoch: int | None = 0  # for the note of a second pass; None when resumed (unknown)
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
        texts = self._next_texts()
        if not texts:  # the dataset is exhausted
            if not self.loop:
                raise StopIteration
            if self._documents_this_epoch == 0:
                raise UsageError("the dataset has no non-empty documents (a document of only whitespace is empty)")
            if self.epoch == 0:
                _note_second_pass(self._tokens_this_epoch, self._documents_this_epoch)
            self.epoch += 1
            self._documents_this_epoch = 0
            self._tokens_this_epoch = 0
            self.dataset.load_state_dict(copy.deepcopy(self._initial_dataset_state))
            self._documents = iter(self.dataset)
            return
        self._documents_this_epoch += len(texts)
        for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            self._pending.extend(ids)
            self._pending.extend(self.separator)
            if self._tokens_this_epoch is not None:
                self._tokens_this_epoch += len(ids) + len(self.separator)

    def _next_texts(self) -> list[str]:
        """The texts of the next documents, up to docs_per_batch; empty ones (or only whitespace) are skipped."""
        texts = []
        try:
            for document in self._documents:
                if self.text_column not in document:
                    columns = ", ".join(sorted(document))
                    raise UsageError(f"the dataset has no column '{self.text_column}' (its columns: {columns}); name the "
                                     "text column with --data.text_column (python -m eval: --text_column)")
                text = document[self.text_column]
                if text and not text.isspace():
                    texts.append(text)
                if len(texts) == self.docs_per_batch:
                    break
        except UnicodeDecodeError as error:  # raised by `datasets` as it reads a file
            raise _not_utf8_error(self.dataset, error) from error
        return texts

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
        self._tokens_this_epoch = None
        self._pending = list(state["pending"])
        self.dataset.load_state_dict(copy.deepcopy(state["dataset"]))
        self._documents = iter(self.dataset)


_second_pass_noted = False  # the note is printed once per process


def _note_second_pass(tokens: int | None, documents: int) -> None:
    """Say on stderr (once per process, on rank 0 of a torchrun job) that the training text ran out and is
    read again, and where held-out text for an eval comes from."""
    global _second_pass_noted
    if _second_pass_noted or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _second_pass_noted = True
    read = f"{tokens:,} tokens ({documents:,} documents)" if tokens is not None else f"{documents:,} documents"
    print(f"note: the training text ran out after {read} and is read again from the start (epoch 2): the SAE sees "
          "its windows more than once. Held-out text for python -m eval: the dataset's validation or test split (of "
          "local files: the documents held out by hash, 2.5% each), or --dataset with other text", file=sys.stderr)


def _not_utf8_error(dataset: IterableDataset, error: UnicodeDecodeError) -> UsageError:
    """One line for text that is not UTF-8, naming the file and the offset of its first bad byte when
    the dataset is local files."""
    located = _first_invalid_utf8(_LOCAL_FILES_OF.get(dataset, []))
    if located is None:
        return UsageError(f"the dataset's text is not UTF-8: {error}")
    path, offset, byte = located
    return UsageError(f"data file {path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset:,} does not decode; "
                      "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _first_invalid_utf8(paths: list[str], chunk_bytes: int = 1 << 20) -> tuple[str, int, int] | None:
    """(path, byte offset, byte) of the first byte of `paths` that does not decode as UTF-8; None if all do."""
    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # of the chunk's first byte in the file
        with open(path, "rb") as file:
            while True:
                chunk = file.read(chunk_bytes)
                held = decoder.getstate()[0]  # the bytes of a character the last chunk cut short
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    bad = offset - len(held) + error.start
                    return path, bad, (held + chunk)[error.start]
                if not chunk:
                    break
                offset += len(chunk)
    return None
