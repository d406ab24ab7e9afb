"""Prompts of the LLM explainer and the all-at-once LLM simulator, after Bills et al. 2023.

Both show text one token per line as `token<TAB>value`, with activations scaled to integers 0-10
(the unit's maximum over the shown excerpts -> 10, negative values -> 0). Tokens holding a tab or a
newline are escaped (\\t, \\n) so each token stays on its own line. The wording and the few-shot
examples are this project's own.
"""

from __future__ import annotations

import re

from .records import Excerpt

UNKNOWN = "unknown"
"""Placeholder the simulator prompt puts where each activation goes; its offset is a "slot"."""

_EXPLAIN_INTRO = (
    "Each block below is a short stretch of text, one token per line. After the tab is a number from 0 "
    "to 10: how strongly one {unit} of a neural network responds to that token (0 = not at all, 10 = its "
    "strongest response). Read where the numbers are high, then finish the sentence about the {unit} in "
    "a few words. Describe the pattern, do not just list tokens.\n\n"
)

_SIMULATE_INTRO = (
    "Each block below is a short stretch of text, one token per line, and a description of one {unit} of "
    "a neural network. After each token's tab goes a number from 0 to 10: how strongly the {unit} responds "
    "to that token, following its description (0 = not at all, 10 = its strongest response; most tokens "
    "are 0).\n\n"
)

# Few-shot examples: (explanation, [(token, value 0-10), ...]).
_EXAMPLES = [
    (
        "years written as four digits",
        [("The", 0), (" treaty", 0), (" was", 0), (" signed", 0), (" in", 0), (" 17", 9), ("83", 10),
         (" and", 0), (" revised", 0), (" in", 0), (" 19", 8), ("02", 9), (".", 0)],
    ),
    (
        "the word after 'return' in descriptions of what a function gives back",
        [("This", 0), (" method", 0), (" will", 0), (" return", 1), (" the", 6), (" number", 3), (" of", 0),
         (" bytes", 0), (";", 0), (" it", 0), (" may", 0), (" return", 1), (" None", 10), (".", 0)],
    ),
]


def escape(token: str) -> str:
    """One line per token: a tab or newline inside a token is written as \\t or \\n."""
    return token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def scale_to_digits(activations: list[float], max_activation: float) -> list[int]:
    """Raw activations -> integers 0-10: negative -> 0, `max_activation` -> 10."""
    if max_activation <= 0:
        return [0] * len(activations)
    return [min(10, max(0, round(10 * value / max_activation))) for value in activations]


def _block(pairs: list[tuple[str, int]]) -> str:
    return "<start>\n" + "".join(f"{escape(token)}\t{value}\n" for token, value in pairs) + "<end>\n"


def _explain_record(pairs: list[tuple[str, int]]) -> str:
    text = _block(pairs)
    non_zero = [(token, value) for token, value in pairs if value > 0]
    if pairs and len(non_zero) < 0.2 * len(pairs):  # sparse: restate the lines that matter
        text += "The same block, only the tokens with non-zero values:\n" + "".join(
            f"{escape(token)}\t{value}\n" for token, value in non_zero) + "\n"
    return text


def explainer_prompt(excerpts: list[Excerpt], unit: str = "latent") -> str:
    """Few-shot prompt whose continuation is the explanation (ends with "... this {unit} does is find")."""
    max_activation = max((excerpt.max_activation for excerpt in excerpts), default=0.0)
    parts = [_EXPLAIN_INTRO.format(unit=unit)]
    for number, (explanation, pairs) in enumerate(_EXAMPLES, start=1):
        parts.append(f"{unit.capitalize()} {number}\n{_explain_record(pairs)}")
        parts.append(f"Explanation of {unit} {number}: the main thing this {unit} does is find {explanation}.\n\n")
    number = len(_EXAMPLES) + 1
    parts.append(f"{unit.capitalize()} {number}\n")
    for excerpt in excerpts:
        parts.append(_explain_record(list(zip(excerpt.tokens, scale_to_digits(excerpt.activations, max_activation)))))
    parts.append(f"Explanation of {unit} {number}: the main thing this {unit} does is find")
    return "".join(parts)


_ECHOED_LEAD = re.compile(r"^(explanation of \w+ \d+:\s*)?(the main thing this \w+ does is find)\s*", re.IGNORECASE)


def clean_explanation(completion: str) -> str:
    """The first line of a completion, without surrounding spaces, a final period, or the lead-in
    ("the main thing this latent does is find") that chat models tend to repeat."""
    line = _ECHOED_LEAD.sub("", completion.strip().split("\n")[0].strip())
    return line[:-1].strip() if line.endswith(".") else line


def simulator_prompt(explanation: str, tokens: list[str], unit: str = "latent") -> tuple[str, list[int]]:
    """All-at-once prompt for one excerpt, and the character offset of each token's slot.

    Every value is written as "unknown"; reading the model's next-token probabilities of "0".."10"
    right before each "unknown" gives all the predictions from one forward pass.
    """
    parts = [_SIMULATE_INTRO.format(unit=unit)]
    for number, (example_explanation, pairs) in enumerate(_EXAMPLES, start=1):
        parts.append(f"{unit.capitalize()} {number}: the main thing this {unit} does is find {example_explanation}.\n")
        parts.append(_block(pairs) + "\n")
    number = len(_EXAMPLES) + 1
    parts.append(f"{unit.capitalize()} {number}: the main thing this {unit} does is find {explanation}.\n<start>\n")
    prompt = "".join(parts)
    slots = []
    for token in tokens:
        prompt += f"{escape(token)}\t"
        slots.append(len(prompt))
        prompt += f"{UNKNOWN}\n"
    return prompt + "<end>\n", slots


# ---- detection and fuzzing (Paulo et al. 2024; eval/explain/detection.py) ------------------------------

ANSWERS = (" no", " yes")
"""The answers a detection or fuzzing prompt reads at each slot, index 1 = yes."""

MARK_OPEN, MARK_CLOSE = "<<", ">>"
"""Around each marked token of a fuzzing excerpt (delphi's delimiters)."""

_DETECT_INTRO = (
    "Below are a description of one {unit} of a neural network and numbered stretches of text. After each "
    "stretch, answer yes if the {unit} responds to some token of it, following its description, else no.\n\n"
    "Description: the main thing this {unit} does is find years written as four digits.\n"
    "Text 1: The treaty was signed in 1783 and revised later.\nAnswer: yes\n"
    "Text 2: She closed the window because of the rain.\nAnswer: no\n\n"
)

_FUZZ_INTRO = (
    "Below are a description of one {unit} of a neural network and numbered stretches of text in which some "
    "tokens are marked " + MARK_OPEN + "like this" + MARK_CLOSE + ". After each stretch, answer yes if the "
    "marked tokens are ones the {unit} responds to, following its description, else no.\n\n"
    "Description: the main thing this {unit} does is find years written as four digits.\n"
    "Text 1: The treaty was signed in " + MARK_OPEN + " 17" + MARK_CLOSE + MARK_OPEN + "83" + MARK_CLOSE
    + " and revised later.\nAnswer: yes\n"
    "Text 2: The " + MARK_OPEN + " treaty" + MARK_CLOSE + " was signed in 1783 and " + MARK_OPEN + " revised"
    + MARK_CLOSE + " later.\nAnswer: no\n\n"
)


def marked_text(tokens: list[str], marks: list[bool] | None = None) -> str:
    """An excerpt on one line (tabs and newlines escaped), each marked token between the delimiters."""
    marks = marks or [False] * len(tokens)
    return "".join(MARK_OPEN + escape(token) + MARK_CLOSE if marked else escape(token)
                   for token, marked in zip(tokens, marks, strict=True))


def yes_no_prompt(explanation: str, excerpts: list[list[str]], marks: list[list[bool]] | None = None,
                  unit: str = "latent") -> tuple[str, list[int]]:
    """Detection (no `marks`) or fuzzing prompt for a batch of excerpts, and the character offset of each
    answer's slot: every answer is written " unknown", so one forward pass scores the prompt and the
    next-token probabilities of ANSWERS at each slot are the answers (as `simulator_prompt` does)."""
    parts = [(_DETECT_INTRO if marks is None else _FUZZ_INTRO).format(unit=unit),
             f"Description: the main thing this {unit} does is find {explanation}.\n"]
    prompt = "".join(parts)
    slots = []
    for number, tokens in enumerate(excerpts, start=1):
        prompt += f"Text {number}: {marked_text(tokens, None if marks is None else marks[number - 1])}\nAnswer:"
        slots.append(len(prompt))
        prompt += f" {UNKNOWN}\n"
    return prompt, slots
