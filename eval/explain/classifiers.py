"""Scorers for detection and fuzzing (eval/explain/detection.py; Paulo et al. 2024): an explanation and
excerpts in, a score per excerpt out (higher: more sure the answer is yes); yes is a score above the
scorer's threshold.

- `detect(explanation, excerpts)`: is this an excerpt where the unit fires?
- `fuzz(explanation, excerpts, marks)`: are the marked tokens ones where the unit fires?

Each offline scorer answers from its simulator's per-token predictions, so it judges an explanation the
way that simulator does:
- TokenLookupScorer: the tokens the explanation names in double quotes (TokenLookupSimulator's rule for
  written explanations; a token-lookup explanation quotes its top tokens);
- EmbeddingScorer: EmbeddingSimulator's similarity of each token to the explanation;
- N2GScorer: the N2G explanation's pattern predictions (its own explanations only);
- LLMScorer: a language model asked yes/no per excerpt (prompts.yes_no_prompt), one request per batch of
  excerpts, the score its probability of " yes" renormalised over " yes" and " no".
"""

from __future__ import annotations

from .explainers import Explanation
from .n2g import N2GSimulator
from .prompts import ANSWERS, yes_no_prompt
from .simulators import TokenLookupSimulator

EMBEDDING_THRESHOLD = 0.3
"""Cosine similarity above which the embedding scorer says an excerpt holds what the explanation
describes: near the median of the excerpts' largest similarities on the embedded default (0.28, both
classes alike), one value for every unit. Its balanced accuracy and F1 depend on that choice; its AUC,
which needs no threshold, is the number to read."""


def fraction_marked_predicted(predictions: list[float], marks: list[bool]) -> float:
    """The share of the marked tokens predicted to fire (prediction > 0); 0 when none is marked."""
    marked = [value for value, mark in zip(predictions, marks, strict=True) if mark]
    return sum(value > 0 for value in marked) / len(marked) if marked else 0.0


class PredictionScorer:
    """Detection and fuzzing from a simulator's per-token predictions where > 0 means "fires": an excerpt
    scores its largest prediction (yes: some token predicted to fire); a marked excerpt, the share of its
    marked tokens predicted to fire (yes: some)."""

    detection_threshold = 0.0
    fuzzing_threshold = 0.0

    def predict(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        raise NotImplementedError

    def detect(self, explanation: Explanation, excerpts: list[list[str]]) -> list[float]:
        return [max(row, default=0.0) for row in self.predict(explanation, excerpts)]

    def fuzz(self, explanation: Explanation, excerpts: list[list[str]], marks: list[list[bool]]) -> list[float]:
        return [fraction_marked_predicted(row, marked) for row, marked in zip(self.predict(explanation, excerpts), marks, strict=True)]


class TokenLookupScorer(PredictionScorer):
    """Is (some marked token) one the explanation names in double quotes?"""

    name = "token-lookup"

    def predict(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        # the written text alone, also for a token-lookup explanation: its table gives nearly every token
        # of the explanation excerpts some weight, its text only the tokens with the highest mean
        return TokenLookupSimulator().simulate(Explanation(explanation.text), excerpts)


class N2GScorer(PredictionScorer):
    """Does some N2G pattern of the explanation match at (some marked token of) the excerpt?"""

    name = "n2g"

    def predict(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        return N2GSimulator().simulate(explanation, excerpts)


class EmbeddingScorer:
    """EmbeddingSimulator's similarities: an excerpt scores its most similar token (yes: above
    EMBEDDING_THRESHOLD); a marked excerpt, how much more similar its marked tokens are than the others on
    average (yes: more), which needs no threshold of its own."""

    name = "embedding"
    detection_threshold = EMBEDDING_THRESHOLD
    fuzzing_threshold = 0.0

    def __init__(self, simulator):
        self.simulator = simulator

    def detect(self, explanation: Explanation, excerpts: list[list[str]]) -> list[float]:
        return [max(row, default=0.0) for row in self.simulator.simulate(explanation, excerpts)]

    def fuzz(self, explanation: Explanation, excerpts: list[list[str]], marks: list[list[bool]]) -> list[float]:
        scores = []
        for row, marked in zip(self.simulator.simulate(explanation, excerpts), marks, strict=True):
            inside = [value for value, mark in zip(row, marked, strict=True) if mark]
            outside = [value for value, mark in zip(row, marked) if not mark]
            scores.append(sum(inside) / len(inside) - sum(outside) / len(outside) if inside and outside else 0.0)
        return scores


class LLMScorer:
    """A language model's P(yes) per excerpt, `batch_size` excerpts per prompt (Paulo et al. show several
    at once); the batches go through the backend's `map` (concurrent requests on a server)."""

    detection_threshold = fuzzing_threshold = 0.5

    def __init__(self, backend, unit_name: str = "latent", batch_size: int = 10):
        self.backend = backend
        self.unit_name = unit_name
        self.batch_size = batch_size
        self.name = f"llm:{backend.name}"

    def detect(self, explanation: Explanation, excerpts: list[list[str]]) -> list[float]:
        return self._answers(explanation, excerpts, None)

    def fuzz(self, explanation: Explanation, excerpts: list[list[str]], marks: list[list[bool]]) -> list[float]:
        return self._answers(explanation, excerpts, marks)

    def _answers(self, explanation: Explanation, excerpts: list[list[str]], marks: list[list[bool]] | None) -> list[float]:
        starts = range(0, len(excerpts), self.batch_size)

        def one(start: int) -> list[float]:
            end = start + self.batch_size
            prompt, slots = yes_no_prompt(explanation.text, excerpts[start:end], None if marks is None else marks[start:end],
                                          self.unit_name)
            return [no_yes[1] for no_yes in self.backend.answer_distributions(prompt, slots, list(ANSWERS))]

        return [score for batch in self.backend.map(one, starts) for score in batch]


def scorers_for(simulators: dict) -> dict:
    """A scorer per simulator of `simulators` (by name: token-lookup, embedding, llm), sharing the
    embedding simulator's model and the LLM simulator's backend and unit name."""
    scorers = {}
    for name, simulator in simulators.items():
        if name == "token-lookup":
            scorers[name] = TokenLookupScorer()
        elif name == "embedding":
            scorers[name] = EmbeddingScorer(simulator)
        elif name == "llm":
            scorers[name] = LLMScorer(simulator.backend, simulator.unit_name)
    return scorers
