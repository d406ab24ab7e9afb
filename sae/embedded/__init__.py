"""The embedded default language model: a tiny GPT-2 trained on the "stdlib-docs" corpus.

So that the framework works offline, the project ships its own small model (`gpt2-tiny`, trained
by `python -m sae.embedded.train_lm`) and builds its corpus from the docstrings and reference
topics of the Python standard library (`build_corpus`), which every Python installation carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .corpus import build_corpus

CORPUS_NAME = "stdlib-docs"
"""Name under which configs refer to the corpus that `build_corpus` writes."""

EMBEDDED_MODEL_DIR: Path = Path(__file__).resolve().parent / "gpt2-tiny"
"""Directory of the embedded model; loads with `AutoModelForCausalLM`/`AutoTokenizer`."""

__all__ = ["CORPUS_NAME", "EMBEDDED_MODEL_DIR", "build_corpus"]


def __getattr__(name: str) -> Any:
    # `build_corpus` is imported lazily so that `python -m sae.embedded.corpus` does not find its
    # own module already imported by this package (runpy warns about that), and so that importing
    # the package for the two constants stays cheap.
    if name == "build_corpus":
        from .corpus import build_corpus

        return build_corpus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
