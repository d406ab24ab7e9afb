"""OpenAI's sparse autoencoders (https://github.com/openai/sparse_autoencoder, sparse_autoencoder/model.py):
a torch state dict, read with `torch.load(weights_only=True)` only.

Their `Autoencoder.state_dict()` holds pre_bias (d_in), encoder.weight (n_latents, d_in), latent_bias
(n_latents), decoder.weight (d_in, n_latents) (or decoder.linear.weight, the encoder's own weight, when
tied), the training statistics stats_last_nonzero, latents_activation_frequency and latents_mean_square,
and `activation` (the activation's class name) with `activation_state_dict` ({"k", "postact_fn"} for TopK);
TopK's own state_dict override adds the same two under activation.k and activation.postact_fn.
Their `Autoencoder.from_state_dict` turns on the LayerNorm input preprocessing exactly when the activation
is TopK, and computes

    x_n, mu, std = LN(x)                                (mean and unbiased std per token, eps 1e-5)
    latents = postact_fn of the top k of encoder(x_n - pre_bias) + latent_bias, zero elsewhere
    recons  = (decoder(latents) + pre_bias) * std + mu

which is this SAE with input_norm "layer_norm" (sae/model.py `layer_norm_input`): W_enc = encoder.weight,
b_enc = latent_bias, W_dec = decoder.weight^T, b_dec = pre_bias, each copied bit for bit. A ReLU (L1)
autoencoder, or TopK with another postact_fn than ReLU, is not this SAE's math and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .common import ForeignSae, check_keys, check_one_dtype, check_shapes, matrix_shape, sae_config

PARAMETERS = {"pre_bias", "encoder.weight", "latent_bias"}
UNTIED_DECODER, TIED_DECODER = "decoder.weight", "decoder.linear.weight"
STATISTICS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}
"""Training statistics (buffers); encode and decode do not use them."""
ACTIVATION_KEYS = {"activation", "activation_state_dict", "activation.k", "activation.postact_fn"}


def is_openai_state_dict(state: dict[str, Any]) -> bool:
    """Whether `state` has the parameters only OpenAI's layout names (pre_bias, latent_bias)."""
    return {"pre_bias", "latent_bias"} <= state.keys()


def read_openai_state_dict(path: Path, state: dict[str, Any]) -> ForeignSae:
    """The TopK SAE of OpenAI's state dict `state` (read from `path`), or a UsageError saying why not."""
    decoder_key = TIED_DECODER if TIED_DECODER in state else UNTIED_DECODER
    check_keys(path, set(state), PARAMETERS | {decoder_key}, STATISTICS | ACTIVATION_KEYS, "OpenAI's state dict")
    k = _topk_k(path, state)
    n_latents, d_in = matrix_shape(path, state, "encoder.weight")
    cfg = sae_config(path, d_in, n_latents, k)
    decoder_shape = (n_latents, d_in) if decoder_key == TIED_DECODER else (d_in, n_latents)
    check_shapes(path, state, {"pre_bias": (d_in,), "encoder.weight": (n_latents, d_in), "latent_bias": (n_latents,),
                               decoder_key: decoder_shape})
    if decoder_key == TIED_DECODER and not torch.equal(state[TIED_DECODER], state["encoder.weight"]):
        raise UsageError(f"{path}: a tied autoencoder whose '{TIED_DECODER}' differs from 'encoder.weight' (one "
                         "parameter in OpenAI's model)")
    W_dec = state[decoder_key] if decoder_key == TIED_DECODER else state[decoder_key].T.contiguous()
    tensors = {"encoder.weight": state["encoder.weight"], "encoder.bias": state["latent_bias"], "W_dec": W_dec,
               "b_dec": state["pre_bias"]}
    check_one_dtype(path, tensors)
    return ForeignSae("openai", cfg, tensors, "layer_norm", {"converted_from": {"format": "openai", "path": str(path)}},
                      path)


def _topk_k(path: Path, state: dict[str, Any]) -> int:
    """k of a TopK autoencoder with ReLU after the top k; a UsageError for any other activation."""
    activation = state.get("activation", "ReLU")  # from_state_dict's default
    if activation != "TopK":
        raise UsageError(f"{path}: cannot load activation {activation!r}: OpenAI's loader builds a {activation} "
                         "autoencoder from it, not a TopK one")
    settings = state.get("activation_state_dict")
    if not (isinstance(settings, dict) and {"k", "postact_fn"} <= settings.keys()):
        raise UsageError(f"{path}: 'activation_state_dict' should hold 'k' and 'postact_fn', found {settings!r}")
    for key in ("k", "postact_fn"):
        if f"activation.{key}" in state and state[f"activation.{key}"] != settings[key]:
            raise UsageError(f"{path}: 'activation.{key}' is {state[f'activation.{key}']!r}, 'activation_state_dict' "
                             f"says {settings[key]!r}")
    if settings["postact_fn"] != "ReLU":
        raise UsageError(f"{path}: cannot load postact_fn {settings['postact_fn']!r}: this SAE applies ReLU to the "
                         "top k values, so only 'ReLU' gives the same latents")
    return settings["k"]

