"""Dead latents as Gao et al. 2024 count them: latents that fire on none of a long run of tokens.

Gao et al. call a latent dead when it has not fired in 10M training tokens. The held-out scoring of
`python -m eval` can only count the latents that never fire on its held-out tokens, and on the embedded
corpus those are 28k: a live latent that fires once in 50k tokens (a rate 200 times below the mean at
k=8 of 2048 latents) is missed there more often than not. So the benchmark also counts, for every SAE
folder, the latents that fire on none of the first `window_tokens` rows of its activation cache (the
training text's activations; a latent firing on them is not dead whatever the held-out window shows).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.cache import ActivationCache
from sae.config import input_site
from sae.model import SparseAutoencoder, fire_counts

ROWS_PER_READ = 16384
"""About how many cache rows are read and encoded at once (whole windows)."""


@torch.no_grad()
def window_fire_counts(sae: SparseAutoencoder, cache: ActivationCache, hookpoint: str, window_tokens: int) -> tuple[torch.Tensor, int]:
    """Per latent, how many of the first `window_tokens` rows of `cache` at `hookpoint` (raw activations,
    in cache order, fewer if the cache is shorter) fire it (value > 0): ((n_latents,) int64, rows read)."""
    counts = torch.zeros(sae.cfg.n_latents, dtype=torch.long)
    rows = 0
    windows_per_read = max(1, ROWS_PER_READ // cache.tokens_per_window)
    for first in range(0, cache.n_windows, windows_per_read):
        if rows >= window_tokens:
            break
        x = cache.read_windows(first, min(windows_per_read, cache.n_windows - first), hookpoint)[: window_tokens - rows]
        values, indices = sae.encode(x.to(sae.dtype))
        counts += fire_counts(values, indices, sae.cfg.n_latents)
        rows += x.shape[0]
    return counts, rows


def window_dead_fraction(folder: str | Path, cache: ActivationCache, hookpoint: str, window_tokens: int) -> tuple[float, int]:
    """(fraction of the SAE folder's latents that fire on none of the window, rows in the window). A
    transcoder at `hookpoint` (a module) encodes that module's input."""
    sae = SparseAutoencoder.load(folder)
    site = input_site(hookpoint) if sae.cfg.transcode else hookpoint
    counts, rows = window_fire_counts(sae, cache, site, window_tokens)
    return float((counts == 0).double().mean().item()), rows
