"""Scores: the Pearson correlation between simulated and true activations (Bills et al. 2023).

The correlation is taken over all tokens of the scoring excerpts together, not per excerpt:
- top-and-random: 5 top excerpts (not the ones the explainer saw) + 5 random excerpts;
- random-only: the random excerpts alone (up to 20), which asks whether the explanation also
  predicts where the unit stays silent in ordinary text.
A constant simulation (or constant true activations: a unit silent on every random excerpt) has no
correlation; it scores 0 and is flagged, so a mean over units never becomes NaN.
"""

from __future__ import annotations

import math

from .explainers import Explanation
from .records import UnitRecords

N_TOP = 5
N_RANDOM_IN_MIX = 5


def correlation(true: list[list[float]], simulated: list[list[float]]) -> tuple[float, str | None]:
    """(Pearson r over all tokens, None) or (0.0, the reason there is none)."""
    x = [value for row in true for value in row]
    y = [value for row in simulated for value in row]
    if len(x) != len(y):
        raise ValueError(f"{len(y)} simulated values for {len(x)} tokens")
    if len(x) < 2:
        return 0.0, "too few tokens"
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread_x = math.sqrt(sum((a - mean_x) ** 2 for a in x))
    spread_y = math.sqrt(sum((b - mean_y) ** 2 for b in y))
    if spread_x == 0:
        return 0.0, "constant activations"
    if spread_y == 0 or not math.isfinite(spread_y):
        return 0.0, "constant simulation"
    return covariance / (spread_x * spread_y), None


def score_unit(simulator, explanation: Explanation, records: UnitRecords) -> dict:
    """Scores of one explanation of one unit under one simulator, and the simulated values."""
    top = records.scoring_top(N_TOP)
    excerpts = top + records.random
    simulated = simulator.simulate(explanation, [excerpt.tokens for excerpt in excerpts])
    true = [excerpt.activations for excerpt in excerpts]
    mix = len(top) + N_RANDOM_IN_MIX
    top_and_random, top_and_random_flag = correlation(true[:mix], simulated[:mix])
    random_only, random_only_flag = correlation(true[len(top) :], simulated[len(top) :])
    return {
        "top_and_random": top_and_random,
        "random_only": random_only,
        "flags": {key: flag for key, flag in (("top_and_random", top_and_random_flag), ("random_only", random_only_flag)) if flag},
    }
