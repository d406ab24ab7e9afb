"""What every reader of a foreign SAE format shares: the result type, and checked loading of files."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..config import SaeConfig
from ..errors import UsageError


INPUT_NORMS = ("none", "layer_norm")
"""The input transforms an SAE can have (`SparseAutoencoder.input_norm`, sae/model.py): none, or OpenAI's
per-token LayerNorm (SAELens's normalize_activations "layer_norm"). Here, below sae/model.py, so that
both it and the foreign readers name them from one place."""


class ForeignSae(NamedTuple):
    """An SAE read from another tool's files, mapped onto this SAE's parameters (sae/model.py)."""

    format: str
    """The source format: "saelens", "openai" or "dictionary_learning"."""

    cfg: SaeConfig
    """d_in, n_latents and k from the source; the training-loss fields are our defaults unless the
    source recorded ours (a folder we exported to SAELens)."""

    tensors: dict[str, Tensor]
    """encoder.weight (n_latents, d_in), encoder.bias (n_latents,), W_dec (n_latents, d_in), b_dec (d_in,),
    on the CPU, all of one dtype."""

    input_norm: str
    """The input transform the source applies before encoding: one of INPUT_NORMS."""

    metadata: dict[str, Any]
    """cfg.json keys to record when the SAE is saved in our format: where it came from (`converted_from`)."""


def our_shapes(d_in: int, n_latents: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of our parameters."""
    return {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,), "W_dec": (n_latents, d_in),
            "b_dec": (d_in,)}


def sae_config(source: Path, d_in: Any, n_latents: Any, k: Any) -> SaeConfig:
    """SaeConfig(d_in, n_latents, k) for the SAE in `source`, or a UsageError naming the bad value."""
    for name, value in (("d_in", d_in), ("n_latents", n_latents), ("k", k)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UsageError(f"{source}: {name} must be a positive integer, found {value!r}")
    try:
        return SaeConfig(d_in=d_in, n_latents=n_latents, k=k)
    except ValueError as error:  # k > n_latents
        raise UsageError(f"{source}: {error}") from None


def check_keys(source: Path, found: set[str], required: set[str], optional: set[str], layout: str) -> None:
    """UsageError naming the missing or unexpected keys of `source` for `layout` (e.g. "OpenAI's state dict")."""
    missing, unexpected = sorted(required - found), sorted(found - required - optional)
    if missing or unexpected:
        raise UsageError(f"{source}: not {layout}: missing keys {missing}, unexpected keys {unexpected}")


def describe(value: Any) -> str:
    """A value's type, and its shape and dtype if it is a tensor, for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def matrix_shape(source: Path, tensors: dict[str, Any], name: str) -> tuple[int, int]:
    """The shape of the matrix tensors[name], or a UsageError if it is not a 2-d tensor."""
    weight = tensors[name]
    if not (isinstance(weight, Tensor) and weight.dim() == 2):
        raise UsageError(f"{source}: '{name}' should be a 2-d tensor, found {describe(weight)}")
    return tuple(weight.shape)


def check_shapes(source: Path, tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """UsageError naming the first entry of `tensors` that is not a floating-point tensor of its expected shape."""
    for name, shape in expected.items():
        tensor = tensors[name]
        if not (isinstance(tensor, Tensor) and tensor.is_floating_point()):
            raise UsageError(f"{source}: '{name}' should be a floating-point tensor, found {describe(tensor)}")
        if tuple(tensor.shape) != shape:
            raise UsageError(f"{source}: '{name}' has shape {tuple(tensor.shape)}, expected {shape}")


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """The dict saved in the torch file `path`, read with `torch.load(weights_only=True)` only: tensors
    and plain values (str, int, dict ...) come back, any other Python object is refused, never unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:  # an opcode the restricted unpickler does not know: not a torch file at all
            raise UsageError(f"{path}: not a torch file (torch.load weights_only=True cannot read it)") from None
        raise UsageError(f"{path}: holds Python objects other than tensors and plain values ({found.group(1)}); only "
                         "plain state dicts are read (torch.load weights_only=True), never a full unpickle") from None
    except (EOFError, KeyError, RuntimeError, ValueError) as error:  # what torch.load raises on a non-torch file
        raise UsageError(f"{path}: not a torch file ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


def check_one_dtype(source: Path, tensors: dict[str, Tensor]) -> None:
    """UsageError if the parameters in `tensors` are not all of one dtype (the source's modules could not
    run them together either)."""
    dtypes = sorted({str(tensor.dtype) for tensor in tensors.values()})
    if len(dtypes) != 1:
        raise UsageError(f"{source}: the parameters have several dtypes {dtypes}")


