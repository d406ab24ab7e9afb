"""circuit-tracer transcoder sets (https://github.com/safety-research/circuit-tracer): a folder with
config.yaml and layer_{i}.safetensors, one TopK transcoder (or skip transcoder) per layer of the LM.

Written as circuit-tracer's loader reads it, from its source at commit 196e2cecbae69532a5677630f6b7c99c6c275fe3
(transcoder/single_layer_transcoder.py, replacement_model/replacement_model_transformerlens.py, __main__.py)
and b00048e4710a66436b08364778f574753a7d2b63 (utils/hf_utils.py, utils/caching.py,
transcoder/activation_functions.py); the package sets no version of its own (hatch-vcs):

    utils/hf_utils.py load_transcoder_from_hub(REPO) reads REPO's config.yaml, then load_transcoders(config):
      model_kind "transcoder_set"; resolve_transcoder_paths: without a `transcoders` list, the files
      layer_{i}.safetensors, i = 0 .. n-1 (a list's local paths would be read from the working directory,
      and would not survive an upload, so none is written); load_transcoder_set(paths, feature_input_hook,
      feature_output_hook, activation, k): activation "topk" -> TopK(k) (k must be given).
    single_layer_transcoder.py load_transcoder(path): every tensor of the file goes into a strict
      load_state_dict, so the file holds exactly W_enc (d_transcoder, d_model), b_enc (d_transcoder,),
      W_dec (d_transcoder, d_model), b_dec (d_model,) and W_skip (d_model, d_model) for a skip; d_transcoder
      is read from b_enc, d_model from b_dec; W_enc and W_dec may be read lazily by name (safe_open).
      SingleLayerTranscoder: encode F.linear(x, W_enc, b_enc), activation; decode acts @ W_dec + b_dec
      (+ x @ W_skip.T). TranscoderSet: layers 0 .. n-1 each once, one d_transcoder; skip from layer 0.
    replacement_model_transformerlens.py: every block's `mlp` is wrapped in ReplacementMLP with hooks
      hook_in (its input) and hook_out (its output); a feature hook is a path inside `blocks.{layer}`, and
      every layer of the LM is looked up in the set (so the set covers all of them). The LM is loaded with
      fold_ln=False and center_writing_weights=False, so those hooks hold the Hugging Face MLP's input and
      output in the families of MLP_HOOKPOINTS (TransformerLens's MLP is the same module; a norm after it,
      Gemma 2's, is outside `mlp` in both). The nnsight backend (tl_nnsight_mapping.py) maps mlp.hook_in
      and mlp.hook_out for Llama and Qwen 3 only.

Our transcoder and circuit-tracer's compute the same thing with the same tensors in the same orientation,
except the activation: circuit-tracer's TopK (activation_functions.py) keeps the top k pre-activations as
they are, negative ones too, where ours takes ReLU of them. k latents that always pre-activate to exactly 0
(zero encoder row and bias) and decode nothing (zero decoder row) are appended: then at least k
pre-activations are >= 0, no negative one is ever among the top k, and circuit-tracer's TopK equals ReLU of
ours on every input. Latents n .. n+k-1 never fire (circuit-tracer's graphs keep only nonzero activations).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import yaml
from torch import Tensor

from ..config import SaeConfig
from ..errors import UsageError
from ..files import TensorSpec, atomic_write, write_safetensors
from .common import check_shapes, our_shapes

CONFIG_FILE = "config.yaml"
LAYER_FILE = "layer_{}.safetensors"
FEATURE_HOOKS = ("mlp.hook_in", "mlp.hook_out")
"""(feature_input_hook, feature_output_hook): the input and output of each block's MLP, as the
ReplacementModel hooks them (module docstring)."""

MLP_HOOKPOINTS: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = (
    # (an MLP module, the layer as group 1; the LM families (model_type) where it is TransformerLens's `mlp`)
    (re.compile(r"transformer\.h\.(\d+)\.mlp"), frozenset({"gpt2"})),
    (re.compile(r"gpt_neox\.layers\.(\d+)\.mlp"), frozenset({"gpt_neox"})),
    (re.compile(r"model\.layers\.(\d+)\.mlp"), frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "phi3"})),
)
"""Other families are refused rather than guessed: Bloom's `transformer.h.L.mlp` adds the residual itself;
TransformerLens's Phi-2 port is not known here to feed its MLP what Hugging Face's does."""

OURS_KEY = "topk_sae"
"""The key of config.yaml under which the export records what circuit-tracer does not read: each layer's
config and provenance, and the latents appended (circuit-tracer ignores keys it does not know)."""

LOAD_CALL = ("circuit_tracer.utils.hf_utils.load_transcoder_from_hub('USER/REPO') with {dst} uploaded as a hub "
             "repository, or locally circuit_tracer.transcoder.single_layer_transcoder.load_transcoder_set("
             "{{i: '{dst}/layer_<i>.safetensors'}}, ...) with config.yaml's hooks, activation and k")
"""How circuit-tracer loads the folder `dst` (its loader reads config.yaml from the hub only)."""


class LayerTranscoder(NamedTuple):
    """One transcoder of a set, in our names (sae/formats/common.py `our_shapes`, W_skip with a skip)."""

    layer: int
    """The LM layer whose MLP it replaces."""

    cfg: SaeConfig
    tensors: dict[str, Tensor]
    provenance: dict[str, Any]
    """Its cfg.json keys beyond the config: `hookpoint` (the MLP) and `model` are read."""

    source: str
    """Where it was read from (its folder), for messages."""


def feature_hooks(source: str, hookpoint: Any, model_type: str | None) -> tuple[int, str, str]:
    """(layer, feature_input_hook, feature_output_hook) of a transcoder of the MLP `hookpoint` in an LM of
    family `model_type` (None: not known), or a UsageError naming `source` and what is not known."""
    if not isinstance(hookpoint, str):
        raise UsageError(f"{source}: no hookpoint recorded, so the MLP it replaces is not known; circuit-tracer "
                         "needs it (cfg.json 'hookpoint', e.g. transformer.h.3.mlp)")
    for pattern, families in MLP_HOOKPOINTS:
        match = pattern.fullmatch(hookpoint)
        if match is None:
            continue
        if model_type not in families:
            family = f"model_type {model_type!r}" if model_type else "an LM whose config.json is not here"
            raise UsageError(f"{source}: hookpoint '{hookpoint}' of {family}: circuit-tracer's MLP hooks "
                             f"{list(FEATURE_HOOKS)} are known to hold its input and output only for model_type "
                             f"{sorted(families)}")
        return int(match.group(1)), *FEATURE_HOOKS
    shapes = ", ".join(pattern.pattern.replace(r"(\d+)", "L").replace("\\", "") for pattern, _ in MLP_HOOKPOINTS)
    raise UsageError(f"{source}: hookpoint '{hookpoint}' is no MLP known here ({shapes}): circuit-tracer's "
                     "transcoders replace each block's MLP, reading its input and writing its output")


def check_transcoder_set(members: Sequence[LayerTranscoder], model_type: str | None, n_layers: int | None) -> None:
    """UsageError naming the transcoder or the set's problem if `members` is no circuit-tracer transcoder set:
    transcoders of the MLPs of layers 0 .. n-1 (all `n_layers` of the LM if known), one each, in
    any order, all of one run's shape (config.yaml has one k; TranscoderSet one width and one skip setting)."""
    if not members:
        raise UsageError("a circuit-tracer transcoder set needs a transcoder for each layer, got none")
    first = members[0]
    for member in members:
        if not member.cfg.transcode:
            raise UsageError(f"{member.source}: an SAE (cfg.json 'transcode' false); circuit-tracer reads transcoders")
        layer = feature_hooks(member.source, member.provenance.get("hookpoint"), model_type)[0]
        if layer != member.layer:
            raise UsageError(f"{member.source}: given as layer {member.layer}'s transcoder, but its hookpoint "
                             f"'{member.provenance['hookpoint']}' is layer {layer}'s MLP")
        for name in ("d_in", "n_latents", "k", "skip_connection"):
            if getattr(member.cfg, name) != getattr(first.cfg, name):
                raise UsageError(f"{member.source}: {name} {getattr(member.cfg, name)} but {first.source} has "
                                 f"{getattr(first.cfg, name)}: a circuit-tracer set has one (one run's transcoders)")
        if member.provenance.get("model") != first.provenance.get("model"):
            raise UsageError(f"{member.source}: model {member.provenance.get('model')!r} but {first.source} has "
                             f"{first.provenance.get('model')!r}: a transcoder set is of one LM")
    layers = sorted(member.layer for member in members)
    expected = list(range(n_layers if n_layers is not None else max(layers) + 1))
    if layers != expected:
        of_lm = f"all {n_layers} layers of the LM" if n_layers is not None else "layers 0 .. n-1"
        raise UsageError(f"a circuit-tracer transcoder set has one transcoder for each of {of_lm} (its "
                         f"ReplacementModel replaces every MLP); got layers {layers}")


def circuit_tracer_tensors(cfg: SaeConfig, tensors: dict[str, Tensor]) -> dict[str, list[Tensor]]:
    """Each tensor of a layer's file, as the CPU pieces `write_safetensors` takes: ours, with cfg.k zero
    latents appended to W_enc (n+k, d), b_enc (n+k,) and W_dec (n+k, d) (module docstring); b_dec (d,) and
    W_skip (d, d) as they are."""
    zeros = tensors["W_dec"].new_zeros(cfg.k, cfg.d_in)
    pieces = {"W_enc": [tensors["encoder.weight"], zeros], "b_enc": [tensors["encoder.bias"], zeros[:, 0]],
              "W_dec": [tensors["W_dec"], zeros], "b_dec": [tensors["b_dec"]]}
    if cfg.skip_connection:
        pieces["W_skip"] = [tensors["W_skip"]]
    return {name: [piece.detach().cpu() for piece in parts] for name, parts in pieces.items()}


def write_circuit_tracer_set(path: Path, members: Sequence[LayerTranscoder], model_type: str | None,
                             n_layers: int | None = None) -> Path:
    """Write the transcoder set `members` (one per layer, `check_transcoder_set`) into the folder `path` as
    circuit-tracer's config.yaml + layer_{i}.safetensors (module docstring), computing what ours compute.

    `model_type`: the LM's family (its config.json's), which says whether the MLP hooks hold our
    hookpoints' activations; `n_layers`: its layer count, if known (circuit-tracer needs every layer).
    The config is written last, so a folder with one has all its layers."""
    check_transcoder_set(members, model_type, n_layers)
    for member in members:
        check_shapes(Path(member.source), member.tensors,
                     our_shapes(member.cfg.d_in, member.cfg.n_latents, member.cfg.skip_connection))
    path.mkdir(parents=True, exist_ok=True)
    for member in members:
        pieces = circuit_tracer_tensors(member.cfg, member.tensors)
        specs = [TensorSpec(name, parts[0].dtype, (sum(len(part) for part in parts), *parts[0].shape[1:]))
                 for name, parts in pieces.items()]
        chunks = [part for parts in pieces.values() for part in parts]
        atomic_write(path / LAYER_FILE.format(member.layer), lambda tmp: write_safetensors(tmp, specs, chunks))
    config = circuit_tracer_config(members)
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))
    return path


def circuit_tracer_config(members: Sequence[LayerTranscoder]) -> dict[str, Any]:
    """config.yaml's content for the checked set `members`: what circuit-tracer reads, then ours under OURS_KEY."""
    first = members[0]
    config: dict[str, Any] = {"model_kind": "transcoder_set"}
    if first.provenance.get("model"):
        config["model_name"] = first.provenance["model"]  # the CLI's default --model (__main__.py)
    config.update({"feature_input_hook": FEATURE_HOOKS[0], "feature_output_hook": FEATURE_HOOKS[1],
                   "activation": "topk", "k": first.cfg.k})
    config[OURS_KEY] = {"num_latents": first.cfg.n_latents, "zero_latents_appended": first.cfg.k,
                        "layers": [{"layer": member.layer, "cfg": asdict(member.cfg), "provenance": member.provenance}
                                   for member in members]}
    return config
