"""dictionary_learning's TopK SAEs (https://github.com/saprmarks/dictionary_learning, `AutoEncoderTopK` in
dictionary_learning/trainers/top_k.py): ae.pt, a torch state dict read with `torch.load(weights_only=True)`
only, and config.json beside it, written by its `trainSAE`.

The state dict holds encoder.weight (dict_size, d_in), encoder.bias (dict_size), decoder.weight
(d_in, dict_size) (nn.Linear without bias), b_dec (d_in), the buffer k and, in newer versions, the buffer
threshold. Its forward (`encode` with the default use_threshold=False, then `decode`) computes

    f     = the top k of ReLU(encoder(x - b_dec)), zero elsewhere
    x_hat = decoder(f) + b_dec

It takes ReLU before the top k and this SAE after; the latents (values scattered into dict_size) and the
reconstruction are the same, only the indices of zero-valued picks in rows with fewer than k positive
pre-activations may differ. So W_enc = encoder.weight, b_enc = encoder.bias, W_dec = decoder.weight^T,
b_dec = b_dec, each copied bit for bit. The final ae.pt takes raw activations: trainSAE scales the biases
by its norm_factor before saving. The threshold is used only when a caller asks for
encode(use_threshold=True), a JumpReLU-like mode this SAE does not have; it is not carried over.

`BatchTopKSAE` saves the same tensors but encodes with the threshold by default, a different function;
only config.json tells the two apart (trainer.dict_class), so it is required, and only "AutoEncoderTopK"
is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import UsageError
from ..files import read_json_object
from .common import ForeignSae, check_keys, check_one_dtype, check_shapes, describe, matrix_shape, sae_config

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
PARAMETERS = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"}
OPTIONAL = {"threshold"}
DICT_CLASS = "AutoEncoderTopK"
TRAINING_BACKUP_KEYS = {"step", "ae", "optimizer", "config"}
"""What trainSAE writes to ae.pt every backup_steps while training; the final SAE replaces it."""


def is_dictionary_learning_state_dict(state: dict[str, Any]) -> bool:
    """Whether `state` has the parameters only dictionary_learning's layouts name (b_dec with encoder.bias),
    or is its training backup."""
    return {"b_dec", "encoder.bias", "decoder.weight"} <= state.keys() or TRAINING_BACKUP_KEYS <= state.keys()


def read_dictionary_learning_state_dict(path: Path, state: dict[str, Any]) -> ForeignSae:
    """The TopK SAE of dictionary_learning's `state` (read from the file `path`, with config.json beside
    it), or a UsageError saying why not."""
    if TRAINING_BACKUP_KEYS <= state.keys():
        raise UsageError(f"{path}: a training backup (keys {sorted(state)}) that dictionary_learning writes while "
                         "training runs, not a final SAE (its biases are not yet scaled by norm_factor)")
    check_keys(path, set(state), PARAMETERS, OPTIONAL, f"dictionary_learning's {DICT_CLASS} state dict")
    trainer = _trainer_config(path.parent / CONFIG_FILE)
    k = _k(path, state["k"])
    if trainer.get("k", k) != k:
        raise UsageError(f"{path}: the buffer k is {k}, {path.parent / CONFIG_FILE} says k={trainer['k']!r}")
    dict_size, d_in = matrix_shape(path, state, "encoder.weight")
    cfg = sae_config(path, d_in, dict_size, k)
    check_shapes(path, state, {"encoder.weight": (dict_size, d_in), "encoder.bias": (dict_size,),
                               "decoder.weight": (d_in, dict_size), "b_dec": (d_in,)})
    tensors = {"encoder.weight": state["encoder.weight"], "encoder.bias": state["encoder.bias"],
               "W_dec": state["decoder.weight"].T.contiguous(), "b_dec": state["b_dec"]}
    check_one_dtype(path, tensors)
    source = {key: trainer[key] for key in ("lm_name", "layer", "submodule_name") if trainer.get(key) is not None}
    return ForeignSae("dictionary_learning", cfg, tensors, "none",
                      {"converted_from": {"format": "dictionary_learning", "path": str(path), **source}}, path)


def _trainer_config(config_path: Path) -> dict[str, Any]:
    """config.json's "trainer" section, checked to describe an AutoEncoderTopK."""
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found: without it an {DICT_CLASS} cannot be told from a BatchTopKSAE, "
                         "whose ae.pt has the same tensors but computes another function")
    trainer = read_json_object(config_path).get("trainer")
    if not isinstance(trainer, dict):
        raise UsageError(f"{config_path}: expected a 'trainer' object (dictionary_learning's config)")
    if trainer.get("dict_class") != DICT_CLASS:
        raise UsageError(f"{config_path}: cannot load dict_class {trainer.get('dict_class')!r}: only {DICT_CLASS!r} "
                         "computes a TopK SAE's function (BatchTopKSAE encodes with a learned threshold)")
    return trainer


def _k(path: Path, k: Any) -> int:
    if not (isinstance(k, Tensor) and k.numel() == 1 and not k.is_floating_point()):
        raise UsageError(f"{path}: the buffer 'k' should be an integer scalar tensor, found {describe(k)}")
    return int(k)

