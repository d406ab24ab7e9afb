"""SAEs saved by other tools: each foreign layout mapped exactly onto this SAE (sae/model.py), or refused
with the reason; and SAELens's folder layout written, so our SAEs load there.

    format               layout                                               module
    ours / sparsify      folder: cfg.json + sae.safetensors                   sae/folder.py (sparsify's keys: sparsify.py)
    SAELens >= 6         folder: cfg.json + sae_weights.safetensors           saelens.py (TopK; JumpReLU with one
                                                                                threshold: BatchTopK)
    OpenAI               file: a torch state dict with pre_bias, latent_bias  openai.py
    dictionary_learning  folder with ae.pt + config.json, or that ae.pt       dictionary_learning.py

A reader returns a `ForeignSae` (tensors in our names and shapes, the config, the input transform),
never an SAE: building one is sae/model.py's job, which imports this package. Torch files are read with
`torch.load(weights_only=True)` only (common.py `load_state_dict_file`), never fully unpickled.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingFileError, UsageError
from . import dictionary_learning, openai, saelens
from .common import ForeignSae, load_state_dict_file

KNOWN_LAYOUTS = (
    "ours/sparsify (a folder with cfg.json + sae.safetensors), "
    f"SAELens (a folder with {saelens.CONFIG_FILE} + {saelens.WEIGHTS_FILE}), "
    "OpenAI sparse_autoencoder (a torch state-dict file with pre_bias, latent_bias ...), "
    f"dictionary_learning (a folder with {dictionary_learning.WEIGHTS_FILE} + {dictionary_learning.CONFIG_FILE}, "
    f"or that {dictionary_learning.WEIGHTS_FILE})"
)
"""Every layout `SparseAutoencoder.load` reads, for the message that names them."""

__all__ = ["ForeignSae", "KNOWN_LAYOUTS", "read_foreign_sae"]


def read_foreign_sae(path: Path) -> ForeignSae:
    """The SAE at `path` in any foreign layout of the module docstring (the format told by its files, or a
    file's keys); a UsageError naming what is there and the known layouts if none matches."""
    if not path.exists():
        raise MissingFileError(f"SAE not found: {path} does not exist (expected a folder with cfg.json, or a file)")
    if path.is_dir():
        if (path / saelens.WEIGHTS_FILE).is_file():
            return saelens.read_saelens_folder(path)
        if (path / dictionary_learning.WEIGHTS_FILE).is_file():
            path = path / dictionary_learning.WEIGHTS_FILE
        else:
            found = sorted(child.name for child in path.iterdir())
            shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
            raise UsageError(f"{path}: no SAE layout known here (found: {shown or 'nothing'}); "
                             f"known layouts: {KNOWN_LAYOUTS}")
    state = load_state_dict_file(path)
    if openai.is_openai_state_dict(state):
        return openai.read_openai_state_dict(path, state)
    if dictionary_learning.is_dictionary_learning_state_dict(state):
        return dictionary_learning.read_dictionary_learning_state_dict(path, state)
    keys = sorted(map(str, state))
    raise UsageError(f"{path}: a state dict with keys {keys[:12]}{' ...' if len(keys) > 12 else ''}, in no known "
                     f"layout; known layouts: {KNOWN_LAYOUTS}")
