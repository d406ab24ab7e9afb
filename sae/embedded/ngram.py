"""Count-based baselines for the embedded model's held-out loss: unigram and interpolated bigram.

They put the neural model's number in context: a language model that does not beat an
interpolated bigram on the same tokens has learned little beyond local token statistics.
All losses are cross-entropies in nats per predicted token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAMBDA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Candidate bigram weights for Jelinek-Mercer interpolation: 0.05, 0.10, ..., 0.95."""


@dataclass(frozen=True)
class Unigram:
    """Add-alpha smoothed unigram model: P(w) = (c(w) + alpha) / (N + alpha * V)."""

    log_probs: torch.Tensor  # [V] float64

    @classmethod
    def fit(cls, tokens: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> Unigram:
        counts = torch.bincount(tokens, minlength=vocab_size).double()
        return cls(torch.log((counts + alpha) / (counts.sum() + alpha * vocab_size)))

    def loss(self, targets: torch.Tensor) -> float:
        return -self.log_probs[targets].mean().item()


@dataclass(frozen=True)
class Bigram:
    """Jelinek-Mercer bigram: P(w | v) = lam * c(v, w) / c(v) + (1 - lam) * P_unigram(w).

    Pair counts are kept sparse (sorted pair ids and their counts), since most of the V * V pairs
    never occur. A context never seen in training falls back to the unigram alone.
    """

    unigram: Unigram
    pair_ids: torch.Tensor  # sorted unique v * V + w, int64
    pair_counts: torch.Tensor  # float64, aligned with pair_ids
    context_counts: torch.Tensor  # [V] float64: c(v) as the first token of a pair
    vocab_size: int

    @classmethod
    def fit(cls, tokens: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> Bigram:
        pairs = tokens[:-1] * vocab_size + tokens[1:]
        pair_ids, pair_counts = torch.unique(pairs, sorted=True, return_counts=True)
        context_counts = torch.bincount(tokens[:-1], minlength=vocab_size).double()
        return cls(
            Unigram.fit(tokens, vocab_size, alpha), pair_ids, pair_counts.double(),
            context_counts, vocab_size,
        )

    def _ml_probs(self, contexts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Maximum-likelihood c(v, w) / c(v) for each (context, target); 0 for unseen contexts."""
        query = contexts * self.vocab_size + targets
        pos = torch.searchsorted(self.pair_ids, query).clamp(max=len(self.pair_ids) - 1)
        found = self.pair_ids[pos] == query
        counts = torch.where(found, self.pair_counts[pos], torch.zeros((), dtype=torch.float64))
        return counts / self.context_counts[contexts].clamp(min=1.0)

    def loss(self, contexts: torch.Tensor, targets: torch.Tensor, lam: float) -> float:
        ml = self._ml_probs(contexts, targets)
        seen = self.context_counts[contexts] > 0
        weight = torch.where(seen, torch.full_like(ml, lam), torch.zeros_like(ml))
        probs = weight * ml + (1 - weight) * self.unigram.log_probs[targets].exp()
        return -torch.log(probs).mean().item()


def tune_lambda(
    train_tokens: torch.Tensor, vocab_size: int, heldout_fraction: float = 0.1
) -> tuple[float, float]:
    """Choose the interpolation weight on the tail of the *training* stream.

    Counts come from the first (1 - heldout_fraction) of the stream and the weight that minimises
    the loss on the rest wins; the validation split stays untouched. Returns (lambda, its loss).
    """
    cut = int(len(train_tokens) * (1 - heldout_fraction))
    model = Bigram.fit(train_tokens[:cut], vocab_size)
    tail = train_tokens[cut:]
    losses = {lam: model.loss(tail[:-1], tail[1:], lam) for lam in LAMBDA_GRID}
    best = min(losses, key=losses.__getitem__)
    return best, losses[best]


def baseline_losses(
    train_tokens: torch.Tensor, contexts: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> dict[str, dict[str, float | str]]:
    """Unigram and interpolated-bigram losses on the given (context, target) token pairs.

    Both models are counted on the full training stream; the bigram weight is tuned on a held-out
    tail of that stream (see `tune_lambda`), then the counts are redone on all of it.
    """
    lam, tune_loss = tune_lambda(train_tokens, vocab_size)
    bigram = Bigram.fit(train_tokens, vocab_size)
    unigram_loss = bigram.unigram.loss(targets)
    bigram_loss = bigram.loss(contexts, targets, lam)
    assert math.isfinite(unigram_loss) and math.isfinite(bigram_loss)
    return {
        "unigram": {"loss": unigram_loss, "smoothing": "add-one (alpha=1) over the vocabulary"},
        "bigram": {
            "loss": bigram_loss,
            "smoothing": "Jelinek-Mercer interpolation with the add-one unigram",
            "lambda": lam,
            "lambda_tuned_on": "last 10% of the train token stream (counts from the first 90%)",
            "lambda_tuning_loss": tune_loss,
        },
    }
