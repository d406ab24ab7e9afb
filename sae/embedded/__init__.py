"""The embedded default language model: a tiny GPT-2 trained on the "stdlib-docs" corpus.

So that the framework works offline, the project ships its own small model (`gpt2-tiny`, trained
by `python -m sae.embedded.train_lm`) and builds its corpus from the docstrings and reference
topics of the Python standard library (`corpus.build_corpus`), which every Python installation carries.
This package holds only the two constants, so that `python -m sae.embedded.corpus` does not find its
own module already imported by the package.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_NAME = "stdlib-docs"
"""Name under which configs refer to the corpus that `corpus.build_corpus` writes."""

EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent / "gpt2-tiny"
"""Directory of the embedded model; loads with `AutoModelForCausalLM`/`AutoTokenizer`."""
