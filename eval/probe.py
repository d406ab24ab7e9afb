"""Probe loss (Gao et al. 2024, §4.2): how well a single latent predicts a known binary feature.

For each binary task (a 0/1 label per token), a 1-D logistic probe p_t = sigmoid(w z_it + b) is fitted
on every latent i separately, z_it being latent i's value at token t. The tokens are split in two
halves, alternate eval windows (`fit_half`): the probes are fitted on one, the latent whose probe fits
best there is chosen, and the task's score is that probe's binary cross-entropy on the other half, in
nats per token. Fitting and scoring on the same tokens would reward the best of thousands of latents
for fitting noise (on pure-noise labels it lands below the prior), and more so than the best of d_in
neurons. The report gives the score per task and the mean over tasks, next to two references, held
out the same way: the label prior (the constant predictor fitted on the fit half, what a latent that
never fires reaches) and the same probe on the hookpoint's own d_in coordinates ("neurons": the raw
activation directions), which an SAE's latents should beat. A transcoder's latents and neurons are those of
what it encodes, its module's input (records.encode_windows).

The fit: Newton's method on (w, b), vectorised over units (latents or neurons). With s = w z + b,
    loss = sum_t softplus(s_t) - y_t s_t           gradient  (sum r z, sum r),       r = sigmoid(s) - y
    Hessian = [[sum q z^2, sum q z], [sum q z, sum q]]                               q = sigmoid(s) (1 - sigmoid(s))
summed in float64. The sums come from a provider, the one loop never sees how:
- SparseSums (SAE latents): a latent is exactly 0 off its top k, so only its (token, value) entries
  carry its value; at the zero tokens s = b, and their share of every sum is a closed form in how many
  zero tokens there are and how many of them are positive. Memory and time scale with the entries
  (tokens x k), never with tokens x latents.
- DenseSums (neurons): the same sums over a dense (tokens, units) matrix, a chunk of units at a time.
Each step is damped by a backtracking line search (Armijo): a full Newton step from the start can
overshoot by orders of magnitude (rare labels, heavy-tailed units), and separable data (a latent equal
to the label, whose best w is infinite) walks towards loss 0 instead of diverging. A tiny ridge,
relative to each unit's scale, keeps the 2x2 solve defined when a unit is constant. The start (w = 0,
b = logit of the prior) has the prior entropy as its loss, and losses only go down from there: a
unit's loss is never above the baseline.

Tasks are per-token labels computed from the eval text itself (TASKS), so they run offline on any
corpus; a jsonl file adds the user's own (read_task_file). Labels come from the token strings of
each window (decoded one token at a time), with the window as their only context, as the LM sees it;
position 0 is never scored (the SAE never sees it) but is context for position 1. A task needs at
least `min_class_tokens` (default MIN_CLASS_TOKENS = 32) positive and as many negative tokens in each half;
otherwise it is listed under `skipped` with the counts, not averaged. User tasks are split the same
way, in blocks of ctx_len - 1 tokens of their texts laid end to end.

    from eval.probe import probe_section
    section = probe_section(model, tokenizer, sae, "transformer.h.2", windows)   # windows (n, ctx_len)
    section["mean_loss"], section["baseline_loss"], section["neuron_mean_loss"], section["tasks"]
"""

from __future__ import annotations

import json
import keyword
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from sae.errors import MissingFileError, UsageError
from sae.model import SparseAutoencoder

from .explain.records import TokenStrings, cat_codes, encode_windows
from .missing import mean_or_none

MIN_CLASS_TOKENS = 32
"""Fewest positive and fewest negative tokens a task needs to be scored."""

RIDGE = 1e-12
"""Added to the Hessian's diagonal, relative to each coordinate's scale (sum z^2 for w, the token count
for b): keeps the 2x2 solve defined for a unit constant over the tokens (its Hessian is singular)
without changing anything else, whatever the units' scale."""

ARMIJO = 1e-4
"""A step t d is taken when it lowers the loss by at least this fraction of the linear prediction, -t g.d."""

MIN_STEP = 1e-9
"""A unit whose line search has halved its step below this stops (no step of its Newton direction helps)."""

Labeler = Callable[[list[str]], list[int]]
"""Maps a window's token strings to one 0/1 label per token."""


# ---- tasks: labels from token strings -------------------------------------------------------------

STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as into than then so not no is are was were be "
    "been being has have had do does did it its this that these those there here which who whom what when "
    "where how all any each some such can could will would should may might must shall i you he she we they "
    "me him her us them my your his our their".split()
)
"""Common English function words (lower case); a token is one when its stripped, lower-cased text is."""

PYTHON_KEYWORDS = frozenset(keyword.kwlist)

_AFTER_DEF = re.compile(r"(?<![\w.])def[ \t]+(?=[A-Za-z_])")
"""`def` as a word, then spaces: the match ends where the function's name starts."""

_SENTENCE_START = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z])")
"""End of a sentence (closing quotes/brackets allowed), whitespace: the match ends at the next capital."""


def _token_starts(tokens: list[str]) -> list[int]:
    """Offset of each token in "".join(tokens)."""
    starts, offset = [], 0
    for token in tokens:
        starts.append(offset)
        offset += len(token)
    return starts


def _first_visible(tokens: list[str]) -> list[int | None]:
    """Offset in "".join(tokens) of each token's first non-whitespace character (None: all whitespace)."""
    return [start + len(token) - len(token.lstrip()) if token.strip() else None
            for token, start in zip(tokens, _token_starts(tokens))]


def _any_char_inside(tokens: list[str], inside: list[bool]) -> list[int]:
    """1 for each token with at least one character marked in `inside` (one flag per character of the text)."""
    return [int(any(inside[start : start + len(token)])) for token, start in zip(tokens, _token_starts(tokens))]


def _between_delimiters(text: str, delimiter: str) -> list[bool]:
    """Per character: inside a span opened and closed by `delimiter` (the delimiters themselves are not)."""
    inside, is_open, position = [False] * len(text), False, 0
    while (found := text.find(delimiter, position)) >= 0:
        if is_open:
            inside[position:found] = [True] * (found - position)
        is_open, position = not is_open, found + len(delimiter)
    if is_open:  # still open at the end of the window
        inside[position:] = [True] * (len(text) - position)
    return inside


def label_code_block(tokens: list[str]) -> list[int]:
    """Inside a ``` fenced block: a token with a character between an opening and a closing fence
    (the language tag after the opening fence counts, the fences do not). Fences are found in the
    joined text, so a fence split over several tokens is still one fence."""
    return _any_char_inside(tokens, _between_delimiters("".join(tokens), "```"))


def label_in_quotes(tokens: list[str]) -> list[int]:
    """Inside double quotes: a token with a character between an opening and a closing '"' (quote
    characters are not inside, so '"' and '""' are 0, '"a"' is 1). Quotes pair up in window order."""
    return _any_char_inside(tokens, _between_delimiters("".join(tokens), '"'))


def label_has_digit(tokens: list[str]) -> list[int]:
    """A token containing an ASCII digit."""
    return [int(any(char in "0123456789" for char in token)) for token in tokens]


def _first_visible_in(tokens: list[str], offsets: set[int]) -> list[int]:
    """1 for each token whose first non-whitespace character is at one of `offsets`."""
    return [int(start is not None and start in offsets) for start in _first_visible(tokens)]


def label_sentence_start(tokens: list[str]) -> list[int]:
    """First token of a sentence: it starts with a capital letter after '.', '!' or '?' and whitespace
    (the window's first token has nothing before it: 0)."""
    return _first_visible_in(tokens, {match.end() for match in _SENTENCE_START.finditer("".join(tokens))})


def label_after_def(tokens: list[str]) -> list[int]:
    """The token where a function's name starts after "def " (only the name's first token)."""
    return _first_visible_in(tokens, {match.end() for match in _AFTER_DEF.finditer("".join(tokens))})


def label_capitalised(tokens: list[str]) -> list[int]:
    """A token that starts a word (its first visible character follows no letter or digit) with a capital."""
    text = "".join(tokens)
    return [int(start is not None and text[start].isupper() and (start == 0 or not text[start - 1].isalnum()))
            for start in _first_visible(tokens)]


def label_python_keyword(tokens: list[str]) -> list[int]:
    """A token whose stripped text is a Python keyword (`keyword.kwlist`, case-sensitive)."""
    return [int(token.strip() in PYTHON_KEYWORDS) for token in tokens]


def label_stop_word(tokens: list[str]) -> list[int]:
    """A token whose stripped, lower-cased text is in STOP_WORDS."""
    return [int(token.strip().lower() in STOP_WORDS) for token in tokens]


def label_doctest(tokens: list[str]) -> list[int]:
    """On a doctest line: a token with a character of a line that starts, after indentation, with
    '>>>', from the '>>>' to the end of the line (the indentation and the newline are not on it)."""
    text = "".join(tokens)
    inside = [False] * len(text)
    line_start = 0
    for line in text.split("\n"):
        code = line.lstrip()
        if code.startswith(">>>"):
            inside[line_start + len(line) - len(code) : line_start + len(line)] = [True] * len(code)
        line_start += len(line) + 1
    return _any_char_inside(tokens, inside)


TASKS: dict[str, Labeler] = {
    "code_block": label_code_block,
    "in_double_quotes": label_in_quotes,
    "has_digit": label_has_digit,
    "sentence_start": label_sentence_start,
    "python_keyword": label_python_keyword,
    "stop_word": label_stop_word,
    "after_def": label_after_def,
    "capitalised": label_capitalised,
    "doctest": label_doctest,
}
"""The built-in tasks, by report name."""


class TextLabels(NamedTuple):
    """One text of a user task: its token ids and their labels (the same length)."""

    ids: list[int]
    labels: list[int]


def read_task_file(path: str | Path, tokenizer) -> dict[str, list[TextLabels]]:
    """User tasks from a jsonl file: one {"task": name, "text": str, "labels": [0/1 per token]} per line,
    the labels one per token of `tokenizer(text)` (no special tokens added). Lines with the same task
    name add texts to one task. Blank lines are skipped; anything else wrong is a UsageError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"probe tasks file {path} does not exist")
    tasks: dict[str, list[TextLabels]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{where} is not JSON ({error.msg})") from None
        if not isinstance(entry, dict) or set(entry) != {"task", "text", "labels"}:
            raise UsageError(f'{where} must be an object with exactly the keys "task", "text", "labels"')
        name, text, labels = entry["task"], entry["text"], entry["labels"]
        if not isinstance(name, str) or not name:
            raise UsageError(f'{where}: "task" must be a non-empty string')
        if name in TASKS:
            raise UsageError(f"{where}: task '{name}' is a built-in task's name; choose another")
        if not isinstance(text, str) or not text:
            raise UsageError(f'{where}: "text" must be a non-empty string')
        if not isinstance(labels, list) or any(type(label) is not int or label not in (0, 1) for label in labels):
            raise UsageError(f'{where}: "labels" must be a list of 0/1 integers')
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(labels) != len(ids):
            raise UsageError(f"{where}: {len(labels)} labels for a text of {len(ids)} tokens")
        if len(ids) < 2:
            raise UsageError(f"{where}: the text is one token; probes score positions 1 onwards (position 0 is context)")
        tasks.setdefault(name, []).append(TextLabels(ids, labels))
    return tasks


# ---- Newton sums: sparse (SAE latents) and dense (neurons) ------------------------------------------

class ProbeSums(NamedTuple):
    """Sums over tokens of the logistic loss and its derivatives, per unit: each (n_units_asked,) float64."""

    loss: Tensor
    grad_w: Tensor
    grad_b: Tensor
    h_ww: Tensor
    h_wb: Tensor
    h_bb: Tensor


class SumsProvider(Protocol):
    """What the Newton loop needs to know of the data."""

    n_units: int
    n_tokens: int
    positives: float
    sum_squares: Tensor
    """(n_units,) float64: sum over tokens of z^2, per unit (0: the unit is 0 on every token)."""
    device: torch.device

    def __call__(self, weight: Tensor, bias: Tensor, units: Tensor) -> ProbeSums:
        """Sums for `units` (U,) int64 at their probes weight (U,), bias (U,)."""


def softplus(s: Tensor) -> Tensor:
    """log(1 + e^s), exact for large |s| (neither overflows nor rounds to 0)."""
    return s.clamp_min(0) + torch.log1p(torch.exp(-s.abs()))


def logistic_terms(s: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element: (loss, r, q) of a logit s against label y; see the module docstring."""
    p = torch.sigmoid(s)
    return softplus(s) - y * s, p - y, p * (1 - p)


class SparseSums:
    """Sums for SAE latents from their active (token, latent, value) entries, plus the closed form of
    the tokens where a latent is 0 (s = b there: count x per-token term)."""

    def __init__(self, tokens: Tensor, latents: Tensor, values: Tensor, labels: Tensor, n_units: int):
        """tokens, latents, values: (E,) entries (int64, int64, float); labels (N,) 0/1; each (token,
        latent) at most once. Entries with value 0 are dropped (the latent did not fire)."""
        fired = values != 0
        labels = labels.double()
        self.latents = latents[fired]
        self.values = values[fired].double()
        self.entry_labels = labels[tokens[fired]]
        self.n_units = n_units
        self.n_tokens = len(labels)
        self.positives = float(labels.sum())
        self.device = labels.device
        self.fired = torch.bincount(self.latents, minlength=n_units).double()
        self.fired_positives = torch.bincount(self.latents, weights=self.entry_labels, minlength=n_units)
        self.sum_squares = torch.bincount(self.latents, weights=self.values.square(), minlength=n_units)

    @classmethod
    def from_codes(cls, values: Tensor, indices: Tensor, labels: Tensor, n_units: int) -> "SparseSums":
        """From `sae.encode` output: values, indices (N, k); labels (N,)."""
        tokens = torch.arange(len(values), device=values.device).repeat_interleave(values.shape[1])
        return cls(tokens, indices.flatten(), values.flatten(), labels, n_units)

    def __call__(self, weight: Tensor, bias: Tensor, units: Tensor) -> ProbeSums:
        position = torch.full((self.n_units,), -1, dtype=torch.long, device=self.device)
        position[units] = torch.arange(len(units), device=self.device)
        entry_unit = position[self.latents]
        asked = entry_unit >= 0
        unit, z, y = entry_unit[asked], self.values[asked], self.entry_labels[asked]
        loss, r, q = logistic_terms(weight[unit] * z + bias[unit], y)

        def total(per_entry: Tensor) -> Tensor:
            return torch.zeros(len(units), dtype=torch.float64, device=self.device).index_add_(0, unit, per_entry)

        silent = self.n_tokens - self.fired[units]  # tokens where the unit is 0
        silent_positives = self.positives - self.fired_positives[units]
        p = torch.sigmoid(bias)
        silent_loss = silent_positives * softplus(-bias) + (silent - silent_positives) * softplus(bias)
        return ProbeSums(
            loss=total(loss) + silent_loss,
            grad_w=total(r * z),
            grad_b=total(r) + silent * p - silent_positives,
            h_ww=total(q * z * z),
            h_wb=total(q * z),
            h_bb=total(q) + silent * p * (1 - p),
        )


class DenseSums:
    """Sums over a dense feature matrix, `chunk_elements` float64 elements (units x tokens) at a time."""

    def __init__(self, features: Tensor, labels: Tensor, chunk_elements: int = 2**22):
        """features (N, U); labels (N,) 0/1. `features.T` is read by rows: pass the transpose of a
        contiguous (U, N) tensor to avoid strided reads."""
        self.columns = features.T  # (U, N)
        self.labels = labels.double()
        self.n_units = features.shape[1]
        self.n_tokens = len(labels)
        self.positives = float(self.labels.sum())
        self.device = labels.device
        self.chunk_units = max(1, chunk_elements // max(1, self.n_tokens))
        self.sum_squares = torch.cat([self.columns[first : first + self.chunk_units].double().square().sum(1)
                                      for first in range(0, self.n_units, self.chunk_units)])

    def __call__(self, weight: Tensor, bias: Tensor, units: Tensor) -> ProbeSums:
        parts = []
        for first in range(0, len(units), self.chunk_units):
            chunk = slice(first, first + self.chunk_units)
            z = self.columns.index_select(0, units[chunk]).double()  # (c, N)
            loss, r, q = logistic_terms(weight[chunk, None] * z + bias[chunk, None], self.labels)
            parts.append(ProbeSums(loss.sum(1), (r * z).sum(1), r.sum(1), (q * z * z).sum(1), (q * z).sum(1), q.sum(1)))
        return ProbeSums(*(torch.cat(field) for field in zip(*parts)))


# ---- the Newton loop --------------------------------------------------------------------------------

class ProbeFit(NamedTuple):
    """Each unit's fitted probe: loss (mean cross-entropy, nats per token), weight and bias; each (U,) float64."""

    loss: Tensor
    weight: Tensor
    bias: Tensor


def _newton_direction(sums: ProbeSums, ridge_w: Tensor, ridge_b: float) -> tuple[Tensor, Tensor]:
    """-(H + diag(ridge_w, ridge_b))^-1 g per unit, the 2x2 system solved in closed form."""
    a, c, d = sums.h_ww + ridge_w, sums.h_wb, sums.h_bb + ridge_b
    # det >= ridge_w ridge_b > 0 as H is positive semi-definite; the floor guards against rounding
    det = (a * d - c * c).clamp_min(ridge_w * ridge_b)
    return -(d * sums.grad_w - c * sums.grad_b) / det, -(a * sums.grad_b - c * sums.grad_w) / det


def best_probe_losses(sums: SumsProvider, max_iter: int = 100, tol: float = 1e-10) -> ProbeFit:
    """Fit sigmoid(w z + b) to the labels on every unit separately (damped Newton); each unit's best probe.

    A unit stops when Newton's predicted loss decrease (half the squared Newton decrement, Boyd &
    Vandenberghe §9.5.1) is under `tol` nats per token, when its line search finds no step, or after
    `max_iter` iterations. Units still iterating are the only ones the provider computes for; a unit
    that is 0 on every token (a dead latent) keeps its start, the best constant predictor.
    """
    n, positives = sums.n_tokens, sums.positives
    if not 0 < positives < n:
        raise ValueError(f"a probe needs both classes; the labels have {positives:g} positives of {n} tokens")
    device = sums.device
    weight = torch.zeros(sums.n_units, dtype=torch.float64, device=device)
    bias = torch.full_like(weight, math.log(positives / (n - positives)))  # the prior: loss = its entropy
    step = torch.ones_like(weight)
    current = sums(weight, bias, torch.arange(sums.n_units, device=device))  # at each unit's current probe
    active = (sums.sum_squares > 0).nonzero().squeeze(1)
    for _ in range(max_iter):
        here = ProbeSums(*(field[active] for field in current))
        d_w, d_b = _newton_direction(here, RIDGE * sums.sum_squares[active], RIDGE * n)
        decrease = -(here.grad_w * d_w + here.grad_b * d_b)  # Newton's model predicts loss - decrease / 2
        going = (decrease / 2 > tol * n) & (step[active] > MIN_STEP)
        active, d_w, d_b, decrease = active[going], d_w[going], d_b[going], decrease[going]
        if len(active) == 0:
            break
        t = step[active]
        trial_w, trial_b = weight[active] + t * d_w, bias[active] + t * d_b
        trial = sums(trial_w, trial_b, active)
        accept = trial.loss <= current.loss[active] - ARMIJO * t * decrease
        moved = active[accept]
        weight[moved], bias[moved] = trial_w[accept], trial_b[accept]
        for field, trial_field in zip(current, trial):
            field[moved] = trial_field[accept]
        step[active] = torch.where(accept, 1.0, t / 2)
    return ProbeFit(current.loss / n, weight, bias)


def prior_entropy(positives: float, tokens: int) -> float:
    """Binary entropy (nats) of the label prior: the loss of the best constant predictor."""
    p = positives / tokens
    return -sum(x * math.log(x) for x in (p, 1 - p) if x > 0)


# ---- the report section -----------------------------------------------------------------------------

class Features(NamedTuple):
    """What the probes see of a set of tokens (positions >= 1 of each text)."""

    values: Tensor
    """(N, k) SAE latent values."""
    indices: Tensor
    """(N, k) int64 SAE latent ids."""
    neurons: Tensor
    """(d_in, N) float32 activations the SAE encodes (the hookpoint's output; a transcoder's: its module's
    input), transposed, so units are rows."""


def _features(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, batches: list[Tensor]) -> Features:
    """Run the LM to `hookpoint` and the SAE on what it encodes, for each batch of token ids (B, T);
    positions 0 dropped."""
    values, indices, neurons = [], [], []
    for input_ids in batches:
        codes = encode_windows(model, hookpoint, sae, input_ids)
        values.append(codes.values)
        indices.append(codes.indices)
        neurons.append(codes.hidden.flatten(0, 1).float().T)
    return Features(*cat_codes(values, indices), torch.cat(neurons, 1))


def _window_labels(windows: Tensor, tokenizer) -> dict[str, Tensor]:
    """Per built-in task, (n_windows * (T - 1),) labels of positions >= 1, window after window."""
    token_strings = TokenStrings(tokenizer)
    labels: dict[str, list[int]] = {name: [] for name in TASKS}
    for window in windows:
        tokens = token_strings(window)
        for name, labeler in TASKS.items():
            labels[name].extend(labeler(tokens)[1:])  # position 0 is context only
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in labels.items()}


class ProbeTask(NamedTuple):
    """A task's scored positions (N of them, positions >= 1 of each window or text, in order)."""

    labels: Tensor
    """(N,) float64 0/1."""
    token_ids: Tensor
    """(N,) int64: the token at each position (what token hygiene reads)."""
    features: Features


def _user_tasks(user_texts: dict[str, list[TextLabels]], model: nn.Module, hookpoint: str,
                sae: SparseAutoencoder) -> dict[str, ProbeTask]:
    """Per user task, its labels and features: each text truncated to the model's context, position 0 dropped."""
    config = getattr(model, "config", None)
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    tasks = {}
    for name, texts in user_texts.items():
        texts = [TextLabels(text.ids[:context], text.labels[:context]) for text in texts]
        labels = torch.tensor([label for text in texts for label in text.labels[1:]], dtype=torch.float64)
        token_ids = torch.tensor([token for text in texts for token in text.ids[1:]], dtype=torch.long)
        tasks[name] = ProbeTask(labels, token_ids,
                                _features(model, hookpoint, sae, [torch.tensor([text.ids]) for text in texts]))
    return tasks


def fit_half(n_tokens: int, block: int) -> Tensor:
    """(n_tokens,) bool: the tokens probes are fitted on, blocks 0, 2, 4, ... of `block` consecutive
    tokens (one eval window each); the other blocks are the held-out half the losses are measured on."""
    return torch.arange(n_tokens) // block % 2 == 0


def too_few_reason(labels: Tensor, fit: Tensor, min_class_tokens: int) -> str | None:
    """Why a task of `labels` (N,) 0/1 split by `fit` (N,) bool cannot be scored: fewer than
    `min_class_tokens` (at least 1) positive or negative tokens in either half; None when it can."""
    tokens, positives = len(labels), int(labels.sum())
    counts = [(int(labels[half].sum()), int((1 - labels[half]).sum())) for half in (fit, ~fit)]
    if min(count for half in counts for count in half) >= max(min_class_tokens, 1):
        return None
    (fit_pos, fit_neg), (held_pos, held_neg) = counts
    return (f"{positives} positive and {tokens - positives} negative tokens of {tokens} ({fit_pos} and {fit_neg} "
            f"in the fit half, {held_pos} and {held_neg} in the held-out half); needs at least "
            f"{min_class_tokens} of each in each half")


def held_out_prior_loss(fit_labels: Tensor, scored_labels: Tensor) -> float:
    """Mean cross-entropy (nats) on `scored_labels` of the constant predictor fitted on `fit_labels`:
    what a latent that never fires reaches."""
    p = float(fit_labels.mean())
    positives = float(scored_labels.sum())
    return -(positives * math.log(p) + (len(scored_labels) - positives) * math.log(1 - p)) / len(scored_labels)


def held_out_best(sums_on: Callable[[Tensor], SumsProvider], fit: Tensor) -> tuple[float, int]:
    """(its mean loss on the held-out tokens, unit) of the unit whose probe fits the `fit` tokens (N,)
    bool best; `sums_on(rows)` gives the sums over the tokens `rows` (N,) bool."""
    fitted = best_probe_losses(sums_on(fit))
    unit = fitted.loss.argmin().reshape(1)
    held_out = sums_on(~fit)
    return float(held_out(fitted.weight[unit], fitted.bias[unit], unit).loss[0]) / held_out.n_tokens, int(unit)


def _score_task(labels: Tensor, features: Features, n_latents: int, min_class_tokens: int, block: int) -> dict | str:
    """A task's entry of the report, or why it is skipped. Each unit's probe is fitted on one half of
    the tokens (`fit_half`); the best unit there is scored on the other half, so that neither the probe
    nor the choice among thousands of latents (against d_in neurons) fits the tokens it is scored on."""
    fit = fit_half(len(labels), block)
    tokens, positives = len(labels), int(labels.sum())
    if (reason := too_few_reason(labels, fit, min_class_tokens)) is not None:
        return reason
    device = features.values.device
    labels, fit = labels.to(device), fit.to(device)
    latent_loss, best_latent = held_out_best(
        lambda rows: SparseSums.from_codes(features.values[rows], features.indices[rows], labels[rows], n_latents), fit)
    neuron_loss, best_neuron = held_out_best(lambda rows: DenseSums(features.neurons[:, rows].T, labels[rows]), fit)
    return {
        "positives": positives, "tokens": tokens, "held_out_tokens": int((~fit).sum()),
        "baseline_loss": held_out_prior_loss(labels[fit], labels[~fit]),
        "loss": latent_loss, "best_latent": best_latent, "neuron_loss": neuron_loss, "best_neuron": best_neuron,
    }


def probe_tasks(
    model: nn.Module,
    tokenizer,
    sae: SparseAutoencoder,
    hookpoint: str,
    windows: Tensor,
    batch_windows: int = 16,
    tasks_file: str | Path | None = None,
    max_tokens: int | None = None,
) -> dict[str, ProbeTask]:
    """Every task's labels, token ids and features: the built-in tasks (TASKS) on `windows` (n_windows,
    ctx_len), positions >= 1, the first `max_tokens` of them when given; the user tasks of `tasks_file`
    (read_task_file) on their own texts. What `probe_section` and eval/sparse_probe.py score."""
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n_windows >= 1, ctx_len >= 2), got shape {tuple(windows.shape)}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    user_texts = read_task_file(tasks_file, tokenizer) if tasks_file is not None else {}  # its errors first
    if max_tokens is not None:
        windows = windows[: math.ceil(max_tokens / (windows.shape[1] - 1))]
    batches = [windows[first : first + batch_windows] for first in range(0, len(windows), batch_windows)]
    features = _features(model, hookpoint, sae, batches)
    n = len(features.values)
    if max_tokens is not None and max_tokens < n:  # the last window only in part
        n = max_tokens
        features = Features(features.values[:n], features.indices[:n], features.neurons[:, :n].contiguous())
    token_ids = windows[:, 1:].flatten()[:n].long()
    tasks = {name: ProbeTask(labels[:n], token_ids, features)
             for name, labels in _window_labels(windows, tokenizer).items()}
    tasks.update(_user_tasks(user_texts, model, hookpoint, sae))
    return tasks


def probe_section(
    model: nn.Module,
    tokenizer,
    sae: SparseAutoencoder,
    hookpoint: str,
    windows: Tensor,
    batch_windows: int = 16,
    tasks_file: str | Path | None = None,
    max_tokens: int | None = None,
    min_class_tokens: int = MIN_CLASS_TOKENS,
) -> dict:
    """The report's `probe` section for an SAE on `windows` (n_windows, ctx_len) of held-out text.

    Keys: mean_loss (mean over scored tasks of the best latent's held-out loss), baseline_loss (mean
    held-out loss of the label prior), neuron_mean_loss (the same probe on the hookpoint's d_in
    coordinates), tasks {name: {positives, tokens, held_out_tokens, baseline_loss, loss, best_latent,
    neuron_loss, best_neuron}}, skipped {name: reason}. Losses are mean cross-entropies in nats per
    held-out token (module docstring); means are None when every task is skipped. `max_tokens` caps the
    eval tokens (positions >= 1, the first windows first); `tasks_file` adds user tasks (read_task_file),
    scored on their own texts.
    """
    tasks = probe_tasks(model, tokenizer, sae, hookpoint, windows, batch_windows, tasks_file, max_tokens)
    scored, skipped = {}, {}
    for name, task in tasks.items():
        result = _score_task(task.labels, task.features, sae.cfg.n_latents, min_class_tokens, block=windows.shape[1] - 1)
        (skipped if isinstance(result, str) else scored)[name] = result
    return {
        "mean_loss": mean_or_none(task["loss"] for task in scored.values()),
        "baseline_loss": mean_or_none(task["baseline_loss"] for task in scored.values()),
        "neuron_mean_loss": mean_or_none(task["neuron_loss"] for task in scored.values()),
        "tasks": scored,
        "skipped": skipped,
    }
