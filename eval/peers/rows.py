"""The one order of activation rows every system of the benchmark trains on.

It is the order our trainer reads an activation cache in (an `ActivationStream` over `CachedWindows`
with the run's batch size, shuffle buffer and seed), so the peers see exactly the batches ours does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from torch import Tensor

from sae.activations import ActivationStream
from sae.cache import ActivationCache, CachedWindows


def shared_batches(cache_dir: str | Path, hookpoint: str, batch_size: int, shuffle_buffer_tokens: int,
                   seed: int) -> Iterator[Tensor]:
    """Endless (batch_size, d_in) float32 batches of raw activations at `hookpoint`, in our trainer's
    order for a one-process run of that batch size, shuffle buffer and seed (going over the cache again
    past its end, as training does)."""
    stream = ActivationStream(CachedWindows(ActivationCache(cache_dir), [hookpoint]), batch_size,
                              shuffle_buffer_tokens, seed)
    for batch in stream:
        yield batch[hookpoint]
