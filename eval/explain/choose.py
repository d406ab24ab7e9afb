"""Which explainer and simulators a run uses, from command-line options.

No URL and no model: the offline methods (token-lookup explainer; token-lookup and embedding
simulators; and N2G, its own explainer and simulator). A URL (an OpenAI-compatible server) or a local transformers model switches the explainer
and adds the all-at-once LLM simulator, with no code change.
"""

from __future__ import annotations

from pathlib import Path

from sae.errors import UsageError

from .explainers import LLMExplainer, TokenLookupExplainer
from .simulators import EmbeddingSimulator, LLMSimulator, TokenLookupSimulator

SIMULATOR_NAMES = ("token-lookup", "embedding", "llm", "n2g")


def make_backend(url: str = "", model: str = "", api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 cache_dir: str | Path | None = None, device: str = "cpu"):
    """An HttpBackend for `url` (serving `model`), a TransformersBackend for a local `model`, or None."""
    if url:
        from .http import HttpBackend

        if not model:
            raise UsageError(f"a server URL ({url}) needs the name of the model it serves")
        return HttpBackend(url, model, api_key_env=api_key_env, concurrency=concurrency, cache_dir=cache_dir)
    if model:
        from .backends import TransformersBackend

        return TransformersBackend(model, device=device)
    return None


def make_explainer(backend, unit_name: str = "latent"):
    return LLMExplainer(backend, unit_name) if backend is not None else TokenLookupExplainer()


class SimulatorSet:
    """Simulators by name; `for_unit(kind)` gives the dict for latents or neurons (LLM prompts name the unit)."""

    def __init__(self, names: str = "auto", backend=None, embedding_model: str | None = None):
        wanted = [name.strip() for name in names.split(",")] if names != "auto" else list(SIMULATOR_NAMES)
        unknown = [name for name in wanted if name not in SIMULATOR_NAMES]
        if unknown:
            raise UsageError(f"unknown simulators {unknown}; choose from {list(SIMULATOR_NAMES)} or 'auto'")
        self.backend = backend
        self.notes: list[str] = []
        self.offline: dict = {}
        if "token-lookup" in wanted:
            self.offline["token-lookup"] = TokenLookupSimulator()
        if "embedding" in wanted:
            try:
                self.offline["embedding"] = EmbeddingSimulator(embedding_model)
            except ImportError as error:
                if names != "auto":
                    raise
                self.notes.append(f"embedding simulator left out: {error}")
        self.n2g = "n2g" in wanted
        """N2G pairs its own explainer with its simulator (pipeline.add_n2g_scores): not in `for_unit`."""
        self.use_llm = "llm" in wanted and backend is not None
        if "llm" in wanted and backend is None:
            if names != "auto":
                raise UsageError("the llm simulator needs a backend: a server URL or a local model")
            self.notes.append("llm simulator left out: no server URL or local model given")

    def for_unit(self, unit_name: str) -> dict:
        simulators = dict(self.offline)
        if self.use_llm:
            simulators["llm"] = LLMSimulator(self.backend, unit_name)
        return simulators
