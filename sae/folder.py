"""Our SAE folder: path/cfg.json and path/sae.safetensors, in sparsify's layout (a folder written here
loads in sparsify's `SparseCoder.load_from_disk`, and sparsify's load here):

    cfg.json            the SaeConfig fields in sparsify's names, "activation": "topk", the scales folded
                        into the weights, the model, hookpoint and training provenance
    sae.safetensors     encoder.weight (n_latents, d_in), encoder.bias (n_latents), W_dec (n_latents, d_in),
                        b_dec (d_in), and a skip transcoder's W_skip (d_in, d_in)

Reading goes through `read_sae_files`, which also reads the other tools' layouts (sae/formats/).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable

from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import ConfigError, SaeConfig, from_dict
from .errors import UsageError
from .files import TensorSpec, atomic_write, read_json_object, write_safetensors
from .formats import ForeignSae, read_foreign_sae
from .formats.common import (  # INPUT_NORMS: cfg.json names a non-default one under "input_norm"
    INPUT_NORMS, PROVENANCE_TYPES, SAE_CONFIG_TYPES, check_finite, check_json_types, our_shapes)
from .formats.sparsify import check_sparsify_keys, resolve_num_latents

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
PARAMETER_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
"""An SAE's (and a transcoder's) parameters; a skip transcoder has W_skip too (`parameter_names`)."""

# cfg.json keys that name SaeConfig fields differently (sparsify's names).
_FILE_KEYS = {"n_latents": "num_latents"}


def read_sae_files(path: Path) -> ForeignSae:
    """The SAE at `path` in any layout `SparseAutoencoder.load` reads (`read_sae_folder`, or another tool's:
    `read_foreign_sae`), its weights checked to be finite. Every load and conversion reads SAEs through here,
    so a corrupt file (NaN or inf where floats were) fails here in one line, not as a NaN eval or export."""
    files = read_sae_folder(path) if is_sae_folder(path) else read_foreign_sae(path)
    check_finite(files.weights_file, files.tensors, mapped=files.format != "ours")
    return files


def read_sae_folder(path: Path) -> ForeignSae:
    """The SAE in our (or sparsify's) folder `path`, with its provenance (`read_sae_provenance`), tensors as
    stored: cfg.json is checked first (`read_sae_config`), then sae.safetensors against it."""
    cfg = read_sae_config(path)
    input_norm = read_input_norm(path)
    weights_path = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as file:
            keys, expected = set(file.keys()), parameter_names(cfg)
            if keys != set(expected):
                raise UsageError(f"{weights_path}: expected tensors {sorted(expected)}, found {sorted(keys)}")
            tensors = {name: file.get_tensor(name) for name in expected}
    except SafetensorError as error:
        raise UsageError(f"{weights_path}: not a valid safetensors file ({error})") from None
    for name, shape in our_shapes(cfg.d_in, cfg.n_latents, cfg.skip_connection, cfg.activation).items():
        if tuple(tensors[name].shape) != shape:
            raise UsageError(f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
    return ForeignSae("ours", cfg, tensors, input_norm, read_sae_provenance(path), weights_path)


def parameter_names(cfg: SaeConfig) -> tuple[str, ...]:
    """The tensors of an SAE folder of `cfg`: `PARAMETER_NAMES`, W_skip for a skip transcoder, and the
    threshold of a BatchTopK SAE."""
    return (PARAMETER_NAMES + (("W_skip",) if cfg.skip_connection else ())
            + (("threshold",) if cfg.activation == "batchtopk" else ()))


def fold_scales(name: str, tensor: Tensor, input_scale: float, output_scale: float | None = None) -> Tensor:
    """Parameter `name` (whole, or some of its rows) for raw activations, when the SAE was trained on
    inputs multiplied by s = `input_scale` and targets by t = `output_scale` (an SAE's target is its
    input: t = s, the default). The encoder's weight is unchanged (`tensor` itself).

    pre(s x) = W_enc (s x - b_dec) + b_enc = s (W_enc (x - b_dec/s) + b_enc/s) for an SAE, and
    s (W_enc x + b_enc/s) for a transcoder; TopK and ReLU commute with a positive factor, so b_enc/s
    gives latents 1/s as large. The prediction of t y is then s (sum values W_dec) + b_dec + s x W_skip^T,
    so W_dec s/t, b_dec/t and W_skip s/t predict y itself. For an SAE (t = s): b_enc/s, b_dec/s, W_dec
    unchanged (unit norm). BatchTopK's threshold compares with pre-activations: threshold/s. Exact up
    to rounding.
    """
    output_scale = input_scale if output_scale is None else output_scale
    if not (input_scale > 0 and output_scale > 0):
        raise ValueError(f"input_scale and output_scale must be positive, got {input_scale}, {output_scale}")
    if name in ("encoder.bias", "threshold"):  # both compare with pre-activations, which scale by s
        return tensor / input_scale
    if name == "b_dec":
        return tensor / output_scale
    if name in ("W_dec", "W_skip") and input_scale != output_scale:
        return tensor * (input_scale / output_scale)
    return tensor


def write_sae_folder(path: str | Path, cfg: SaeConfig, specs: list[TensorSpec], chunks: Iterable[Tensor],
                     input_scale: float = 1.0, metadata: dict[str, Any] | None = None, input_norm: str = "none",
                     output_scale: float | None = None) -> Path:
    """The SAE folder format: path/sae.safetensors from its tensors' pieces (`files.write_safetensors`:
    the parameters, already folded) and path/cfg.json, each written atomically. cfg.json names
    `input_norm` only when it is not "none": a folder without an input transform is sparsify's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if sorted(spec.name for spec in specs) != sorted(parameter_names(cfg)):
        raise ValueError(f"an SAE folder holds exactly {sorted(parameter_names(cfg))}, got {[spec.name for spec in specs]}")
    config = {_FILE_KEYS.get(key, key): value for key, value in asdict(cfg).items()}
    # "activation" (a SaeConfig field) tells sparsify this is a TopK SAE; it has no "batchtopk", and our
    # BatchTopK folder's extra tensor, threshold, makes its strict load fail rather than compute TopK.
    input_norm_key = {"input_norm": input_norm} if input_norm != "none" else {}
    output_scale_key = {"output_scale_folded": float(output_scale)} if cfg.transcode and output_scale is not None else {}
    config.update(input_scale_folded=float(input_scale), **output_scale_key, **input_norm_key,
                  **(metadata or {}))
    atomic_write(path / WEIGHTS_FILE, lambda tmp: write_safetensors(tmp, specs, chunks))
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


CFG_JSON_TYPES = {_FILE_KEYS.get(name, name): types for name, types in SAE_CONFIG_TYPES.items()} | PROVENANCE_TYPES
"""The JSON type of each cfg.json key our code reads (sparsify's other keys: `check_sparsify_keys`)."""


def read_sae_metadata(path: str | Path) -> dict[str, Any]:
    """Everything in path/cfg.json: the SaeConfig fields plus model, hookpoint and training provenance, each
    key our code reads checked to have its JSON type (`CFG_JSON_TYPES`: "ctx_len": "64" is refused here, in
    one line, not as a TypeError deep in an eval)."""
    cfg_path = Path(path) / CONFIG_FILE
    raw = read_json_object(cfg_path, "SAE config")
    check_json_types(str(cfg_path), raw, CFG_JSON_TYPES)
    return raw


def read_any_sae_metadata(path: str | Path) -> dict[str, Any]:
    """What `read_sae_metadata` gives for our (and sparsify's) folders; for another tool's SAE, what its
    files say of where it came from (sae/formats/: e.g. SAELens's model_name), often nothing."""
    path = Path(path)
    return read_sae_metadata(path) if is_sae_folder(path) else read_foreign_sae(path).metadata


def is_sae_folder(path: Path) -> bool:
    """Whether `path` is a folder in our (and sparsify's) layout: it holds sae.safetensors."""
    return (path / WEIGHTS_FILE).is_file()


def read_input_norm(path: str | Path) -> str:
    """The input transform path/cfg.json names (`INPUT_NORMS`; absent: "none")."""
    value = read_sae_metadata(path).get("input_norm", "none")
    if value not in INPUT_NORMS:
        raise UsageError(f"{Path(path) / CONFIG_FILE}: 'input_norm' must be one of {list(INPUT_NORMS)}, found {value!r}")
    return value


def read_sae_provenance(path: str | Path) -> dict[str, Any]:
    """path/cfg.json without the keys `write_sae_folder` derives from the SAE (its SaeConfig fields,
    "activation", "input_norm"): model, hookpoint, training provenance, input_scale_folded, and any
    sparsify keys that are no SaeConfig field."""
    derived = {_FILE_KEYS.get(f.name, f.name) for f in fields(SaeConfig)} | {"activation", "input_norm"}
    return {key: value for key, value in read_sae_metadata(path).items() if key not in derived}


def read_sae_config(path: str | Path) -> SaeConfig:
    """SaeConfig from path/cfg.json, written by `SparseAutoencoder.save` or by sparsify.

    Refuses (ValueError naming the file and the key) a sparsify coder whose math differs from this
    SAE's (sae/formats/sparsify.py `SPARSIFY_KEY_RULES`); takes `num_latents: 0` as d_in * expansion_factor, as sparsify does.
    Keys that are neither SaeConfig fields nor sparsify's (model, hookpoint, provenance) are ignored.
    """
    cfg_path = Path(path) / CONFIG_FILE
    raw = read_sae_metadata(path)
    check_sparsify_keys(raw, cfg_path)
    for required in ("d_in", "k"):
        if required not in raw:
            raise UsageError(f"{cfg_path}: missing key '{required}'")
    file_to_field = {file_key: name for name, file_key in _FILE_KEYS.items()}
    field_names = {f.name for f in fields(SaeConfig)}
    values = {file_to_field.get(key, key): value for key, value in raw.items()}
    values = {key: value for key, value in values.items() if key in field_names}
    values["n_latents"] = resolve_num_latents(raw, cfg_path)
    try:
        return from_dict(SaeConfig, values)
    except ConfigError as error:
        raise UsageError(f"{cfg_path}: {error}") from None
