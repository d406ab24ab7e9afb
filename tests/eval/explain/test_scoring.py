"""Pearson scoring against a float64 reference; constant simulations score 0 and are flagged."""

import random

import torch

from eval.explain.explainers import Explanation
from eval.explain.records import Excerpt, UnitRecords
from eval.explain.scoring import correlation, score_unit


def test_correlation_matches_float64_reference():
    rng = random.Random(0)
    true = [[rng.gauss(0, 1) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    simulated = [[value * 0.5 + rng.gauss(0, 1) for value in row] for row in true]
    flat = torch.tensor([[v for row in true for v in row], [v for row in simulated for v in row]], dtype=torch.float64)
    score, flag = correlation(true, simulated)
    assert flag is None and abs(score - torch.corrcoef(flat)[0, 1].item()) < 1e-12


def test_constant_inputs_score_zero_with_a_flag():
    assert correlation([[1.0, 2.0]], [[3.0, 3.0]]) == (0.0, "constant simulation")
    assert correlation([[0.0, 0.0]], [[1.0, 2.0]]) == (0.0, "constant activations")


class Echo:
    """A simulator that returns each excerpt's true activations, looked up by its tokens."""

    def __init__(self, records):
        self.table = {tuple(e.tokens): e.activations for e in records.top + records.random}
        self.seen = []

    def simulate(self, explanation, excerpts):
        self.seen.append(excerpts)
        return [self.table[tuple(tokens)] for tokens in excerpts]


def test_score_unit_uses_scoring_excerpts_and_both_score_kinds():
    top = [Excerpt([f"t{i}", "x"], [10.0 - i, 0.0]) for i in range(10)]
    random_excerpts = [Excerpt([f"r{i}", "y"], [float(i % 3 == 0), 0.0]) for i in range(20)]
    records = UnitRecords(0, "latent", top, random_excerpts)
    echo = Echo(records)
    scores = score_unit(echo, Explanation("anything"), records)
    assert scores["top_and_random"] == 1.0 and abs(scores["random_only"] - 1.0) < 1e-12 and scores["flags"] == {}
    assert [tokens[0] for tokens in echo.seen[0]] == [f"t{i}" for i in (1, 3, 5, 7, 9)] + [f"r{i}" for i in range(20)]

    silent = UnitRecords(0, "latent", top, [Excerpt(["r", "y"], [0.0, 0.0])] * 20)
    scores = score_unit(Echo(silent), Explanation("anything"), silent)
    assert scores["random_only"] == 0.0 and scores["flags"] == {"random_only": "constant activations"}
