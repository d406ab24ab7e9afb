"""Detection and fuzzing: two cheap scores of an explanation beside simulation (Paulo et al. 2024,
"Automatically Interpreting Millions of Features in Large Language Models", arXiv 2410.13928; EleutherAI's
delphi). Both ask a scorer (eval/explain/classifiers.py) yes/no questions whose answers are known:

- detection: is this an excerpt where the unit fires? Positives are the unit's activating scoring
  excerpts: its top excerpts of odd rank, its quantile excerpts (one from each of N_QUANTILES bins of its
  activating windows ranked by activation: delphi draws activating examples across activation quantiles,
  not only the top ones; records.collect_records) and the random excerpts where it fires; negatives are
  the random excerpts where it does not fire.
- fuzzing: are the marked tokens of this activating excerpt ones where the unit fires? Each positive
  excerpt is asked twice: with its firing tokens marked (yes), and with as many random non-firing tokens
  marked instead (no).

Scoring excerpts follow the simulator's rules (records.py): none is an excerpt the explainer saw, and an
excerpt never holds a window's position 0 (the SAE never sees it), so it is never marked.

A token fires where the unit's activation exceeds `fire_fraction` of its largest top activation: a TopK
latent is exactly 0 off its firing tokens, but an MLP neuron (GELU) is slightly positive almost
everywhere, and one rule must serve both for the comparison to mean anything.

Per unit and scorer: balanced accuracy and F1 of the answers (a scorer's score above its threshold is
yes) and AUC of the scores (pairwise, ties count 1/2); a metric with no positive or no negative question
is None and flagged, so a mean over units is never NaN.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sae.errors import UsageError

from ..missing import mean_or_none
from .explainers import Explanation
from .records import Excerpt, UnitRecords
from .scoring import N_TOP

FIRE_FRACTION = 0.1
"""A token fires where the unit's activation exceeds this fraction of its largest top activation."""

N_QUANTILES = 10
"""Quantile excerpts per unit for detection and fuzzing: one per activation decile."""

METHODS = ("simulation", "detection", "fuzzing")
"""The scoring methods `--scorers` chooses among."""

METRICS = ("balanced_accuracy", "f1", "auc")


@dataclass
class Question:
    """One yes/no question to a scorer, and its true answer."""

    tokens: list[str]
    label: bool
    """True: the unit fires in the excerpt (detection), the marks are its firing tokens (fuzzing)."""
    marks: list[bool] | None = None
    """Fuzzing only: which tokens are marked."""


def parse_methods(text: str) -> tuple[str, ...]:
    """The scoring methods named in `text` (comma-separated); a one-line UsageError for an unknown one."""
    methods = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown scoring methods {unknown or [text]}; choose from {list(METHODS)} (comma-separated)")
    return methods


def firing(excerpt: Excerpt, threshold: float) -> list[bool]:
    """Whether each token fires (activation above `threshold`, and above 0)."""
    return [value > max(threshold, 0.0) for value in excerpt.activations]


def fire_threshold(records: UnitRecords, fire_fraction: float = FIRE_FRACTION) -> float:
    """`fire_fraction` of the unit's largest activation on its top excerpts."""
    return fire_fraction * max((excerpt.max_activation for excerpt in records.top), default=0.0)


def activating_and_silent(records: UnitRecords, fire_fraction: float = FIRE_FRACTION) -> tuple[list[Excerpt], list[Excerpt]]:
    """The scoring excerpts where the unit fires (odd-rank top ones, quantile ones, random ones) and the
    random ones where it does not; none of them is an excerpt the explainer saw. A quantile excerpt with
    no token above the firing threshold (a weak one of a dense neuron) is neither."""
    threshold = fire_threshold(records, fire_fraction)
    candidates = records.scoring_top(N_TOP) + records.quantile + records.random
    activating = [excerpt for excerpt in candidates if any(firing(excerpt, threshold))]
    silent = [excerpt for excerpt in records.random if not any(firing(excerpt, threshold))]
    return activating, silent


def unit_rng(records: UnitRecords, seed: int) -> random.Random:
    """A generator of its own per unit, so one unit's questions do not depend on which others are scored."""
    return random.Random(f"{seed}:{records.kind}:{records.unit}")


def detection_questions(records: UnitRecords, fire_fraction: float = FIRE_FRACTION, seed: int = 0) -> list[Question]:
    """Activating excerpts (yes) and silent random ones (no), shuffled so that an LLM scorer's batches
    mix both."""
    activating, silent = activating_and_silent(records, fire_fraction)
    questions = [Question(e.tokens, True) for e in activating] + [Question(e.tokens, False) for e in silent]
    unit_rng(records, seed).shuffle(questions)
    return questions


def fuzzing_questions(records: UnitRecords, fire_fraction: float = FIRE_FRACTION, seed: int = 0) -> list[Question]:
    """Each activating excerpt with its firing tokens marked (yes) and with as many random non-firing tokens
    marked (no; fewer when it has fewer such tokens, none asked when it has none), shuffled."""
    threshold = fire_threshold(records, fire_fraction)
    rng = unit_rng(records, seed)
    questions = []
    for excerpt in activating_and_silent(records, fire_fraction)[0]:
        fires = firing(excerpt, threshold)
        questions.append(Question(excerpt.tokens, True, fires))
        quiet = [index for index, fired in enumerate(fires) if not fired]
        if quiet:
            chosen = set(rng.sample(quiet, min(sum(fires), len(quiet))))
            questions.append(Question(excerpt.tokens, False, [index in chosen for index in range(len(fires))]))
    rng.shuffle(questions)
    return questions


# ---- metrics ------------------------------------------------------------------------------------


def auc(labels: list[bool], scores: list[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counting 1/2; None without both classes."""
    positives = [score for label, score in zip(labels, scores, strict=True) if label]
    negatives = [score for label, score in zip(labels, scores) if not label]
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def classification_metrics(labels: list[bool], scores: list[float], threshold: float) -> dict:
    """Balanced accuracy and F1 of the answers (yes: score > threshold), AUC of the scores, the counts,
    and flags naming a missing class (its metrics are None)."""
    answers = [score > threshold for score in scores]
    pairs = list(zip(labels, answers, strict=True))
    true_pos = sum(label and answer for label, answer in pairs)
    false_pos = sum(answer and not label for label, answer in pairs)
    positives = sum(labels)
    negatives = len(labels) - positives
    true_neg = negatives - false_pos
    flags = [flag for flag, missing in (("no positives", positives == 0), ("no negatives", negatives == 0)) if missing]
    both = positives > 0 and negatives > 0
    return {
        "balanced_accuracy": (true_pos / positives + true_neg / negatives) / 2 if both else None,
        "f1": 2 * true_pos / (positives + true_pos + false_pos) if positives else None,
        "auc": auc(labels, scores),
        "positives": positives,
        "negatives": negatives,
        "flags": flags,
    }


# ---- scoring one unit -----------------------------------------------------------------------------


def detection_scores(records: UnitRecords, explanation: Explanation, scorer, fire_fraction: float = FIRE_FRACTION,
                     seed: int = 0) -> dict:
    """Detection metrics of one explanation of one unit under one scorer (eval/explain/classifiers.py)."""
    questions = detection_questions(records, fire_fraction, seed)
    scores = scorer.detect(explanation, [question.tokens for question in questions])
    return classification_metrics([question.label for question in questions], scores, scorer.detection_threshold)


def fuzzing_scores(records: UnitRecords, explanation: Explanation, scorer, fire_fraction: float = FIRE_FRACTION,
                   seed: int = 0) -> dict:
    """Fuzzing metrics of one explanation of one unit under one scorer."""
    questions = fuzzing_questions(records, fire_fraction, seed)
    scores = scorer.fuzz(explanation, [question.tokens for question in questions], [question.marks for question in questions])
    return classification_metrics([question.label for question in questions], scores, scorer.fuzzing_threshold)


SCORE_FUNCTIONS = {"detection": detection_scores, "fuzzing": fuzzing_scores}


def add_classification_scores(results: list[dict], records: list[UnitRecords], explanations: list[Explanation],
                              scorers: dict, methods: tuple[str, ...], order: list[int] | None, seed: int = 0) -> None:
    """Adds, per unit of `results` (one per record, in order), `detection` and `fuzzing` (those of `methods`)
    under every scorer, and with `order` (explain_and_score's derangement) the shuffled control
    `detection_shuffled` / `fuzzing_shuffled`: the unit's questions answered from `explanations[order[i]]`."""
    for method in (method for method in methods if method in SCORE_FUNCTIONS):
        score = SCORE_FUNCTIONS[method]
        for index, (result, record) in enumerate(zip(results, records, strict=True)):
            for name, scorer in scorers.items():
                result.setdefault(method, {})[name] = score(record, explanations[index], scorer, seed=seed)
                if order is not None:
                    shuffled = score(record, explanations[order[index]], scorer, seed=seed)
                    result.setdefault(f"{method}_shuffled", {})[name] = shuffled


# ---- summaries ----------------------------------------------------------------------------------------


def mean_and_ci95(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and 1.96 standard errors of it over units (None without values; the spread needs two)."""
    mean = mean_or_none(values)
    if len(values) < 2:
        return mean, None
    variance = math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, 1.96 * math.sqrt(variance / len(values))


def classification_means(entries: list[dict]) -> dict:
    """Per metric its mean over the units where it is defined and ±1.96 SE; the units, and those flagged."""
    means = {"units": len(entries), "flagged": sum(bool(entry["flags"]) for entry in entries)}
    for metric in METRICS:
        means[f"mean_{metric}"], means[f"ci95_{metric}"] = mean_and_ci95([e[metric] for e in entries if e[metric] is not None])
    return means


def summarize_classification(results: list[dict], method: str) -> dict:
    """{scorer: {"latents": means, "latents_shuffled": means, "neurons": ...}} of `method` over `results`."""
    summary: dict = {}
    for kind in dict.fromkeys(result["kind"] for result in results):
        of_kind = [result for result in results if result["kind"] == kind and method in result]
        for name in dict.fromkeys(name for result in of_kind for name in result[method]):
            summary.setdefault(name, {})[f"{kind}s"] = classification_means([r[method][name] for r in of_kind if name in r[method]])
            shuffled = [r[f"{method}_shuffled"][name] for r in of_kind if name in r.get(f"{method}_shuffled", {})]
            if shuffled:
                summary[name][f"{kind}s_shuffled"] = classification_means(shuffled)
    return summary
