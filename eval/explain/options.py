"""The scoring options that `python -m eval` (--explain) and `python -m eval.explain puzzles` share.

Both commands' configs inherit them, so each option is declared (and documented for --help) once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoringOptions:
    """Which simulators score explanations, and how the LLM backends are reached."""

    simulators: str = "auto"
    """Comma-separated: token-lookup, embedding, llm, n2g (N2G patterns, its own explainer; `python -m eval`
    only); "auto" uses every one available."""

    scorers: str = "simulation,detection,fuzzing"
    """Comma-separated scoring methods of `python -m eval --explain`: simulation (Bills et al.'s
    correlation), detection and fuzzing (Paulo et al. 2024: yes/no questions scored by balanced accuracy,
    F1 and AUC), each under every simulator's scorer. The puzzles use simulation only."""

    simulator_url: str = ""
    """OpenAI-compatible server (e.g. http://host:8000/v1) for the all-at-once LLM simulator (completions
    with echo + logprobs)."""

    simulator_model: str = ""
    """Model for the simulator: the server's model name with --simulator_url, else a local transformers model."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the servers' API key (never logged)."""

    http_concurrency: int = 4
    """Requests in flight at once per server."""

    cache_dir: str = ".cache/explain"
    """Server replies are cached here, so a rerun costs nothing."""

    def backend(self, url: str, model: str, device: str = "cpu"):
        """The backend serving `model` at `url` (or a local `model`; None for neither), with these
        options' key, concurrency and cache (eval/explain/choose.py `make_backend`)."""
        from .choose import make_backend

        return make_backend(url, model, api_key_env=self.api_key_env, concurrency=self.http_concurrency,
                            cache_dir=self.cache_dir, device=device)

    def simulator_backend(self, device: str = "cpu"):
        return self.backend(self.simulator_url, self.simulator_model, device)
