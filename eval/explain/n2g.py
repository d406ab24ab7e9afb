"""N2G, "Neuron to Graph" (Foote et al. 2023): an explanation of a unit built from the LM itself, with
no explainer model, whose precision and recall can be measured (used so by Gao et al. 2024, §4.4).

Explaining. For each top excerpt the explainer may see (`UnitRecords.explanation_excerpts`), take the
token p where the unit is strongest, with activation a, and:

1. prune: find the shortest suffix tokens[s..p] of the excerpt that keeps the unit at >= 50% of a at p
   when the LM sees only that suffix. Each row is prefixed with a context token (the tokenizer's BOS, GPT-2's
   <|endoftext|>) so that the firing token is never at position 0, whose residual norm is huge and
   which the units never use (`records.sae_latent_activations`);
2. wildcards: replace each token of that suffix but the last, one at a time, by a padding token; where
   the unit stays >= 50% of a the token does not matter, and it becomes a wildcard `*`;
3. store the pattern (token strings and wildcards, ending at the firing token) in a trie keyed from
   the firing token backwards; the node where a pattern ends holds its activation a (the max over the
   patterns ending there). An excerpt whose every suffix stays under 50% of a (its activation needed the
   window's first token, which excerpts leave out) gives no pattern and is counted as unexplained.

Simulating. From each token of an excerpt, walk the trie backwards through the tokens before it; each
pattern that matches in full (a wildcard matches any one token) predicts its activation; the
prediction is the max of them, 0 when none matches. Matching is by token string, as excerpts hold them
(byte tokens that each decode to "\ufffd" read as one token). A leading wildcard means "some token
here": the unit needed that many tokens of context, whichever they are.

Scoring (Gao et al. §4.4). Precision and recall of predicted firing (prediction > 0) against true firing
(activation > 0: a TopK latent is exactly 0 outside its token's top k) over every token of the held-out
scoring excerpts: the top excerpts of odd rank, which the explainer never saw, and the random ones.
Per unit, then the mean over units; and a shuffled control, each unit scored with another unit's trie.
A unit with no predicted firing has precision 0, one with no true firing recall 0; both are flagged and
counted, so a mean is never NaN (as scoring.py does for correlations).

The LM work is batched: the rows of every excerpt of every unit go through `UnitActivations` calls of
a bounded number of tokens, right-padded (in a causal LM no position sees the ones after it), each row
read at its own last real token. The same code runs on SAE latents and on synthetic rules in tests.

Left out from Foote et al.: the augmentation step (a helper LM proposes similar tokens, and those that
keep the unit firing join the pattern); the patterns here come from the excerpts alone.

    section = n2g_section(model, tokenizer, sae, "transformer.h.2", windows, n_units=20)
    section["precision"], section["recall"], section["precision_shuffled"], section["recall_shuffled"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from sae.errors import UsageError
from sae.model import SparseAutoencoder

from ..missing import mean_or_none
from .explainers import Explanation
from .units import derangement, latent_records
from .records import TokenStrings, UnitActivations, UnitRecords, sae_latent_activations
from .scoring import N_TOP

THRESHOLD = 0.5
"""A suffix, or a token replaced by padding, keeps the unit firing when it keeps >= this fraction of a."""

WILDCARD = None
"""A pattern position that matches any one token."""

Pattern = tuple[str | None, ...]
"""Token strings (or WILDCARD) in text order, ending at the firing token, e.g. (" def", WILDCARD, "(")."""


# ---- the trie ----------------------------------------------------------------------------------


@dataclass
class TrieNode:
    children: dict = field(default_factory=dict)
    """Token string (or WILDCARD) of the position one further back -> its node."""

    activation: float | None = None
    """Where a pattern ends: the largest activation among the patterns ending here; None elsewhere."""


class PatternTrie:
    """Patterns keyed from the firing token backwards: the root's children are firing tokens."""

    def __init__(self):
        self.root = TrieNode()

    def add(self, pattern: Pattern, activation: float) -> None:
        if not pattern or pattern[-1] is WILDCARD:
            raise ValueError(f"a pattern ends at its firing token, not at a wildcard: {pattern}")
        node = self.root
        for token in reversed(pattern):
            node = node.children.setdefault(token, TrieNode())
        node.activation = activation if node.activation is None else max(node.activation, activation)

    def patterns(self) -> list[tuple[Pattern, float]]:
        """Every stored pattern with its activation, strongest first."""
        found = []

        def visit(node: TrieNode, backwards: tuple):
            if node.activation is not None:
                found.append((backwards[::-1], node.activation))
            for token, child in node.children.items():
                visit(child, backwards + (token,))

        visit(self.root, ())
        return sorted(found, key=lambda item: -item[1])  # stable: ties stay in insertion order

    def predict(self, tokens: list[str]) -> list[float]:
        """The predicted activation at each token: the max over the patterns that end there in full, else 0."""
        return [self._predict_at(tokens, end) for end in range(len(tokens))]

    def _predict_at(self, tokens: list[str], end: int) -> float:
        best = 0.0
        frontier = [self.root]  # nodes whose path matches tokens[position + 1 .. end]
        for position in range(end, -1, -1):
            frontier = [child for node in frontier
                        for child in (node.children.get(tokens[position]), node.children.get(WILDCARD)) if child is not None]
            for node in frontier:
                if node.activation is not None:  # a whole pattern matches tokens[position .. end]
                    best = max(best, node.activation)
            if not frontier:
                break
        return best


def pattern_text(pattern: Pattern) -> str:
    """`«def» * «(»`: each token in guillemets (its spaces kept, a newline shown as \\n), a wildcard as *."""
    return " ".join("*" if token is WILDCARD else "«" + token.replace("\n", "\\n") + "»" for token in pattern)


@dataclass
class N2GExplanation(Explanation):
    """An N2G explanation: its trie, and `text` listing the patterns, strongest first, separated by " | "."""

    trie: PatternTrie = field(default_factory=PatternTrie)

    unexplained_excerpts: int = 0
    """Explanation excerpts that gave no pattern (no suffix kept the unit at the threshold)."""

    @classmethod
    def from_trie(cls, trie: PatternTrie, unexplained_excerpts: int = 0) -> "N2GExplanation":
        patterns = trie.patterns()
        text = " | ".join(pattern_text(pattern) for pattern, _ in patterns) if patterns else "no pattern"
        return cls(text, trie=trie, unexplained_excerpts=unexplained_excerpts)


class N2GSimulator:
    """The trie's predictions: usable wherever the explain pipeline takes a simulator."""

    name = "n2g"

    def simulate(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        if not isinstance(explanation, N2GExplanation):
            raise ValueError(f"the n2g simulator needs an N2GExplanation (from N2GExplainer), got {type(explanation).__name__}")
        return [explanation.trie.predict(tokens) for tokens in excerpts]


# ---- the explainer -----------------------------------------------------------------------------


def context_and_pad_ids(tokenizer) -> tuple[int, int]:
    """(the token put before every row: BOS, else EOS; the padding token: PAD, else that same token)."""
    context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context is None:
        raise UsageError("N2G needs a BOS or EOS token to put before each suffix; the tokenizer has neither")
    return context, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else context


def last_token_activations(unit_activations: UnitActivations, rows: list[list[int]], columns: list[int],
                           pad_id: int, token_budget: int = 2048) -> list[float]:
    """Each row's activation of unit `columns[i]` at its own last token.

    Rows go through `unit_activations` shortest first, in batches of at most `token_budget` tokens (or
    one row), right-padded with `pad_id`; a causal LM's value at a token never depends on the padding
    after it. Every row needs 2 tokens or more (position 0 has no activation)."""
    order = sorted(range(len(rows)), key=lambda row: len(rows[row]))
    values = [0.0] * len(rows)
    batch: list[int] = []
    for row in order + [None]:  # None flushes the last batch
        if batch and (row is None or (len(batch) + 1) * len(rows[row]) > token_budget):
            width = len(rows[batch[-1]])
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for index, member in enumerate(batch):
                input_ids[index, : len(rows[member])] = torch.tensor(rows[member])
            activations = unit_activations(input_ids).float().cpu()  # (B, width - 1, U)
            last = torch.tensor([len(rows[member]) - 2 for member in batch])  # position n - 1 is output n - 2
            picked = activations[torch.arange(len(batch)), last, torch.tensor([columns[member] for member in batch])]
            for member, value in zip(batch, picked.tolist()):
                values[member] = value
            batch = []
        if row is not None:
            batch.append(row)
    return values


@dataclass(frozen=True)
class Firing:
    """The strongest token of one explanation excerpt."""

    record: int
    """Index of the unit's records in the list explained."""

    column: int
    """The unit's column in the UnitActivations output."""

    ids: list[int]
    """Token ids of the excerpt up to and including the firing token."""

    activation: float
    """The unit's activation there (a)."""


class N2GExplainer:
    """Patterns from the top excerpts of each unit, found by pruning and wildcarding (module docstring).

    `unit_activations` gives the units' activations in the order of `units`; `windows` (N, T) are the
    token windows the records were collected on (each excerpt names its window)."""

    name = "n2g"

    def __init__(self, unit_activations: UnitActivations, units: list[int], windows: Tensor,
                 token_strings: Callable[[list[int]], list[str]], context_id: int, pad_id: int,
                 threshold: float = THRESHOLD, n_excerpts: int = 5, token_budget: int = 2048):
        self.unit_activations = unit_activations
        self.columns = {unit: column for column, unit in enumerate(units)}
        self.windows = windows
        self.token_strings = token_strings
        self.context_id = context_id
        self.pad_id = pad_id
        self.threshold = threshold
        self.n_excerpts = n_excerpts
        self.token_budget = token_budget

    def explain(self, records: UnitRecords) -> N2GExplanation:
        return self.explain_many([records])[0]

    @torch.no_grad()
    def explain_many(self, records: list[UnitRecords]) -> list[N2GExplanation]:
        firings = self.firings(records)
        suffixes = self.shortest_suffixes(firings)
        wildcards = self.wildcards(firings, suffixes)
        tries = [PatternTrie() for _ in records]
        unexplained = [0] * len(records)
        for firing, suffix, wild in zip(firings, suffixes, wildcards):
            if suffix is None:
                unexplained[firing.record] += 1
                continue
            pattern = tuple(WILDCARD if is_wild else token for token, is_wild in zip(self.token_strings(suffix), wild))
            tries[firing.record].add(pattern, firing.activation)
        return [N2GExplanation.from_trie(trie, count) for trie, count in zip(tries, unexplained)]

    def firings(self, records: list[UnitRecords]) -> list[Firing]:
        """The strongest token of every explanation excerpt where the unit fires at all."""
        firings = []
        for index, record in enumerate(records):
            if record.unit not in self.columns:
                raise ValueError(f"unit {record.unit} is not among the activation function's units {list(self.columns)}")
            for excerpt in record.explanation_excerpts(self.n_excerpts):
                if excerpt.window is None:
                    raise ValueError(f"an excerpt of unit {record.unit} does not name its window; build records with collect_records")
                peak = max(range(len(excerpt.activations)), key=excerpt.activations.__getitem__)
                if excerpt.activations[peak] <= 0:
                    continue  # a top excerpt where the unit is silent: it fired in fewer windows than there are excerpts
                ids = self.windows[excerpt.window, 1 : peak + 2].tolist()  # excerpts start at the window's position 1
                if self.token_strings(ids) != excerpt.tokens[: peak + 1]:
                    raise ValueError(f"unit {record.unit}: window {excerpt.window} does not hold the excerpt's tokens; "
                                     "pass the windows the records were collected on")
                firings.append(Firing(index, self.columns[record.unit], ids, excerpt.activations[peak]))
        return firings

    def shortest_suffixes(self, firings: list[Firing]) -> list[list[int] | None]:
        """Per firing, the shortest suffix of its ids keeping >= threshold * a at the firing token (None: none does)."""
        rows, columns, owners = [], [], []
        for owner, firing in enumerate(firings):
            for start in range(len(firing.ids)):
                rows.append([self.context_id] + firing.ids[start:])
                columns.append(firing.column)
                owners.append((owner, start))
        values = last_token_activations(self.unit_activations, rows, columns, self.pad_id, self.token_budget)
        latest_start: list[int | None] = [None] * len(firings)  # the latest start is the shortest suffix
        for (owner, start), value in zip(owners, values):
            if value >= self.threshold * firings[owner].activation and (latest_start[owner] is None or start > latest_start[owner]):
                latest_start[owner] = start
        return [None if start is None else firing.ids[start:] for firing, start in zip(firings, latest_start)]

    def wildcards(self, firings: list[Firing], suffixes: list[list[int] | None]) -> list[list[bool]]:
        """Per suffix, whether each token may be replaced by padding keeping >= threshold * a (the last never is)."""
        rows, columns, owners = [], [], []
        for owner, (firing, suffix) in enumerate(zip(firings, suffixes)):
            for position in range(len(suffix or []) - 1):
                rows.append([self.context_id] + suffix[:position] + [self.pad_id] + suffix[position + 1 :])
                columns.append(firing.column)
                owners.append((owner, position))
        values = last_token_activations(self.unit_activations, rows, columns, self.pad_id, self.token_budget)
        wild = [[False] * len(suffix or []) for suffix in suffixes]
        for (owner, position), value in zip(owners, values):
            wild[owner][position] = value >= self.threshold * firings[owner].activation
        return wild


# ---- scoring -----------------------------------------------------------------------------------


def firing_precision_recall(true: list[list[float]], predicted: list[list[float]]) -> dict:
    """Precision and recall of predicted firing (> 0) against true firing (> 0) over all tokens together.

    No predicted firing: precision 0, flagged "no predicted firing"; no true firing: recall 0, flagged
    "no true firing"."""
    pairs = [(t > 0, p > 0) for true_row, predicted_row in zip(true, predicted, strict=True)
             for t, p in zip(true_row, predicted_row, strict=True)]
    both = sum(t and p for t, p in pairs)
    n_predicted = sum(p for _, p in pairs)
    n_true = sum(t for t, _ in pairs)
    flags = [flag for flag, missing in (("no predicted firing", n_predicted == 0), ("no true firing", n_true == 0)) if missing]
    return {
        "precision": both / n_predicted if n_predicted else 0.0,
        "recall": both / n_true if n_true else 0.0,
        "predicted_firing": n_predicted,
        "true_firing": n_true,
        "flags": flags,
    }


def score_n2g(explanation: N2GExplanation, records: UnitRecords) -> dict:
    """Precision and recall of one trie on one unit's scoring excerpts (odd-rank top ones and the random ones)."""
    excerpts = records.scoring_top(N_TOP) + records.random
    predicted = N2GSimulator().simulate(explanation, [excerpt.tokens for excerpt in excerpts])
    return firing_precision_recall([excerpt.activations for excerpt in excerpts], predicted)


def n2g_report(records: list[UnitRecords], explanations: list[N2GExplanation], seed: int = 0) -> dict:
    """Per-unit precision and recall, their means, and the shuffled control (each unit scored with the
    trie of unit `derangement(...)[i]`; None with fewer than 2 units). Means over no units are None."""
    order = derangement(len(records), seed)
    per_unit = []
    for index, (record, explanation) in enumerate(zip(records, explanations, strict=True)):
        entry = {"unit": record.unit, "patterns": explanation.text, "n_patterns": len(explanation.trie.patterns()),
                 "unexplained_excerpts": explanation.unexplained_excerpts, **score_n2g(explanation, record)}
        if len(records) > 1:
            entry["shuffled"] = {"trie_of": records[order[index]].unit, **score_n2g(explanations[order[index]], record)}
        per_unit.append(entry)
    shuffled = [entry["shuffled"] for entry in per_unit if "shuffled" in entry]
    return {
        "units": len(per_unit),
        "precision": mean_or_none(entry["precision"] for entry in per_unit),
        "recall": mean_or_none(entry["recall"] for entry in per_unit),
        "precision_shuffled": mean_or_none(entry["precision"] for entry in shuffled),
        "recall_shuffled": mean_or_none(entry["recall"] for entry in shuffled),
        "flagged_no_predicted_firing": sum("no predicted firing" in entry["flags"] for entry in per_unit),
        "flagged_no_true_firing": sum("no true firing" in entry["flags"] for entry in per_unit),
        "per_unit": per_unit,
    }


def n2g_section(model: nn.Module, tokenizer, sae: SparseAutoencoder, hookpoint: str, windows: Tensor, n_units: int,
                latents: list[int] | None = None, seed: int = 0, batch_windows: int = 32) -> dict:
    """The `n2g` section of an eval report: N2G explanations of `latents`, or of `n_units` random live
    latents (chosen as units.latent_records does), scored on held-out excerpts of `windows` (N, T).

    Keys: units, precision, recall, precision_shuffled, recall_shuffled, flagged_no_predicted_firing,
    flagged_no_true_firing, threshold, and per_unit (unit, patterns, n_patterns, unexplained_excerpts,
    precision, recall, predicted_firing, true_firing, flags, shuffled)."""
    records = latent_records(model, tokenizer, sae, hookpoint, windows, n_units, latents, seed, batch_windows)
    chosen = [record.unit for record in records]
    explanations = []
    if chosen:
        context_id, pad_id = context_and_pad_ids(tokenizer)
        explainer = N2GExplainer(sae_latent_activations(model, hookpoint, sae, chosen), chosen, windows,
                                 TokenStrings(tokenizer), context_id, pad_id, token_budget=batch_windows * windows.shape[1])
        explanations = explainer.explain_many(records)
    return {**n2g_report(records, explanations, seed), "threshold": THRESHOLD}
