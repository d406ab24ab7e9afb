"""Explainers: a unit's top excerpts in, a short explanation out.

TokenLookupExplainer is Bills et al.'s LM-free baseline: the tokens with the highest mean activation
over the explanation excerpts; its Explanation carries that whole table, which the token-lookup
simulator uses. LLMExplainer writes a sentence with a language model (eval/explain/prompts.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .prompts import clean_explanation, explainer_prompt
from .records import UnitRecords


@dataclass
class Explanation:
    text: str
    """The explanation, completing "the main thing this unit does is find ..."."""

    token_values: dict[str, float] | None = None
    """Token-lookup explanations only: mean activation per token string."""


class TokenLookupExplainer:
    """The tokens with the highest mean activation (Bills et al.'s token-lookup baseline)."""

    name = "token-lookup"

    def __init__(self, n_excerpts: int = 5, n_listed: int = 5):
        self.n_excerpts = n_excerpts
        self.n_listed = n_listed

    def explain(self, records: UnitRecords) -> Explanation:
        sums, counts = defaultdict(float), defaultdict(int)
        for excerpt in records.explanation_excerpts(self.n_excerpts):
            for token, activation in zip(excerpt.tokens, excerpt.activations):
                sums[token] += max(activation, 0.0)
                counts[token] += 1
        table = {token: sums[token] / counts[token] for token in sums}
        shown = dict.fromkeys(token.strip() or token for token in sorted(table, key=table.get, reverse=True) if table[token] > 0)
        ranked = list(shown)[: self.n_listed]  # " base" and "base" read the same: listed once
        text = "the tokens " + ", ".join(f'"{token}"' for token in ranked) if ranked else "nothing"
        return Explanation(text, table)

    def explain_many(self, records: list[UnitRecords]) -> list[Explanation]:
        return [self.explain(record) for record in records]


class LLMExplainer:
    """One sentence from a language model shown the unit's top excerpts as (token, 0-10) lines."""

    def __init__(self, backend, unit_name: str = "latent", n_excerpts: int = 5, max_tokens: int = 48):
        self.backend = backend
        self.unit_name = unit_name
        self.n_excerpts = n_excerpts
        self.max_tokens = max_tokens
        self.name = f"llm:{backend.name}"

    def explain(self, records: UnitRecords) -> Explanation:
        prompt = explainer_prompt(records.explanation_excerpts(self.n_excerpts), self.unit_name)
        text = clean_explanation(self.backend.generate(prompt, max_tokens=self.max_tokens, stop=["\n"]))
        return Explanation(text)

    def explain_many(self, records: list[UnitRecords]) -> list[Explanation]:
        return self.backend.map(self.explain, records)
