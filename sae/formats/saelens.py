"""SAELens folders (sae_lens >= 6, https://github.com/jbloomAus/SAELens): cfg.json + sae_weights.safetensors.

SAELens's TopK SAE (sae_lens/saes/topk_sae.py and saes/sae.py, version 6.54), with W_enc (d_in, d_sae),
W_dec (d_sae, d_in) and n the decoder row norms (d_sae,):

    x'    = N(x) - b_dec          (N: normalize_activations; "- b_dec" only if apply_b_dec_to_input)
    h     = x' @ W_enc + b_enc    (times n if rescale_acts_by_decoder_norm)
    f     = ReLU of the top k of h, zero elsewhere (top-k first, then ReLU: as this SAE)
    x_hat = N^-1((f / n if rescale else f) @ W_dec + b_dec)

Ours (sae/model.py) computes pre = W (N(x) - b_dec) + b_enc' and x_hat = N^-1(f @ W_dec' + b_dec), so
(folded in float64, then cast back):

    W = (W_enc * n)^T     b_enc' = (b_enc + b_dec @ W_enc if not apply_b_dec_to_input else b_enc) * n
    W_dec' = W_dec / n    (n = 1 without rescaling)

Without rescaling and with b_dec applied to the input (what `write_saelens_folder` writes) the mapping is
a transpose: tensors cross bit for bit both ways. N is "none" or "layer_norm", which SAELens defines as
our input_norm "layer_norm" (OpenAI's LN, sae/model.py `layer_norm_input`); its other values are refused.

A BatchTopK SAE (`activation: batchtopk`, sae/batchtopk.py) is SAELens's JumpReLU SAE
(saes/jumprelu_sae.py `JumpReLUSAE.encode`; no rescaling there) with our one threshold theta in every
entry of its per-latent `threshold` (d_sae,): it computes f = ReLU(h) * (h > threshold), ours keeps
ReLU(pre) where pre >= theta and pre > 0. The two differ only where a pre-activation equals theta
exactly (we keep it, SAELens drops it): a measure-zero event for real inputs, smaller than the rounding
differences between its matmul and our kernel. (For theta <= 0 both keep exactly the positive ones.) Such a
folder reads back as a BatchTopK SAE when all its thresholds are one value (ours, or SAELens's own
BatchTopK SAEs, which it saves so: saes/batchtopk_sae.py); per-latent thresholds that differ are refused.

Transcoders are not written: SAELens's transcoders activate by ReLU or JumpReLU, none by TopK
(`saelens_transcoder_refusal`).
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..config import ConfigError, SaeConfig, from_dict
from ..errors import UsageError
from ..files import TensorSpec, atomic_write, read_json_object, write_safetensors
from .common import (INPUT_NORMS, PROVENANCE_TYPES, SAE_CONFIG_TYPES, ForeignSae, check_finite, check_json_types,
                     check_keys, check_shapes, our_shapes, sae_config)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
WEIGHT_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")
FORMAT_VERSION = "6.54.12"
"""The sae_lens version whose folder layout `write_saelens_folder` writes (and the tests load it with).
A config without one is read by SAELens as a pre-6.0 config."""

SAE_DEFAULTS = {"apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                "dtype": "float32"}
"""SAEConfig's defaults (sae_lens 6.54), the only fields of its JumpReLUSAEConfig: what SAELens computes with
when cfg.json lacks the key."""

ARCHITECTURE_DEFAULTS = {"topk": {**SAE_DEFAULTS, "k": 100, "rescale_acts_by_decoder_norm": False},
                         "jumprelu": SAE_DEFAULTS}
"""The architectures read here, each with its config's defaults (TopKSAEConfig adds k and rescaling)."""

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""SAELens's dtype names (sae_lens/constants.py DTYPE_MAP, which also takes a "torch." prefix)."""

OURS_KEY = "topk_sae"
"""The key of SAELens's metadata under which our export keeps what SAELens's config has no field for
(our training-loss fields and provenance; for a JumpReLU, k too), so that converting back restores our cfg.json."""

TRAINING_FIELDS = tuple(f.name for f in fields(SaeConfig) if f.name not in ("d_in", "n_latents", "k"))

TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
"""SAELens's transcoders (sae_lens 6.54, saes/transcoder.py): Transcoder and SkipTranscoder activate by
ReLU (SAE.get_activation_fn), the JumpReLU ones by ReLU masked at a per-latent threshold; none has a k."""


def read_saelens_folder(path: Path) -> ForeignSae:
    """The SAE of the SAELens folder `path`: a TopK SAE from its "topk", a BatchTopK SAE from a "jumprelu"
    whose thresholds are one value; or a UsageError saying what of it this SAE cannot compute."""
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    raw = read_json_object(cfg_path)
    architecture = _architecture(cfg_path, raw)
    defaults = ARCHITECTURE_DEFAULTS[architecture]
    settings = {**defaults, **{key: raw[key] for key in defaults if key in raw}}
    _check_math(cfg_path, settings)
    dtype = _dtype(cfg_path, settings["dtype"])
    d_in, d_sae = raw.get("d_in"), raw.get("d_sae")
    sae_config(cfg_path, d_in, d_sae, 1)  # the sizes, checked before the shapes; k once known (a JumpReLU's below)
    stored = _read_weights(weights_path, architecture, d_in, d_sae)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    tensors = our_tensors(stored, dtype, settings.get("rescale_acts_by_decoder_norm", False),
                          settings["apply_b_dec_to_input"])
    if architecture == "jumprelu":
        tensors["threshold"] = _one_threshold(weights_path, stored["threshold"].to(dtype))
        cfg = replace(sae_config(cfg_path, d_in, d_sae, _jumprelu_k(cfg_path, metadata)), activation="batchtopk")
    else:
        cfg = sae_config(cfg_path, d_in, d_sae, settings["k"])
    cfg, provenance = _restore_ours(cfg_path, cfg, metadata)
    return ForeignSae("saelens", cfg, tensors, settings["normalize_activations"], provenance, weights_path)


def _architecture(cfg_path: Path, raw: dict[str, Any]) -> str:
    """cfg.json's architecture if it is one this SAE computes (`ARCHITECTURE_DEFAULTS`), else a UsageError."""
    if "architecture" not in raw:
        raise UsageError(f"{cfg_path}: no 'architecture' key, so a SAELens < 6 config; re-save it with sae_lens >= 6 "
                         "(SAE.load_from_disk(path).save_model(new_path)) and convert that")
    if raw["architecture"] not in ARCHITECTURE_DEFAULTS:
        raise UsageError(f"{cfg_path}: cannot load 'architecture': {json.dumps(raw['architecture'])}: only \"topk\" "
                         "SAEs (top k, then ReLU) and \"jumprelu\" SAEs with one threshold for all latents (BatchTopK "
                         "at inference) compute this SAE's math")
    return raw["architecture"]


def _check_math(cfg_path: Path, settings: dict[str, Any]) -> None:
    """UsageError for config `settings` (the architecture's keys, defaults filled in) whose input transform
    or layout this SAE cannot express."""
    if settings["normalize_activations"] not in INPUT_NORMS:
        raise UsageError(f"{cfg_path}: cannot load 'normalize_activations': "
                         f"{json.dumps(settings['normalize_activations'])}: this SAE's input transforms are only "
                         f"{list(INPUT_NORMS)} (SAELens's others scale by a constant or a matrix kept outside the "
                         "folder, or by each token's norm)")
    if settings["reshape_activations"] != "none":
        raise UsageError(f"{cfg_path}: cannot load 'reshape_activations': "
                         f"{json.dumps(settings['reshape_activations'])}: an SAE on attention heads' (n_heads, d_head) "
                         "outputs; this SAE reads one module's flat (..., d_in) output")
    for key in ("rescale_acts_by_decoder_norm", "apply_b_dec_to_input"):
        if key in settings and not isinstance(settings[key], bool):
            raise UsageError(f"{cfg_path}: '{key}' must be true or false, found {json.dumps(settings[key])}")


def _dtype(cfg_path: Path, name: Any) -> torch.dtype:
    """The dtype SAELens computes in: cfg.json's (it casts the stored tensors to it on loading)."""
    dtype = DTYPES.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if dtype is None:
        raise UsageError(f"{cfg_path}: 'dtype' must be one of {sorted(DTYPES)}, found {json.dumps(name)}")
    return dtype


def _read_weights(weights_path: Path, architecture: str, d_in: Any, d_sae: Any) -> dict[str, Tensor]:
    """The tensors of a SAELens `architecture` SAE's weights file, each checked to have its shape for the
    config's d_in and d_sae: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,), b_dec (d_in,), and a
    JumpReLU's threshold (d_sae,)."""
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as file:
            check_keys(weights_path, set(file.keys()), set(shapes), set(), f"a SAELens {architecture} SAE's weights")
            stored = {name: file.get_tensor(name) for name in shapes}
    except SafetensorError as error:
        raise UsageError(f"{weights_path}: not a valid safetensors file ({error})") from None
    check_shapes(weights_path, stored, shapes)
    return stored


def our_tensors(stored: dict[str, Tensor], dtype: torch.dtype, rescale: bool, b_dec_on_input: bool) -> dict[str, Tensor]:
    """Our parameters computing what SAELens computes with `stored` (W_enc, W_dec, b_enc, b_dec in its
    shapes; the module docstring's mapping), folded in float64 and cast to `dtype`."""
    W_enc, W_dec, b_enc, b_dec = (stored[name].to(dtype) for name in WEIGHT_NAMES)
    if b_dec_on_input and not rescale:  # a transpose: exact
        return {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    W_enc, W_dec, b_enc, b_dec64 = (t.double() for t in (W_enc, W_dec, b_enc, b_dec))
    if not b_dec_on_input:
        b_enc = b_enc + b_dec64 @ W_enc
    norms = W_dec.norm(dim=1) if rescale else torch.ones(len(W_dec), dtype=torch.float64)
    return {"encoder.weight": (W_enc * norms).T.contiguous().to(dtype), "encoder.bias": (b_enc * norms).to(dtype),
            "W_dec": (W_dec / norms[:, None]).to(dtype), "b_dec": b_dec}


def _one_threshold(weights_path: Path, threshold: Tensor) -> Tensor:
    """Our BatchTopK threshold (0-dim, its bits) from a SAELens JumpReLU's per-latent `threshold` (d_sae,),
    or a UsageError if its values are not all one: this SAE compares every latent with one threshold."""
    check_finite(weights_path, {"threshold": threshold})  # before comparing: NaN equals nothing
    distinct = threshold.unique()
    if len(distinct) > 1:
        raise UsageError(f"{weights_path}: 'threshold' has {len(distinct):,} different values over its "
                         f"{len(threshold):,} latents ({distinct[0].item():.6g} to {distinct[-1].item():.6g}): a "
                         "JumpReLU with per-latent thresholds, and this SAE (BatchTopK) has one threshold for all "
                         "latents, so it cannot compute it")
    return threshold[0].clone()


def _jumprelu_k(cfg_path: Path, metadata: dict[str, Any]) -> Any:
    """k for the BatchTopK SAE read from a one-threshold JumpReLU folder, which SAELens's config has no field
    for: our export's (metadata.topk_sae.k), else SAELens's BatchTopK training's (metadata
    .training_architecture_details.k, a number there); checked by `sae_config`. (Encoding by the threshold
    does not depend on k; it is the mean L0 the SAE was trained to, and sizes the first candidates.)"""
    ours, details = metadata.get(OURS_KEY), metadata.get("training_architecture_details")
    if isinstance(ours, dict) and "k" in ours:
        return ours["k"]
    if isinstance(details, dict) and "k" in details:
        k = details["k"]
        return int(k) if isinstance(k, float) and k.is_integer() else k
    raise UsageError(f"{cfg_path}: cannot load 'architecture': \"jumprelu\" with no k recorded (metadata.{OURS_KEY}.k "
                     "of our export, or metadata.training_architecture_details.k of SAELens's BatchTopK training): one "
                     "threshold for all latents is this SAE's BatchTopK math, whose config needs the k it was "
                     "trained to")


def _restore_ours(cfg_path: Path, cfg: SaeConfig, metadata: dict[str, Any]) -> tuple[SaeConfig, dict[str, Any]]:
    """(cfg with our training fields, the provenance to record) from SAELens's metadata: what our export
    kept under OURS_KEY if it is there, else where the SAE came from. The architecture, not the record,
    says cfg.activation."""
    ours = metadata.get(OURS_KEY)
    if not isinstance(ours, dict):
        source = {key: metadata[key] for key in ("model_name", "hook_name") if metadata.get(key) is not None}
        return cfg, {"converted_from": {"format": "saelens", "path": str(cfg_path.parent), **source}}
    check_json_types(f"{cfg_path}: metadata.{OURS_KEY}", ours, SAE_CONFIG_TYPES | PROVENANCE_TYPES)
    training = {name: ours[name] for name in TRAINING_FIELDS if name in ours}
    try:
        cfg = from_dict(SaeConfig, {"d_in": cfg.d_in, "n_latents": cfg.n_latents, "k": cfg.k, **training,
                                    "activation": cfg.activation})
    except ConfigError as error:
        raise UsageError(f"{cfg_path}: metadata.{OURS_KEY}: {error}") from None
    return cfg, {key: value for key, value in ours.items() if key not in TRAINING_FIELDS and key != "k"}


def saelens_transcoder_refusal(cfg: SaeConfig) -> str:
    """Why a TopK or BatchTopK transcoder (cfg.transcode) cannot be written as a SAELens folder, in one line:
    none of SAELens's transcoder architectures keeps the top k latents. (Its "topk" SAE without b_dec on the
    input computes a TopK transcoder's function, but SAELens splices an SAE's output back where it read,
    which a transcoder's prediction of another module's output is not.)"""
    kind = "skip transcoder" if cfg.skip_connection else "transcoder"
    if cfg.activation == "batchtopk":
        return (f"a BatchTopK {kind} is not written as a SAELens folder (only BatchTopK SAEs are, as its \"jumprelu\" "
                "SAE; its jumprelu transcoders are not written yet); write it --to ours")
    return (f"SAELens {FORMAT_VERSION} has no TopK transcoder: its transcoder architectures "
            f"{list(TRANSCODER_ARCHITECTURES)} (sae_lens/saes/transcoder.py) activate by ReLU or JumpReLU, so none "
            f"computes this TopK {kind} (k={cfg.k}); write it --to sparsify or --to ours, or a set of one per layer "
            "--to circuit-tracer")


def write_saelens_folder(path: Path, cfg: SaeConfig, tensors: dict[str, Tensor], input_norm: str,
                         provenance: dict[str, Any], hook: dict[str, Any]) -> Path:
    """Write our SAE (`tensors` in our names, sae/formats/common.py `our_shapes`) as a SAELens folder that
    `sae_lens.SAE.load_from_disk(path)` loads as is, computing what this SAE computes: a TopK SAE as its
    "topk", a BatchTopK SAE as its "jumprelu" (`_architecture_layout`).

    `provenance`: our cfg.json keys beyond the config (model, hookpoint ...), kept with our training
    fields in SAELens's metadata under OURS_KEY; `model` is SAELens's `model_name` too. `hook`: SAELens's
    metadata keys saying where it reads (hook_name ...: sae/formats/hook_names.py `saelens_hook`).
    """
    if cfg.transcode:  # SAELens would load it as an SAE subtracting b_dec from its input: another function
        raise UsageError(saelens_transcoder_refusal(cfg))
    if cfg.skip_connection:  # its SAE would load the folder and compute without the skip path
        raise UsageError("SAELens's TopK and JumpReLU SAEs have no skip connection, and this SAE adds x @ W_skip.T to "
                         "its reconstruction (sparsify's skip_connection); write it --to sparsify or --to ours")
    check_shapes(path, tensors, our_shapes(cfg.d_in, cfg.n_latents, activation=cfg.activation))
    dtype = tensors["W_dec"].dtype
    dtype_name = next((name for name, value in DTYPES.items() if value == dtype), None)
    if dtype_name is None:
        raise UsageError(f"SAELens folders hold {sorted(DTYPES)} SAEs, this one is {dtype}")
    weights = {"W_enc": tensors["encoder.weight"].T, "W_dec": tensors["W_dec"], "b_enc": tensors["encoder.bias"],
               "b_dec": tensors["b_dec"]}
    keys, extra_weights, extra_ours = _architecture_layout(cfg, tensors)
    weights.update(extra_weights)
    ours = {**{name: getattr(cfg, name) for name in TRAINING_FIELDS}, **extra_ours, **provenance}
    metadata = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None, OURS_KEY: ours}
    if "model" in provenance:
        metadata["model_name"] = provenance["model"]
    metadata.update(hook)
    config = {"d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": dtype_name, "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": input_norm, "reshape_activations": "none",
              "metadata": metadata, **keys}
    path.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()]
    atomic_write(path / WEIGHTS_FILE, lambda tmp: write_safetensors(tmp, specs, weights.values()))
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _architecture_layout(cfg: SaeConfig, tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor],
                                                                               dict[str, Any]]:
    """(SAELens's config keys, its weights and our record's keys beyond the common ones) for the activation
    of `cfg`: TopK is "topk" with k; BatchTopK is "jumprelu" with our threshold (0-dim) in every latent's
    entry of its threshold (d_sae,), and k, which its config has no field for, in our record."""
    if cfg.activation == "batchtopk":  # SAELens keeps h > threshold, ours pre >= it: they differ only at equality
        return ({"architecture": "jumprelu"}, {"threshold": tensors["threshold"].expand(cfg.n_latents).contiguous()},
                {"k": cfg.k})
    return {"k": cfg.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk"}, {}, {}
