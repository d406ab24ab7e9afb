"""Convert an SAE between tools: `python -m sae.convert SRC DST --to saelens|sparsify|ours`.

SRC is anything `SparseAutoencoder.load` reads (our or sparsify's folder, a SAELens TopK folder, an OpenAI
TopK state dict, dictionary_learning's AutoEncoderTopK ae.pt: sae/formats/). DST, a new folder (an
existing path is never overwritten), is written in the target tool's layout, loaded there by its own
documented call and computing what the SAE computes here:

    --to saelens   sae_lens.SAE.load_from_disk(DST)              (a TopK SAE; sae/formats/saelens.py)
    --to sparsify  sparsify.SparseCoder.load_from_disk(DST)       (our folder layout is sparsify's)
    --to ours      SparseAutoencoder.load(DST), python -m eval DST, python -m eval.browse

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
from .formats.hook_names import saelens_hook
from .formats.saelens import write_saelens_folder
from .model import SparseAutoencoder, read_sae_files, write_sae_folder

TARGETS = ("saelens", "sparsify", "ours")
LOAD_CALLS = {"saelens": "sae_lens.SAE.load_from_disk({dst!r})", "sparsify": "sparsify.SparseCoder.load_from_disk({dst!r})",
              "ours": "sae.SparseAutoencoder.load({dst!r})"}


def read_sae(src: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """(the SAE at `src`, its provenance: the cfg.json keys beyond the config, or where a foreign SAE came from),
    read as `SparseAutoencoder.load` reads it (`read_sae_files`: weights with NaN or inf are refused)."""
    files = read_sae_files(src)
    return SparseAutoencoder.from_state_dict(files.cfg, files.tensors, input_norm=files.input_norm), files.metadata


def write_sae(sae: SparseAutoencoder, provenance: dict[str, Any], dst: Path, to: str) -> None:
    """Write `sae` to the new folder `dst` in the layout `to` (one of TARGETS), with `provenance`."""
    tensors = {name: tensor.detach() for name, tensor in sae.state_dict().items()}
    if to == "saelens":
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
    sae, provenance = read_sae(src)
    provenance.update({key: value for key, value in (("model", model), ("hookpoint", hookpoint)) if value})
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        write_sae(sae, provenance, tmp, to)
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


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
