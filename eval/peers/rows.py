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
from sae.config import input_site


def shared_batches(cache_dir: str | Path, hookpoint: str, batch_size: int, shuffle_buffer_tokens: int,
                   seed: int, transcode: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) batches of raw activations, each (batch_size, d_in) float32, in our trainer's
    order for a one-process run of that batch size, shuffle buffer and seed (going over the cache again
    past its end, as training does). An SAE's targets are its inputs (one tensor), the activations at
    `hookpoint`; a transcoder's (`transcode`) inputs are the input of module `hookpoint`, its targets
    the module's output: the sites our trainer reads for it, in its order (`TrainConfig.hookpoints`)."""
    sites = [input_site(hookpoint), hookpoint] if transcode else [hookpoint]
    stream = ActivationStream(CachedWindows(ActivationCache(cache_dir), sites), batch_size, shuffle_buffer_tokens, seed)
    for batch in stream:
        yield batch[sites[0]], batch[hookpoint]
