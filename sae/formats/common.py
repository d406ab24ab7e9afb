"""What every reader of a foreign SAE format shares: the result type, and checked loading of files."""

from __future__ import annotations

import json
import pickle
import re
import typing
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
    """An SAE read from files, mapped onto this SAE's parameters (sae/model.py): another tool's (the readers
    here), or our own folder (sae/model.py `read_sae_files`, format "ours")."""

    format: str
    """The source format: "ours" (ours or sparsify's), "saelens", "openai" or "dictionary_learning"."""

    cfg: SaeConfig
    """d_in, n_latents and k from the source; the training-loss fields are our defaults unless the
    source recorded ours (a folder we exported to SAELens)."""

    tensors: dict[str, Tensor]
    """encoder.weight (n_latents, d_in), encoder.bias (n_latents,), W_dec (n_latents, d_in), b_dec (d_in,),
    on the CPU, all of one dtype."""

    input_norm: str
    """The input transform the source applies before encoding: one of INPUT_NORMS."""

    metadata: dict[str, Any]
    """cfg.json keys to record when the SAE is saved in our format: where it came from (`converted_from`);
    for our own folder, its provenance (model, hookpoint, training record)."""

    weights_file: Path
    """The file the tensors were read from (for messages about them)."""


_JSON_TYPES_OF_HINTS = {int: (int,), float: (int, float), float | None: (int, float, type(None)), bool: (bool,), str: (str,)}
"""The JSON values (exact Python types from json.loads) a field of each type takes: an int is no bool
and no string ("64"), a float any number."""

SAE_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    name: _JSON_TYPES_OF_HINTS[hint] for name, hint in typing.get_type_hints(SaeConfig).items()
    if hint in _JSON_TYPES_OF_HINTS
}
"""The JSON types of SaeConfig's fields, by field name (cfg.json names n_latents `num_latents`). A field of
another type (a Literal ...) is left to `config.from_dict`."""

_STRING_OR_NULL, _INT_OR_NULL, _OBJECT_OR_NULL = (str, type(None)), (int, type(None)), (dict, type(None))
PROVENANCE_TYPES: dict[str, tuple[type, ...]] = {
    "model": _STRING_OR_NULL, "hookpoint": _STRING_OR_NULL, "ctx_len": _INT_OR_NULL, "dataset": _STRING_OR_NULL,
    "dataset_config": _STRING_OR_NULL, "split": _STRING_OR_NULL, "text_column": _STRING_OR_NULL,
    "model_init": _STRING_OR_NULL, "model_init_seed": _INT_OR_NULL, "model_init_versions": _OBJECT_OR_NULL,
    "tokens_trained": _INT_OR_NULL, "text_read": _OBJECT_OR_NULL, "run_name": _STRING_OR_NULL,
    "variant": _STRING_OR_NULL, "init_seed": _INT_OR_NULL, "final_metrics": _OBJECT_OR_NULL, "wandb_run_id": _STRING_OR_NULL,
    "wandb_project": _STRING_OR_NULL, "converted_from": _OBJECT_OR_NULL, "input_scale_folded": (int, float), "output_scale_folded": (int, float),
}
"""The JSON types of the provenance keys our code reads from cfg.json (sae/config.py `provenance`, the
trainer's record, `python -m eval`'s lookups); null means "not recorded", and the eval asks for an option."""

_JSON_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                    dict: "a JSON object", list: "a JSON list", type(None): "null"}


def check_json_types(source: str, raw: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    """UsageError naming `source`, the key, its value and the expected type for the first key of `raw` whose
    value is not of one of its `types` (keys not in `types` are not checked)."""
    for key, allowed in types.items():
        if key in raw and type(raw[key]) not in allowed:
            # (int, float) is "a number", not "an integer or a number"
            expected = " or ".join(_JSON_TYPE_NAMES[option] for option in allowed if not (option is int and float in allowed))
            found = _JSON_TYPE_NAMES.get(type(raw[key]), type(raw[key]).__name__)
            shown = json.dumps(raw[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise UsageError(f"{source}: '{key}' must be {expected}, found {shown} ({found})")


def check_finite(source: Path, tensors: dict[str, Tensor], mapped: bool = False) -> None:
    """UsageError naming `source`, each tensor with NaN or infinite values and how many, if there are any: an
    SAE with them computes NaN everywhere (a corrupt file, or a training run that diverged). `mapped`: the
    tensors are another tool's mapped onto our parameters (a ForeignSae's), so the names are ours."""
    bad = {name: int((~tensor.isfinite()).sum()) for name, tensor in tensors.items() if not tensor.isfinite().all()}
    if bad:
        counts = ", ".join(f"'{name}' {count:,} of {tensors[name].numel():,}" for name, count in bad.items())
        names = " (named as this SAE's parameters)" if mapped else ""
        raise UsageError(f"{source}: non-finite values (NaN or inf) in the SAE's weights: {counts}{names}; the file "
                         "is corrupt or the SAE diverged in training, so it is not loaded")


def our_shapes(d_in: int, n_latents: int, skip_connection: bool = False,
               activation: str = "topk") -> dict[str, tuple[int, ...]]:
    """The shape of each of our parameters (a skip transcoder's W_skip and a BatchTopK SAE's threshold too)."""
    shapes = {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,), "W_dec": (n_latents, d_in),
              "b_dec": (d_in,)}
    return (shapes | ({"W_skip": (d_in, d_in)} if skip_connection else {})
            | ({"threshold": ()} if activation == "batchtopk" else {}))


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


