"""Writing files: atomically, so that a crash never leaves a half-written one, and safetensors files
from pieces, so that a large SAE is never whole in memory to be saved (a leaf: the SAE, checkpoints,
the cache and eval use it)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from .errors import MissingFileError, UsageError, UserError

# What the disk, not the program, makes a write fail with: full, over quota, read-only, not allowed.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_ERRNOS = DISK_FULL | {errno.EROFS, errno.EACCES, errno.EPERM}


class UnwritableError(UserError, OSError):
    """A file or folder could not be written because of the disk (`DISK_ERRNOS`): one line naming it."""


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON value in the file `path`; a MissingFileError ("{what} not found: path") or a UsageError
    naming the file when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # JSON text is UTF-8
        raise UsageError(f"{path}: not valid JSON ({error})") from None


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """`read_json` of a file that must hold one JSON object."""
    raw = read_json(path, what)
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_folder(path: Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp_folder), then move the folder into place as `path`: a failed or interrupted write
    leaves the old folder (or none) and never a mix of old and new files. An old folder is removed only
    once the new one is complete (two renames: a crash between them leaves both, under hidden names)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed write left: it may be filling the disk
        shutil.rmtree(old, ignore_errors=True)


def disk_error_reason(error: OSError) -> str:
    """An OSError of `DISK_ERRNOS` in words: "No space left on device [ENOSPC]"."""
    return f"{error.strerror or error} [{errno.errorcode.get(error.errno, error.errno)}]"


def disk_remedy(error: OSError, path: Path) -> str:
    """What the user can do about a write to `path` failing with `error` (of `DISK_ERRNOS`)."""
    return f"free space on the disk of {path}" if error.errno in DISK_FULL else f"make {path} writable"


@contextmanager
def disk_errors(failed: str, consequence: Callable[[OSError], str]) -> Iterator[None]:
    """Turn an OSError of `DISK_ERRNOS` raised inside into an `UnwritableError`, one line:
    "{failed}: {reason}; {consequence(error)}" (what was kept and what to do, as known when it failed).
    Any other OSError is a bug or a race and keeps its traceback."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        raise UnwritableError(f"{failed}: {disk_error_reason(error)}; {consequence(error)}") from None


def check_writable_folder(path: Path, what: str, hint: str) -> None:
    """Create folder `path` (with its parents) and write and remove a small file in it, so that a folder
    that cannot be written is refused before any work: an `UnwritableError` naming `what` and `path`,
    ending with `hint` (e.g. "choose another --out_dir"). A path through a file is refused too."""
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        if error.errno not in DISK_ERRNOS | {errno.EEXIST, errno.ENOTDIR, errno.ENOENT}:
            raise
        raise UnwritableError(f"cannot write to {what} {path}: {disk_error_reason(error)}; {hint}") from None


# safetensors' dtype names (https://github.com/huggingface/safetensors, the format's README)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a file, known before its data: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: str | Path, specs: list[TensorSpec], chunks: Iterable[Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from its tensors' pieces, so that no whole tensor need be in memory.

    `chunks` are the tensors' data in `specs` order, each tensor's split along its first dimension
    into any number of consecutive CPU pieces. The format is the library's: an 8-byte little-endian
    header length, the JSON header (dtype, shape, byte offsets), the bytes; `safetensors.safe_open`
    and `load_file` read it. Not atomic by itself: pair it with `atomic_write`.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes it
    pieces = iter(chunks)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for spec in specs:
            remaining = spec.nbytes
            while remaining > 0:
                piece = next(pieces, None)
                if piece is None:
                    raise ValueError(f"write_safetensors: the data ended inside tensor '{spec.name}'")
                if piece.dtype != spec.dtype:
                    raise ValueError(f"write_safetensors: '{spec.name}' is {spec.dtype}, got a {piece.dtype} piece")
                data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes > remaining:
                    raise ValueError(f"write_safetensors: a piece runs past the end of tensor '{spec.name}'")
                file.write(memoryview(data))
                remaining -= data.nbytes
        if next(pieces, None) is not None:
            raise ValueError("write_safetensors: more data than the specs describe")
