"""Downstream loss: next-token cross-entropy and KL to the clean LM, under each splice variant.

Gao et al. 2024 (§4.1) judge an SAE by the LM loss when its reconstruction replaces the activations;
SAELens' "CE loss score" and dictionary_learning's `frac_recovered` are the normalised form:

    ce_recovered      = (ce_zero - ce_sae) / (ce_zero - ce_clean)   1 = as good as clean, 0 = as bad as zeroing
    ce_recovered_mean = (ce_mean - ce_sae) / (ce_mean - ce_clean)   the same against mean ablation
    delta_ce          = ce_sae - ce_clean
    kl                = mean over positions of KL(p_clean || p_sae)

Only predictions made at spliced positions count (logits at positions start .. T-2 predicting
tokens start+1 .. T-1): earlier positions cannot see the splice, and counting them would dilute every
variant alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class LossStats:
    """Running float64 sums of cross-entropy (per variant) and KL(clean || variant) over positions."""

    def __init__(self, n_variants: int, start: int = 1):
        self.start = start
        self.positions = 0
        self.ce_sums = torch.zeros(n_variants, dtype=torch.float64)
        self.kl_sums = torch.zeros(n_variants, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, input_ids: Tensor) -> None:
        """logits (V, B, T, vocab) with variant 0 the clean run; input_ids (B, T)."""
        if input_ids.shape[1] < self.start + 2:
            raise ValueError(f"windows of {input_ids.shape[1]} tokens have no prediction after position {self.start}")
        targets = input_ids[:, self.start + 1 :]
        clean_log_probs = logits[0, :, self.start : -1].float().log_softmax(-1)
        clean_probs = clean_log_probs.exp()
        for variant in range(logits.shape[0]):
            log_probs = logits[variant, :, self.start : -1].float().log_softmax(-1)
            nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
            kl = (clean_probs * (clean_log_probs - log_probs)).sum(-1)
            self.ce_sums[variant] += nll.double().sum().cpu()
            self.kl_sums[variant] += kl.double().sum().cpu()
        self.positions += targets.numel()

    def mean_ce(self) -> list[float]:
        return (self.ce_sums / self.positions).tolist()

    def mean_kl(self) -> list[float]:
        return (self.kl_sums / self.positions).tolist()


def recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean); NaN when ablation does not change the loss."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else math.nan
