"""Run the LM with the hookpoint's output replaced: SAE reconstruction (a transcoder's prediction from the
module's input, `SpliceRunner.sae_input`), zero or mean ablation.

All variants of one batch run in one forward call. A forward hook on the hooked module receives its
output h (B, T, d) and returns the variants stacked along the batch, (V * B, T, d); the layers after
the hookpoint then run once on the stacked batch and the logits come out as (V * B, T, vocab). The
layers before the hookpoint run once. Positions before `start` keep their clean activations in every
variant (position 0 is never replaced: training drops it, and its huge norm is not what the SAE learned).

Some models build per-batch tensors before the first layer (an eager-attention causal mask of shape
(B, 1, T, T), rotary tables): growing the batch inside the forward breaks them. For those the runner
repeats the input ids V times instead, so every layer sees the V * B batch from the start; the
variants are the same, only the layers before the hookpoint run V times. The runner tries the cheap
way on its first batch and keeps whichever works (`SpliceRunner.mode`).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from sae.activations import module_input, output_hidden, with_hidden
from sae.errors import UsageError

Replacement = Callable[[Tensor], Tensor] | None
"""Maps the activations at positions >= start, (B, T - start, d), to their replacement (same shape);
None keeps them (the clean run). It may run twice for the first batch (see `SpliceRunner.logits`), so
it must not accumulate anything: whatever it records, it overwrites."""

SpliceMode = Literal["auto", "expand_in_hook", "repeat_inputs"]


def stack_variants(hidden: Tensor, replacements: Sequence[Replacement], start: int) -> Tensor:
    """(V * B, T, d): for each replacement, `hidden` with positions >= start replaced."""
    variants = []
    for replace in replacements:
        if replace is None:
            variants.append(hidden)
            continue
        new = replace(hidden[:, start:])
        if new.shape != hidden[:, start:].shape:
            raise ValueError(f"a replacement returned shape {tuple(new.shape)}, expected {tuple(hidden[:, start:].shape)}")
        variants.append(torch.cat([hidden[:, :start], new.to(hidden.dtype)], dim=1))
    return torch.cat(variants)


class SpliceRunner:
    """Logits of the LM under several replacements of one module's output, in one forward call."""

    def __init__(self, model: nn.Module, module: nn.Module, start: int = 1, mode: SpliceMode = "auto"):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.model = model
        self.module = module
        self.start = start
        self.mode = mode
        self.clean_activations: Tensor | None = None
        """The hooked module's clean output at positions >= start in the last call, (B, T - start, d)."""
        self.clean_inputs: Tensor | None = None
        """The hooked module's clean (first) input at positions >= start in the last call, (B, T - start,
        d), set before the replacements run: what a transcoder's replacement predicts the output from."""

    def sae_input(self, acts: Tensor, transcode: bool) -> Tensor:
        """What an SAE spliced here encodes when its replacement is handed `acts` (B, T - start, d), the
        module's clean output of this batch: `acts` themselves, or for a transcoder (`transcode`), which
        predicts the output from the module's input, that clean input (`clean_inputs`)."""
        if not transcode:
            return acts
        if self.clean_inputs is None or self.clean_inputs.shape[:2] != acts.shape[:2]:
            # a UsageError, not a RuntimeError, which `logits` takes for a batch that does not broadcast
            raise UsageError("a transcoder predicts its module's output from its input, but the hooked module's "
                             "input is not a (batch, tokens, d) tensor")
        return self.clean_inputs

    @torch.no_grad()
    def logits(self, input_ids: Tensor, replacements: Sequence[Replacement]) -> Tensor:
        """(V, B, T, vocab) logits for input_ids (B, T), one slice per replacement, in their order."""
        if self.mode == "auto":
            try:
                result = self._run(input_ids, replacements, "expand_in_hook")
                self.mode = "expand_in_hook"
                return result
            except RuntimeError:  # the model's per-batch tensors do not broadcast to V * B
                self.mode = "repeat_inputs"
        return self._run(input_ids, replacements, self.mode)

    def _run(self, input_ids: Tensor, replacements: Sequence[Replacement], mode: str) -> Tensor:
        batch, n_variants = input_ids.shape[0], len(replacements)
        if self.start >= input_ids.shape[1]:
            raise ValueError(f"windows of {input_ids.shape[1]} tokens have no positions at or after start={self.start}")

        def hook(_module, args, kwargs, output):
            hidden = output_hidden(output)
            clean = hidden[:batch]  # under repeat_inputs all V copies are the same clean activations
            self.clean_activations = clean[:, self.start :]
            inputs = module_input(args, kwargs)
            self.clean_inputs = inputs[:batch, self.start :] if isinstance(inputs, Tensor) and inputs.dim() == 3 else None
            return with_hidden(output, stack_variants(clean, replacements, self.start))

        model_input = input_ids.repeat(n_variants, 1) if mode == "repeat_inputs" else input_ids
        handle = self.module.register_forward_hook(hook, with_kwargs=True)
        try:
            logits = self.model(input_ids=model_input).logits
        finally:
            handle.remove()
        if logits.shape[0] != n_variants * batch:
            raise RuntimeError(f"expected logits for {n_variants * batch} sequences, got {logits.shape[0]}")
        return logits.unflatten(0, (n_variants, batch))
