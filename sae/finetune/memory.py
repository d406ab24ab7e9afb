"""Peak memory of a fine-tune, estimated before its first step:

    LM           its parameters (already loaded)
    layers       the activations the backward keeps in each of the L_after blocks after the hookpoint, for
                 B windows of T tokens of width h with a heads: 2 (34 T B h + 5 a T^2 B) bytes per block
                 (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
                 §4.1: 34 sbh + 5 as^2 b bytes in 16-bit, doubled for float32)
    logits       LOGIT_COPIES (B, T, vocab) float32 tensors: the clean logits, their log-softmax and its
                 exp, the spliced logits and their log-softmax, the KL's difference and product, and a
                 gradient of that size in the backward
    SAE          parameters, gradients, Adam's two moments and one step's tensors on B (T - 1) rows
                 (`sae.memory.estimate_memory`, the trainer's own estimate)

It is an estimate: an LM whose config names no layer count, width or heads gets the layer term from the
hooked block's width alone (the heads term left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SaeConfig
from ..memory import FLOAT_BYTES, estimate_memory, gib

LOGIT_COPIES = 8
"""(B, T, vocab) float32 tensors alive at the peak of a step (module docstring). Checked on the CPU: from
32 to 128 windows of 64 tokens (vocab 4096) the peak RSS grew by 917 MiB, this estimate by 957 MiB."""


@dataclass(frozen=True)
class FinetuneMemory:
    """Bytes on the device, by what holds them."""

    lm: int
    layers: int
    logits: int
    sae: int

    @property
    def total(self) -> int:
        return self.lm + self.layers + self.logits + self.sae

    def summary(self) -> str:
        parts = [("LM", self.lm), ("activations for backward", self.layers), ("logits", self.logits),
                 ("SAE with gradients, Adam and step", self.sae)]
        return ", ".join(f"{name} {gib(size)}" for name, size in parts) + f"; total {gib(self.total)}"


def _config_int(config, *names: str) -> int | None:
    return next((value for name in names if isinstance(value := getattr(config, name, None), int)), None)


def layers_after(model: nn.Module, hookpoint: str) -> int:
    """How many blocks of the LM run after `hookpoint` (the blocks of its numbered stack past its own
    number; all of them when the hookpoint is not in a numbered stack)."""
    n_layers = _config_int(model.config, "num_hidden_layers", "n_layer") or 0
    numbers = [int(part) for part in hookpoint.split(".") if part.isdigit()]
    return max(n_layers - numbers[0] - 1, 0) if numbers else n_layers


def estimate(model: nn.Module, hookpoint: str, sae_cfg: SaeConfig, batch_windows: int, ctx_len: int,
             device: torch.device) -> FinetuneMemory:
    """The estimate (module docstring) for B = `batch_windows` windows of T = `ctx_len` tokens."""
    config = model.config
    width = _config_int(config, "hidden_size", "n_embd") or sae_cfg.d_in
    heads = _config_int(config, "num_attention_heads", "n_head") or 0
    vocab = _config_int(config, "vocab_size") or 0
    tokens = batch_windows * ctx_len
    layers = layers_after(model, hookpoint) * 2 * (34 * tokens * width + 5 * heads * ctx_len * tokens)
    logits = LOGIT_COPIES * tokens * vocab * FLOAT_BYTES
    lm = sum(p.numel() * p.element_size() for p in model.parameters())
    sae = estimate_memory([(sae_cfg, sae_cfg.n_latents)], batch_windows * (ctx_len - 1), [sae_cfg.d_in], 0, 0, device)
    return FinetuneMemory(lm, layers, logits, sae.total)
