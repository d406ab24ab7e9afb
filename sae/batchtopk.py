"""BatchTopK selection (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

TopK keeps the k largest latents of each token. BatchTopK keeps the k * B largest (latent, token) values
of the whole global batch of B tokens, so each token gets as many latents as it needs and the mean L0
is k. Equivalently, it keeps every value at or above the batch's threshold theta_b, the (k B)-th largest
value (values after ReLU; a zero never fires).

Exact on the sparse kernels: each rank takes the top c candidates of each of its rows (topk_encode),
theta_b is found among every rank's candidates, and the selection is exact if no row of any rank has
its c-th candidate at or above theta_b (then no value outside the candidates can reach it); otherwise c
doubles and the selection is redone. Rows need on average k winners, so c = 4k rarely doubles.

At inference there is no batch: the SAE keeps a running threshold theta (an exponential moving average
of theta_b over the training steps) and encodes each token alone by it, a JumpReLU with one threshold
for all latents, as the paper does. The average is short: theta_b falls while the SAE trains, and a long
average lags behind it, so that fewer latents reach it at inference than k (docs/batchtopk.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .parallel import ShardLayout

FIRST_CANDIDATES_PER_K = 4
"""Candidates per row in the first try: c = 4k (at most the rank's latents)."""

THRESHOLD_DECAY = 0.5
"""The running threshold's decay per step: mostly the last two steps' theta_b (docs/batchtopk.md)."""


def batch_threshold(values: Tensor, k: int, layout: ShardLayout) -> Tensor:
    """theta_b, a 0-dim tensor: the (k B)-th largest of every replica's candidate values over all shards,
    `values` (N, C) this replica's (detached, after ReLU, identical on the ranks of a shard group), B the
    global batch. 0 if fewer than k B values are positive. Collective over the replicas."""
    everything = layout.gather_rows_over_replicas(values.detach()).flatten()
    wanted = k * (everything.numel() // values.shape[1]) if values.shape[1] else 0
    if wanted >= everything.numel():
        return everything.new_zeros(())
    return everything.topk(wanted, sorted=False).values.min()


def candidates_cover(values: Tensor, threshold: Tensor, n_local: int, layout: ShardLayout) -> bool:
    """Whether every rank's candidates hold every value at or above `threshold`: for each row of `values`
    (N, c), sorted in descending order, the c-th is below it (or is 0, or c is all of the rank's
    latents). Collective over every rank, which all get the same answer."""
    if values.shape[1] >= n_local:
        short = values.new_zeros((1,), dtype=torch.int64)
    else:
        last = values[:, -1].detach()
        short = ((last >= threshold) & (last > 0)).any().reshape(1).to(torch.int64)
    return not bool(layout.max_over_replicas(layout.sum_over_shards(short)).item())


def keep_at_or_above(values: Tensor, threshold: Tensor) -> Tensor:
    """`values` (any shape, after ReLU) where they reach `threshold` and are positive, else 0; the
    gradient flows through the values kept."""
    return torch.where((values >= threshold) & (values > 0), values, values.new_zeros(()))


@torch.no_grad()
def update_running_threshold(running: Tensor, batch: Tensor) -> None:
    """theta <- THRESHOLD_DECAY theta + (1 - THRESHOLD_DECAY) theta_b, in place; the first batch's
    theta_b (while theta is 0: a fresh SAE) sets it."""
    if running.item() == 0:
        running.copy_(batch)
    else:
        running.mul_(THRESHOLD_DECAY).add_(batch.to(running.dtype), alpha=1 - THRESHOLD_DECAY)
