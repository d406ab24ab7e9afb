"""The loss of the end-to-end fine-tune: the SAE spliced into the LM (Karvonen 2025, "Revisiting End-To-End
Sparse Autoencoder Training: A Short Finetune Is All You Need", arXiv 2503.17272; the KL term is Braun et
al. 2024's end-to-end objective, arXiv 2405.12241):

    loss = kl_coef * KL(p_clean || p_spliced) + the SAE's own training loss on the spliced rows

p_clean are the LM's next-token distributions on a batch of windows, p_spliced the same LM's with the
hookpoint's output replaced by the SAE's reconstruction at positions >= 1 (position 0 keeps its clean
activation: training never saw it, and its norm is far from the text's), the KL averaged over the
predictions at positions 1 .. T-1 (those that can see a spliced position). With token hygiene
(`exclude_special_tokens`), the positions of BOS/EOS/pad tokens keep their clean activations too and are
left out of the reconstruction loss, as training left them out.

A transcoder (Dunefsky et al. 2024) reads the module's input and predicts its output: its forward runs on
the input's rows with the output's as its target, and its prediction replaces the output; the rest is the
same.

The spliced activations are exactly the reconstruction `x_hat` of the SAE's training forward, so both terms
reach the SAE through one forward: the KL through the LM's layers after the hookpoint (frozen: their
parameters get no gradient, the activations do), the reconstruction loss directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import output_hidden, with_hidden
from ..hygiene import token_keep_mask
from ..model import ForwardOutput, SparseAutoencoder


class FinetuneLoss(NamedTuple):
    """One step's losses (scalars; `total` and its terms carry the gradient)."""

    total: Tensor
    """kl_coef * kl + sae.loss."""
    kl: Tensor
    """Mean KL(p_clean || p_spliced) over the predictions at positions 1 .. T-1, nats."""
    sae: ForwardOutput
    """The SAE's training forward on the spliced rows: x_hat, fvu, its loss, BatchTopK's batch threshold."""


def splice_mask(input_ids: Tensor, excluded: list[int]) -> Tensor:
    """(B, T) bool: the positions the SAE replaces, every one but position 0 and the tokens `excluded`
    (`sae.hygiene.excluded_ids`: the tokenizer's special tokens when the SAE was trained without them)."""
    mask = token_keep_mask(input_ids, excluded)
    mask[:, 0] = False
    return mask


class CleanRun(NamedTuple):
    """The LM's clean forward: the hooked module's first input and its output (B, T, d), the logits (B, T, vocab)."""

    inputs: Tensor
    hidden: Tensor
    logits: Tensor


@torch.no_grad()
def clean_run(model: nn.Module, module: nn.Module, input_ids: Tensor) -> CleanRun:
    """The LM's clean forward on `input_ids` (B, T), without gradient."""
    captured = {}

    def hook(_module, args, output):
        captured["inputs"], captured["hidden"] = args[0], output_hidden(output)

    handle = module.register_forward_hook(hook)
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        handle.remove()
    return CleanRun(captured["inputs"], captured["hidden"], logits)


def spliced_logits(model: nn.Module, module: nn.Module, input_ids: Tensor, hidden: Tensor) -> Tensor:
    """The logits (B, T, vocab) of the LM on `input_ids` (B, T) with the hooked module's output replaced
    by `hidden` (B, T, d), with gradient through the layers after it. The layers before it run again
    (their output is discarded): a generic LM has no entry point in the middle."""
    def hook(_module, _args, output):
        return with_hidden(output, hidden.to(output_hidden(output).dtype))

    handle = module.register_forward_hook(hook)
    try:
        return model(input_ids=input_ids).logits
    finally:
        handle.remove()


def kl_clean_to_spliced(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over the predictions at positions 1 .. T-1 of KL(p_clean || p_spliced), both (B, T, vocab),
    computed in float32 at least (the clean side carries no gradient)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    clean = F.log_softmax(clean_logits[:, 1:].to(dtype), dim=-1)
    spliced = F.log_softmax(logits[:, 1:].to(dtype), dim=-1)
    return (clean.exp() * (clean - spliced)).sum(-1).mean()


def finetune_loss(model: nn.Module, module: nn.Module, sae: SparseAutoencoder, input_ids: Tensor,
                  excluded: list[int], kl_coef: float) -> FinetuneLoss:
    """The loss of one batch of windows `input_ids` (B, T) (module docstring). The SAE's forward runs on
    the rows of the spliced positions (`splice_mask`), N of them, in window order, with no dead-latent
    mask, so no AuxK: the SAE folder keeps no dead-latent counters, and counters started afresh would call
    every latent alive for its first dead_tokens tokens; a short phase adjusts the live latents. A transcoder
    reads the module's input rows and predicts its output rows."""
    clean = clean_run(model, module, input_ids)
    mask = splice_mask(input_ids, excluded)
    if sae.cfg.transcode:
        out = sae(clean.inputs[mask], target=clean.hidden[mask])  # (N, d) rows
    else:
        out = sae(clean.hidden[mask])
    spliced = clean.hidden.to(out.x_hat.dtype).masked_scatter(mask.unsqueeze(-1), out.x_hat)
    kl = kl_clean_to_spliced(clean.logits, spliced_logits(model, module, input_ids, spliced))
    return FinetuneLoss(kl_coef * kl + out.loss, kl, out)
