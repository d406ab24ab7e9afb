"""Convert an SAE between tools: `python -m sae.convert SRC DST --to saelens|sparsify|ours|circuit-tracer`.

SRC is anything `SparseAutoencoder.load` reads (our or sparsify's folder, a SAELens TopK folder or JumpReLU
folder with one threshold, an OpenAI TopK state dict, dictionary_learning's AutoEncoderTopK ae.pt:
sae/formats/). DST, a new folder (an existing path is never overwritten), is written in the target tool's
layout, loaded there by its own documented call and computing what the SAE computes here:

    --to saelens   sae_lens.SAE.load_from_disk(DST)              (a TopK SAE, or for a BatchTopK SAE a JumpReLU
                   SAE with our threshold for every latent; sae/formats/saelens.py)
    --to sparsify  sparsify.SparseCoder.load_from_disk(DST)       (our folder layout is sparsify's)
    --to ours      SparseAutoencoder.load(DST), python -m eval DST, python -m eval.browse
    --to circuit-tracer  a transcoder set: SRC is a run folder whose SAE folders are MLP transcoders, one per
                   layer of the LM (or one transcoder folder, for a one-layer LM); config.yaml +
                   layer_{i}.safetensors as circuit-tracer's loader reads them (sae/formats/circuit_tracer.py)

Transcoders (our and sparsify's `transcode` folders) convert to sparsify and ours as they are, and to
circuit-tracer; SAELens has no TopK transcoder, so --to saelens refuses them with the reason. A BatchTopK
SAE (`activation: batchtopk`) converts to ours and to SAELens, whose JumpReLU SAE encodes by the threshold
as ours does (it drops a pre-activation exactly equal to it, which ours keeps: sae/formats/saelens.py), and
back; sparsify has no such coder, and circuit-tracer's and SAELens's JumpReLU transcoder layouts are not
written yet, so a BatchTopK transcoder converts only to ours.

SAELens's hook_name is the TransformerLens hook that holds the activations of the recorded hookpoint where
one is known (`transformer.h.3` -> `blocks.3.hook_resid_post`; sae/formats/hook_names.py), else the
hookpoint itself with model_class_name AutoModelForCausalLM (SAELens's Hugging Face path), with a note.

sparsify has no input transform, so an SAE with one (OpenAI's LayerNorm preprocessing) is refused for it:
sparsify would load the folder and silently compute without it. Conversions from our folders to SAELens
and back copy every tensor bit for bit and restore cfg.json; --model and --hookpoint record where the
SAE reads its activations (cfg.json's model and hookpoint, what `python -m eval` uses), which other
tools' files may not say in our terms.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError, run_cli
from .files import TensorSpec
from .files import read_json
from .formats.circuit_tracer import LOAD_CALL as CIRCUIT_TRACER_LOAD_CALL
from .formats.circuit_tracer import LayerTranscoder, feature_hooks, write_circuit_tracer_set
from .formats.hook_names import lm_family, saelens_hook
from .formats.saelens import saelens_transcoder_refusal, write_saelens_folder
from .folder import is_sae_folder, read_sae_files, write_sae_folder
from .model import SparseAutoencoder

TARGETS = ("saelens", "sparsify", "ours", "circuit-tracer")
LOAD_CALLS = {"saelens": "sae_lens.SAE.load_from_disk({dst!r})", "sparsify": "sparsify.SparseCoder.load_from_disk({dst!r})",
              "ours": "sae.SparseAutoencoder.load({dst!r})", "circuit-tracer": CIRCUIT_TRACER_LOAD_CALL}


def read_sae(src: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(the SAE at `src`, its provenance: the cfg.json keys beyond the config, or where a foreign SAE came from),
    read as `SparseAutoencoder.load` reads it (`read_sae_files`: weights with NaN or inf are refused)."""
    files = read_sae_files(src)
    return SparseAutoencoder.from_state_dict(files.cfg, files.tensors, input_norm=files.input_norm), files.metadata


def write_sae(sae: SparseAutoencoder, provenance: dict[str, Any], dst: Path, to: str) -> None:
    """Write `sae` to the new folder `dst` in the layout `to` (one of TARGETS), with `provenance`."""
    tensors = {name: tensor.detach() for name, tensor in sae.state_dict().items()}
    if to == "sparsify" and sae.cfg.activation == "batchtopk":
        raise UsageError(batchtopk_refusal(to))
    if to == "saelens":
        if sae.cfg.transcode:
            raise UsageError(saelens_transcoder_refusal(sae.cfg))
        hook, note = saelens_hook(provenance)
        if note:
            print(f"note: {note}")
        write_saelens_folder(dst, sae.cfg, tensors, sae.input_norm, provenance, hook)
        return
    if to == "sparsify" and sae.input_norm != "none":
        raise UsageError(f"sparsify has no input transform, and this SAE normalises its input (input_norm "
                         f"{sae.input_norm!r}); sparsify would load the folder and compute without it: use --to ours "
                         "or --to saelens")
    metadata = dict(provenance)
    input_scale = metadata.pop("input_scale_folded", 1.0)  # recorded only: the tensors are already folded
    specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    write_sae_folder(dst, sae.cfg, specs, tensors.values(), input_scale, metadata, sae.input_norm)


def convert(src: str | Path, dst: str | Path, to: str, model: str | None = None, hookpoint: str | None = None) -> Path:
    """Convert the SAE at `src` into the new folder `dst`, in the layout `to` (module docstring); `model`,
    `hookpoint`: recorded in its provenance. The folder appears whole or not at all: it is written beside
    `dst` and renamed into place."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise UsageError(f"--to must be one of {list(TARGETS)}, got {to!r}")
    if dst.exists():
        raise UsageError(f"{dst} already exists; converting never overwrites: remove it or choose another DST")
    recorded = {key: value for key, value in (("model", model), ("hookpoint", hookpoint)) if value}
    if to == "circuit-tracer":
        members = transcoder_set(src, recorded)
    else:
        sae, provenance = read_sae(src)
        provenance.update(recorded)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        if to == "circuit-tracer":
            model_name = members[0].provenance.get("model")
            write_circuit_tracer_set(tmp, members, lm_family(model_name), lm_layer_count(model_name))
        else:
            write_sae(sae, provenance, tmp, to)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def transcoder_set(src: Path, recorded: dict[str, Any]) -> list[LayerTranscoder]:
    """The transcoders of a circuit-tracer set: the SAE folders in the run folder `src` (or `src` itself),
    each with the layer of the MLP it replaces (`feature_hooks`); `recorded` (--model, --hookpoint)
    overrides their provenance. What is not one transcoder per layer is refused by the writer."""
    folders = [src] if is_sae_folder(src) else sorted(path for path in src.iterdir() if is_sae_folder(path)) \
        if src.is_dir() else []
    if not folders:
        raise UsageError(f"{src}: no SAE folder (cfg.json) there; --to circuit-tracer reads a run folder of "
                         "transcoders, one per layer")
    if len(folders) > 1 and "hookpoint" in recorded:
        raise UsageError("--hookpoint names one transcoder's MLP; a run folder of several records its own")
    members = []
    for folder in folders:
        sae, provenance = read_sae(folder)
        if sae.cfg.activation == "batchtopk":
            raise UsageError(f"{folder}: {batchtopk_refusal('circuit-tracer')}")
        provenance.update(recorded)
        layer, _, _ = feature_hooks(str(folder), provenance.get("hookpoint"), lm_family(provenance.get("model")))
        tensors = {name: tensor.detach() for name, tensor in sae.state_dict().items()}
        members.append(LayerTranscoder(layer, sae.cfg, tensors, provenance, str(folder)))
    return members


def batchtopk_refusal(to: str) -> str:
    """Why a BatchTopK SAE is not written for the tool `to` (the reason names what it would compute)."""
    if to == "sparsify":
        return ("sparsify has no BatchTopK: it would encode each token by its own top k, not by the threshold "
                "this SAE was trained to; use --to ours, or for an SAE --to saelens (a JumpReLU SAE)")
    return (f"a BatchTopK coder encodes by a threshold (a JumpReLU), and --to {to} writes only TopK coders so "
            "far; use --to ours")


def lm_layer_count(model: str | None) -> int | None:
    """The number of layers of the LM `model` from its config.json where it is a local folder, else None."""
    config_path = Path(model) / "config.json" if model else None
    if config_path is None or not config_path.is_file():
        return None
    config = read_json(config_path)
    return next((config[key] for key in ("num_hidden_layers", "n_layer") if isinstance(config.get(key), int)), None)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m sae.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the SAE: a folder or a state-dict file in any layout SparseAutoencoder.load reads")
    parser.add_argument("dst", help="the folder to write (must not exist)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the layout of DST")
    parser.add_argument("--model", help="record the LM the SAE reads (cfg.json 'model'; SAELens metadata.model_name)")
    parser.add_argument("--hookpoint", help="record the module whose output it reads (cfg.json 'hookpoint')")
    args = parser.parse_args(argv)
    dst = convert(args.src, args.dst, args.to, args.model, args.hookpoint)
    print(f"wrote {dst} from {args.src}; load it with {LOAD_CALLS[args.to].format(dst=str(dst))}")
    return dst


if __name__ == "__main__":
    run_cli(main)
