"""Ground truth for the scorer: synthetic "latents" whose activations are known rules over held-out text.

Each puzzle has its true explanation and decoys: one over-general, one a list of tokens (the kind of
explanation a lazy explainer writes), one a near miss. A simulator is useful when the true explanation
outscores every decoy; `run_puzzles` reports how often that happens and by what margin, per simulator.
Rules see a window's token strings (as the tokenizer decodes them, leading spaces kept) and return one
activation per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .explainers import Explanation
from .records import TokenStrings, collect_records
from .scoring import score_unit

Rule = Callable[[list[str]], list[float]]


def _word(token: str) -> str:
    return token.strip().lower()


def _each(test: Callable[[str], bool]) -> Rule:
    return lambda tokens: [1.0 if test(token) else 0.0 for token in tokens]


def _after(test_previous: Callable[[str], bool], test: Callable[[str], bool] = lambda token: True) -> Rule:
    return lambda tokens: [0.0] + [1.0 if test_previous(prev) and test(token) else 0.0 for prev, token in zip(tokens, tokens[1:])]


def _inside_double_backquotes(tokens: list[str]) -> list[float]:
    activations, inside = [], False
    for token in tokens:
        opens_or_closes = token.count("``") % 2 == 1
        activations.append(1.0 if inside and not opens_or_closes else 0.0)
        inside ^= opens_or_closes
    return activations


def _word_length(tokens: list[str]) -> list[float]:
    return [float(len(_word(token))) if _word(token).isalpha() and len(_word(token)) > 3 else 0.0 for token in tokens]


def _is_digit_token(token: str) -> bool:
    return any(char.isdigit() for char in token)


@dataclass(frozen=True)
class Puzzle:
    name: str
    rule: Rule
    explanation: str
    decoys: tuple[str, ...]


PUZZLES = [
    Puzzle("the", _each(lambda t: t.strip() == "the"), 'the word "the" in lowercase',
           ("common short English words", 'the tokens "a", "an", "of"', 'the capitalized word "The" at the start of a sentence')),
    Puzzle("digits", _each(_is_digit_token), "numbers written with digits",
           ("symbols and punctuation", 'the tokens "one", "two", "three"', "names of months and days of the week")),
    Puzzle("close-paren", _each(lambda t: ")" in t), 'closing parentheses ")"',
           ("punctuation marks", 'the tokens ".", ",", ":"', 'opening parentheses "("')),
    Puzzle("after-the", _after(lambda p: _word(p) == "the"), 'the word right after "the", usually a noun',
           ("nouns", 'the tokens "function", "value", "object"', 'the word "the"')),
    Puzzle("word-length", _word_length, "long words, more strongly the longer the word",
           ("words", 'the tokens "the", "a", "of"', "short words of two or three letters")),
    Puzzle("capitalized", _each(lambda t: t.strip()[:1].isupper() and t.strip().isalpha()), "words that begin with a capital letter",
           ("words", 'the tokens "The", "If", "Return"', "words written in all lowercase letters")),
    Puzzle("comma", _each(lambda t: t.strip() == ","), 'commas ","',
           ("punctuation marks", 'the tokens "and", "or"', 'periods "." at the end of a sentence')),
    Puzzle("to-be", _each(lambda t: _word(t) in {"is", "are", "was", "were", "be", "been"}),
           'forms of the verb to be such as "is", "are", "was", "be"',
           ("verbs", 'the tokens "the", "a", "of"', 'forms of the verb to have such as "has", "have", "had"')),
    Puzzle("newline", _each(lambda t: "\n" in t), "line breaks between lines of text",
           ("whitespace", 'the tokens ".", ":"', "spaces between words")),
    Puzzle("backquoted", _inside_double_backquotes, "text inside double backquotes, code literals in reStructuredText",
           ("technical words", 'the tokens "``", "`"', "the backquote characters themselves")),
    Puzzle("period", _each(lambda t: t.strip() == "."), 'periods "." that end a sentence',
           ("punctuation marks", 'the tokens ",", ";"', "the first word of a sentence")),
    Puzzle("after-return", _after(lambda p: _word(p) in {"return", "returns", "returned"}),
           "the word right after return or returns, what a function gives back",
           ("nouns", 'the tokens "None", "True", "False"', 'the word "return" itself')),
    Puzzle("plural", _each(lambda t: _word(t).isalpha() and len(_word(t)) > 3 and _word(t).endswith("s") and not _word(t).endswith("ss")),
           'plural nouns ending in "s"', ("nouns", 'the tokens "is", "has", "was"', 'verbs in the past tense ending in "ed"')),
]


def puzzle_records(windows: Tensor, token_strings: TokenStrings, puzzles: list[Puzzle] = PUZZLES, seed: int = 0):
    """Records of the puzzles on `windows`, built like real latents' (eval/explain/records.py)."""

    def activations(input_ids: Tensor) -> Tensor:
        rows = []
        for window in input_ids:
            tokens = token_strings(window)
            rows.append([puzzle.rule(tokens)[1:] for puzzle in puzzles])  # position 0 dropped, as for latents
        return torch.tensor(rows).permute(0, 2, 1)  # (B, T - 1, n_puzzles)

    records = collect_records(windows, activations, list(range(len(puzzles))), token_strings, "puzzle", seed=seed)
    for record, puzzle in zip(records, puzzles):
        record.extra["name"] = puzzle.name
    return records


def run_puzzles(records, simulators: dict, puzzles: list[Puzzle] = PUZZLES) -> dict:
    """Per simulator: how often the true explanation scores highest (top-and-random), the mean margin
    over the best decoy, and every score."""
    report = {}
    for name, simulator in simulators.items():
        rows = []
        for record, puzzle in zip(records, puzzles):
            true = score_unit(simulator, Explanation(puzzle.explanation), record)["top_and_random"]
            decoys = [score_unit(simulator, Explanation(text), record)["top_and_random"] for text in puzzle.decoys]
            rows.append({"puzzle": puzzle.name, "true": true, "decoys": decoys, "margin": true - max(decoys),
                         "true_is_best": true > max(decoys)})
        report[name] = {
            "true_is_best": sum(row["true_is_best"] for row in rows) / len(rows),
            "mean_margin": sum(row["margin"] for row in rows) / len(rows),
            "mean_true_score": sum(row["true"] for row in rows) / len(rows),
            "puzzles": rows,
        }
    return report
