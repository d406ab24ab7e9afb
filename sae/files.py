"""Writing files: atomically, so that a crash never leaves a half-written one, and safetensors files
from pieces, so that a large SAE is never whole in memory to be saved (a leaf: the SAE, checkpoints,
the cache and eval use it)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import MissingFileError, UsageError


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON value in the file `path`; a MissingFileError ("{what} not found: path") or a UsageError
    naming the file when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
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
