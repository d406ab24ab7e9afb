"""The one order of activation rows every system of the benchmark trains on.

It is the order our trainer reads an activation cache in (an `ActivationStream` over `CachedWindows`
with the run's batch size, shuffle buffer, seed and token hygiene), so the peers see exactly the batches
ours does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from torch import Tensor

from sae.activations import ActivationStream
from sae.cache import ActivationCache, CachedWindows
from sae.config import TrainConfig, input_site
from sae.trainer import run_excluded_ids


def shared_batches(cache_dir: str | Path, hookpoint: str, cfg: TrainConfig) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) batches of raw activations, each (batch_size, d_in) float32, in our trainer's
    order for a one-process run `cfg` (its batch size, shuffle buffer, seed and token hygiene; going over
    the cache again past its end, as training does). An SAE's targets are its inputs (one tensor), the activations at
    `hookpoint`; a transcoder's (`transcode`) inputs are the input of module `hookpoint`, its targets
    the module's output: the sites our trainer reads for it, in its order (`TrainConfig.hookpoints`)."""
    sites = [input_site(hookpoint), hookpoint] if cfg.sae.transcode else [hookpoint]
    stream = ActivationStream(CachedWindows(ActivationCache(cache_dir), sites), cfg.batch_size, cfg.data.shuffle_buffer_tokens,
                              cfg.seed, excluded_token_ids=run_excluded_ids(cfg, None),
                              outlier_norm_ratio=cfg.data.outlier_norm_ratio)
    for batch in stream:
        yield batch[sites[0]], batch[hookpoint]
