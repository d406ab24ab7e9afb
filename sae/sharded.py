"""Latent sharding: one SAE split by latents over a group of ranks, composed with data parallelism.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") train their largest autoencoders by
splitting the latents over GPUs; this module does that with `torch.distributed` (NCCL or gloo).

Layout: world = replicas x shards. Rank r holds latent shard s = r % shards of replica p = r // shards.
    shard group    the `shards` ranks of one replica: they see the SAME batch rows and together hold
                   every latent (rank s: latents [s n/S, (s+1) n/S) of encoder.weight, encoder.bias,
                   W_dec; b_dec is replicated).
    replica group  the `replicas` ranks that hold the same latent slice: plain data parallelism
                   between them (each replica streams its own data shard: replica / replicas).
shards=1 is plain data parallelism; world_size=1 communicates nothing.

One forward, for the rank's N rows (the same N rows on every rank of the shard group):
    pre = W_enc[s] (x - b_dec) + b_enc[s]         (N, n/S)  -- stays on the rank, never gathered
    candidates: the local top-min(K, n/S) per row (K = 4k with Multi-TopK, else k), global ids
    all-gather the candidates in the shard group; the global top-k of the S*K candidates is exactly
    the top-k of the full pre-activations (every global winner is in its own shard's local top-K);
    the winners are counted into the dead-latent statistics before AuxK (see `training_step`)
    each rank decodes the winners that fall in its slice; the partial reconstructions are summed
    with an all-reduce whose backward is the identity: every rank of the group computes the same
    loss from the same sum, so d loss / d partial_s is d loss / d sum on rank s.
    b_dec: its decoder use (x_hat = sum + b_dec) is counted once (identical on every rank); its
    encoder use goes through an identity whose backward all-reduces, summing the shards' parts.
AuxK picks the global top-k_aux among the latents dead after this batch the same way (a second
all-gather, since the dead set depends on the first's winners) (k_aux = min(k_aux, #dead over all
shards)), so the whole forward -- selection, ReLU after selection, losses -- equals
`SparseAutoencoder.forward` on the full SAE, up to floating-point summation order.

Memory per rank: the parameters, gradients and Adam state of n/S latents, the (N, n/S)
pre-activations and, in the eager backward, their (N, n/S) gradient; never an (N, n) tensor.

Communication per training step (N rows per replica, S shards, d = d_in, kx = min(k_aux used, the
most dead latents on one shard)):
    shard group    all-gather candidates N x min(K, n/S) x (value + 8 index bytes); with AuxK,
                   all-gather 1 int (dead counts) and N x kx candidates; all-reduce of the
                   (1 + multi_topk + auxk) x N x d partial reconstructions; in backward, all-reduce
                   of d (b_dec's encoder part); all-reduce of 1 number (gradient-norm clip).
                   Optional, recommended: `broadcast_rows` of the N x d batch (bitwise-equal rows).
    replica group  all-reduce of d + 2 numbers per distinct variance (x, and the AuxK residual);
                   all-reduce of the local gradients (2 n/S d + n/S + d); all-reduce (max) of n/S
                   bytes (latents that fired).
The normalized MSE's denominator covers the global batch, i.e. the replica group's rows: ranks of a
shard group hold the same rows and are not double counted.

Checkpoints and the final save are one ordinary SAE whatever the layout: `gather_full_state`
collects the parameters, Adam's exp_avg/exp_avg_sq and any latent-major tensor (the dead-latent
counters) into one full state dict on rank 0, named as in a single-process run
(`SparseAutoencoder.state_dict()` keys, `checkpoint.optimizer_to_flat` names); `load_from_full_state`
slices such a dict back on every rank; `sae_from_full_state` makes the `SparseAutoencoder` to `save`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .config import SaeConfig
from .distributed import all_reduce_gradients
from .initialization import initialize_from_batch
from .optim import optimizer_update
from .model import (
    PARAMETER_NAMES,
    DeadMaskFn,
    ForwardOutput,
    SparseAutoencoder,
    VarianceFn,
    batch_variance,
    normalized_mse,
    sparse_decode,
)

SHARDED_PARAMETERS = ("encoder.weight", "encoder.bias", "W_dec")
"""Latent-major parameters, split by rows over the shard group; `b_dec` is replicated."""


class ShardLayout:
    """Where this rank sits in world = replicas x shards, with the two kinds of process groups.

    `new_group` is collective over the whole job, so every rank creates every group, in the same
    order. A group of one rank is None (no communication); a group of every rank is the world group.
    """

    def __init__(self, rank: int, world_size: int, shards: int = 1):
        if shards < 1 or world_size < 1 or world_size % shards:
            raise ValueError(f"the world of {world_size} ranks cannot be split into groups of {shards} latent shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size, self.shards = rank, world_size, shards
        self.replicas = world_size // shards
        self.shard, self.replica = rank % shards, rank // shards
        shard_sets, replica_sets = self.rank_sets(world_size, shards)
        self.shard_ranks, self.replica_ranks = shard_sets[self.replica], replica_sets[self.shard]
        self.shard_group = self.replica_group = None
        if world_size == 1:
            return
        if not dist.is_initialized():
            raise RuntimeError("ShardLayout with world_size > 1 needs torch.distributed initialised (init_distributed)")
        groups = {}
        for ranks in shard_sets + replica_sets:
            if len(ranks) == world_size:
                groups[tuple(ranks)] = dist.group.WORLD
            elif len(ranks) > 1:
                groups[tuple(ranks)] = dist.new_group(ranks)
        self.shard_group = groups.get(tuple(self.shard_ranks))
        self.replica_group = groups.get(tuple(self.replica_ranks))

    @staticmethod
    def rank_sets(world_size: int, shards: int) -> tuple[list[list[int]], list[list[int]]]:
        """(shard groups: one per replica, replica groups: one per shard), as lists of global ranks."""
        replicas = world_size // shards
        shard_sets = [[p * shards + s for s in range(shards)] for p in range(replicas)]
        replica_sets = [[p * shards + s for p in range(replicas)] for s in range(shards)]
        return shard_sets, replica_sets

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def latent_range(self, n_latents: int) -> tuple[int, int]:
        """[start, stop) of this rank's latents."""
        if n_latents % self.shards:
            raise ValueError(f"n_latents={n_latents} is not divisible by shard_latents={self.shards}")
        size = n_latents // self.shards
        return self.shard * size, (self.shard + 1) * size

    # ---- collectives within one group (no-ops for a group of one) ----

    def sum_over_shards(self, tensor: Tensor) -> Tensor:
        return _all_reduce(tensor, self.shard_group, dist.ReduceOp.SUM)

    def sum_over_replicas(self, tensor: Tensor) -> Tensor:
        return _all_reduce(tensor, self.replica_group, dist.ReduceOp.SUM)

    def max_over_replicas(self, tensor: Tensor) -> Tensor:
        return _all_reduce(tensor, self.replica_group, dist.ReduceOp.MAX)

    def broadcast_rows(self, x: Tensor) -> Tensor:
        """The shard group's first rank's `x` on every rank of the group (a copy; `x` is untouched).

        Ranks of a shard group read the same data shard, so their batches should already be equal;
        this makes them bitwise equal (a top-k on rows that differ in the last bit could differ).
        """
        if self.shard_group is None:
            return x
        x = x.contiguous().clone()
        dist.broadcast(x, src=self.shard_ranks[0], group=self.shard_group)
        return x

    def gather_rows_over_replicas(self, x: Tensor) -> Tensor:
        """The global batch: every replica's rows of x (equal row counts), in replica order."""
        if self.replica_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.replicas)]
        dist.all_gather(parts, x.contiguous(), group=self.replica_group)
        return torch.cat(parts)

    def variance(self, x: Tensor) -> Tensor:
        """sum ||x - mean(x)||^2 over the global batch (the replica group's rows), without gathering x."""
        if self.replica_group is None:
            return batch_variance(x)
        rows = x.double()
        sums = torch.cat([rows.sum(0), rows.pow(2).sum().reshape(1), rows.new_full((1,), rows.shape[0])])
        self.sum_over_replicas(sums)
        total, squared, count = sums[:-2], sums[-2], sums[-1]
        return (squared - total.pow(2).sum() / count).to(x.dtype).reshape(())


def _all_reduce(tensor: Tensor, group, op) -> Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _SumOverShards(torch.autograd.Function):
    """Forward: all-reduce sum over the shard group. Backward: identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SumGradOverShards(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce sum of the gradient over the shard group."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedSparseAutoencoder(nn.Module):
    """This rank's slice of a TopK SAE: latents `latent_range` of encoder.weight, encoder.bias and
    W_dec, plus the replicated b_dec. Parameter names and order are `SparseAutoencoder`'s, so an
    optimizer over `parameters()` numbers its state as a single-process run's optimizer does.

    The init builds the whole `SparseAutoencoder(cfg)` with the current RNG (exactly as a single
    process would) and keeps this rank's rows: after the same `torch.manual_seed` the slices equal
    the single-process init, but the whole SAE is built once on `device`.
    """

    def __init__(self, cfg: SaeConfig, layout: ShardLayout, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        super().__init__()
        if cfg.d_in <= 0:
            raise ValueError(f"SaeConfig.d_in must be positive to build an SAE, got {cfg.d_in}")
        self.cfg, self.layout = cfg, layout
        self.latent_start, self.latent_stop = layout.latent_range(cfg.n_latents)
        self.n_local = self.latent_stop - self.latent_start
        # skip_init: no RNG drawn here, so the init consumes the RNG exactly as SparseAutoencoder does.
        self.encoder = nn.utils.skip_init(nn.Linear, cfg.d_in, self.n_local, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(self.n_local, cfg.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        full = SparseAutoencoder(self.cfg, device=self.device, dtype=self.dtype)
        for name, parameter in self.named_parameters():
            value = full.get_parameter(name)
            parameter.copy_(self.local_rows(value) if name in SHARDED_PARAMETERS else value)

    # the same parameters under the same names as a plain SAE: its properties apply as they are
    device = SparseAutoencoder.device
    dtype = SparseAutoencoder.dtype

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a latent-major tensor (n_latents, ...)."""
        if full.shape[0] != self.cfg.n_latents:
            raise ValueError(f"expected a latent-major tensor with {self.cfg.n_latents} rows, got shape {tuple(full.shape)}")
        return full[self.latent_start : self.latent_stop]

    # ---- the forward pass -------------------------------------------------------------------

    def forward(self, x: Tensor, dead_mask_local: Tensor | DeadMaskFn | None = None,
                variance: VarianceFn | None = None) -> ForwardOutput:
        """`SparseAutoencoder.forward` of the full SAE on this replica's rows `x` (N, d_in).

        dead_mask_local: (n_latents / shards,) bool, this rank's latents the AuxK loss may use; or a
        `DeadMaskFn` called with the TopK selection (GLOBAL latent ids) that counts it and returns that
        mask after this batch (as in `SparseAutoencoder.forward`).
        variance: the normalized MSEs' denominator; by default the global batch's (`layout.variance`).
        Every rank of the shard group returns the same output: x_hat (N, d_in), the losses (this
        replica's share of the global batch's, as in data parallelism), latent_indices as GLOBAL
        latent ids (N, k) and latent_acts (N, k) (detached: the gradient flows through x_hat).
        """
        cfg, group = self.cfg, self.layout.shard_group
        variance = variance or self.layout.variance
        x = x.to(self.dtype)
        b_dec_enc = self.b_dec if group is None else _SumGradOverShards.apply(self.b_dec, group)
        pre = F.linear(x - b_dec_enc, self.encoder.weight, self.encoder.bias)  # (N, n/S): stays local
        candidates = pre.detach()

        multi_k = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else 0
        values, indices = candidates.topk(min(max(cfg.k, multi_k), self.n_local), dim=1, sorted=False)
        [main_candidates] = self._all_gather_candidates([(values, indices + self.latent_start)])
        latent_acts, latent_indices = _top(*main_candidates, cfg.k)
        latent_acts = latent_acts.relu()
        if callable(dead_mask_local):
            dead_mask_local = dead_mask_local(latent_indices, latent_acts)
        k_aux = 0
        if dead_mask_local is not None and cfg.auxk_coef > 0:
            k_aux, n_aux_candidates = self._aux_sizes(dead_mask_local)
            if k_aux > 0:
                masked = candidates.masked_fill(~dead_mask_local, -math.inf)
                aux_values, aux_indices = masked.topk(n_aux_candidates, dim=1, sorted=False)
                [aux_candidates] = self._all_gather_candidates([(aux_values, aux_indices + self.latent_start)])

        partials = [self._partial_decode(pre, latent_indices)]
        if multi_k:
            partials.append(self._partial_decode(pre, _top(*main_candidates, multi_k)[1]))
        if k_aux:
            partials.append(self._partial_decode(pre, _top(*aux_candidates, k_aux)[1]))
        sums = torch.stack(partials)
        if group is not None:
            sums = _SumOverShards.apply(sums, group)
        sums = sums.unbind(0)

        x_variance = variance(x)
        x_hat = sums[0] + self.b_dec
        fvu = normalized_mse(x, x_hat, lambda _: x_variance)
        zero = fvu.new_zeros(())
        auxk_loss = zero
        if k_aux:
            auxk_loss = normalized_mse((x - x_hat).detach(), sums[-1], variance)
            auxk_loss = torch.where(auxk_loss.isnan(), torch.zeros_like(auxk_loss), auxk_loss)
        multi_topk_fvu = zero
        if multi_k:
            multi_topk_fvu = normalized_mse(x, sums[1] + self.b_dec, lambda _: x_variance)
        loss = fvu + cfg.auxk_coef * auxk_loss + multi_topk_fvu / 8
        return ForwardOutput(x_hat, latent_acts, latent_indices, fvu, auxk_loss, multi_topk_fvu, loss)

    def _aux_sizes(self, dead_mask_local: Tensor) -> tuple[int, int]:
        """(k_aux = min(cfg.k_aux, dead latents over all shards), candidates each shard sends)."""
        if dead_mask_local.shape != (self.n_local,):
            raise ValueError(f"dead_mask_local must have shape ({self.n_local},), got {tuple(dead_mask_local.shape)}")
        count = dead_mask_local.sum().reshape(1).long()
        counts = count
        if self.layout.shard_group is not None:
            gathered = [torch.empty_like(count) for _ in range(self.layout.shards)]
            dist.all_gather(gathered, count, group=self.layout.shard_group)
            counts = torch.cat(gathered)
        k_aux = min(self.cfg.k_aux, int(counts.sum()))
        # Each shard sends min(k_aux, its dead) real candidates (padded with -inf to a common
        # width): at least k_aux real ones in all, and every global winner is among them.
        return k_aux, min(k_aux, int(counts.max()))

    def _all_gather_candidates(self, parts: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Every shard's (values (N, c), global indices (N, c)) side by side: (N, S c) each.

        One all-gather: the pairs are packed into one byte tensor per rank."""
        group = self.layout.shard_group
        if group is None:
            return parts
        tensors = [t.contiguous() for pair in parts for t in pair]
        packed = torch.cat([t.view(torch.uint8) for t in tensors], dim=1)
        pieces = [torch.empty_like(packed) for _ in range(self.layout.shards)]
        dist.all_gather(pieces, packed, group=group)
        widths = [t.shape[1] * t.element_size() for t in tensors]
        columns = [[] for _ in tensors]
        for piece in pieces:
            for column, chunk, t in zip(columns, piece.split(widths, dim=1), tensors):
                column.append(chunk.contiguous().view(t.dtype))
        merged = [torch.cat(column, dim=1) for column in columns]
        return [(merged[i], merged[i + 1]) for i in range(0, len(merged), 2)]

    def _partial_decode(self, pre_acts: Tensor, global_indices: Tensor) -> Tensor:
        """sum over the winners in this rank's slice of ReLU(pre) * W_dec row, (N, d_in), no bias."""
        local = global_indices - self.latent_start
        mine = (local >= 0) & (local < self.n_local)
        local = torch.where(mine, local, torch.zeros_like(local))
        values = torch.where(mine, pre_acts.gather(1, local).relu(), pre_acts.new_zeros(()))
        return sparse_decode(values, local, self.W_dec)

    # ---- gradients and the decoder constraint ---------------------------------------------------

    # Row-wise on W_dec, so SparseAutoencoder's own methods are right on the local rows.
    remove_gradient_parallel_to_decoder_directions = SparseAutoencoder.remove_gradient_parallel_to_decoder_directions
    set_decoder_norm_to_unit_norm = SparseAutoencoder.set_decoder_norm_to_unit_norm

    @torch.no_grad()
    def sum_gradients_over_replicas(self) -> None:
        """Data parallelism over replicas: sum every gradient over the replica group (one all-reduce)."""
        if self.layout.replica_group is not None:
            all_reduce_gradients(self.parameters(), group=self.layout.replica_group)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the full SAE: the sharded parameters' squared norms
        are summed over the shard group, b_dec's counted once. Returns the total norm before clipping."""
        sharded = [self.get_parameter(name).grad for name in SHARDED_PARAMETERS]
        squares = torch.stack([torch.linalg.vector_norm(g).pow(2) for g in sharded if g is not None]).sum()
        squares = self.layout.sum_over_shards(squares.reshape(1)).reshape(())
        if self.b_dec.grad is not None:
            squares = squares + torch.linalg.vector_norm(self.b_dec.grad).pow(2)
        total = squares.sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        return total


def _top(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest candidates of each row: (values (N, k), their global indices (N, k))."""
    top = values.topk(k, dim=1, sorted=False)
    return top.values, indices.gather(1, top.indices)


# ---- the trainer's pieces, for a sharded SAE ----------------------------------------------------


class PlaceholderWindowSource:
    """Window source of the ranks of a latent-shard group other than its first.

    All ranks of a group train on the first rank's batches (`ShardLayout.broadcast_rows`), so the
    others need batches of the right shape only: zeros, with no LM forward and no data read. Its
    stream state is empty; on resume the first rank's state alone restores the group's data.
    """

    def __init__(self, hookpoints: list[str], ctx_len: int, d_in_of: dict[str, int], device: torch.device | str):
        self.hookpoints = list(hookpoints)
        self.ctx_len = ctx_len
        self.d_in_of = d_in_of
        self.device = device

    def next_activations(self, n_windows: int) -> list[Tensor]:
        rows = n_windows * (self.ctx_len - 1)
        return [torch.zeros(rows, self.d_in_of[hookpoint], device=self.device) for hookpoint in self.hookpoints]

    def state_dict(self) -> dict:
        return {}

    def text_read(self) -> None:
        """Nothing: the group's first rank reads the text."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


def training_step(sae: ShardedSparseAutoencoder, optimizer: torch.optim.Optimizer, x: Tensor,
                  tokens_since_fired_local: Tensor, lr: float, grad_clip: float) -> ForwardOutput:
    """`trainer.training_step` for a sharded SAE: `x` is this replica's rows (the same on every rank
    of the shard group), already scaled; `optimizer` is over `sae.parameters()`; the batch is counted
    into this rank's dead-latent counters before AuxK, as there."""
    def dead_after_this_batch(latent_indices: Tensor, latent_acts: Tensor) -> Tensor:
        update_dead_counters(sae, tokens_since_fired_local, latent_indices, latent_acts)
        return tokens_since_fired_local >= sae.cfg.dead_tokens

    out = sae(x, dead_after_this_batch)
    optimizer_update(sae, optimizer, out.loss, lr, grad_clip, sae.sum_gradients_over_replicas, sae.clip_grad_norm_)
    return out


@torch.no_grad()
def update_dead_counters(sae: ShardedSparseAutoencoder, tokens_since_fired_local: Tensor,
                         latent_indices: Tensor, latent_acts: Tensor) -> None:
    """Counters of this rank's latents (n_latents / shards,): + the global batch's tokens for every
    latent; reset those that fired in any replica. latent_indices (GLOBAL ids), latent_acts (N, k):
    this replica's TopK selection."""
    fired = torch.zeros_like(tokens_since_fired_local, dtype=torch.uint8)
    local = latent_indices[latent_acts > 0] - sae.latent_start
    fired[local[(local >= 0) & (local < sae.n_local)]] = 1
    sae.layout.max_over_replicas(fired)
    tokens_since_fired_local += latent_indices.shape[0] * sae.layout.replicas
    tokens_since_fired_local[fired.bool()] = 0


@torch.no_grad()
def initialize_from_first_batch(sae: ShardedSparseAutoencoder, first_batch: Tensor, cfg) -> float:
    """`trainer.initialize_from_first_batch` from the global first batch (every replica's rows once):
    the same numbers on every rank. `cfg` is the run's TrainConfig. Collective: call it on every rank."""
    global_batch = sae.layout.gather_rows_over_replicas(first_batch)
    return initialize_from_batch(sae, global_batch, cfg.b_dec_init, cfg.scale_inputs, cfg.fit_encoder_scale)


@torch.no_grad()
def step_metrics(out: ForwardOutput, tokens_since_fired_local: Tensor, dead_tokens: int,
                 layout: ShardLayout) -> dict[str, float]:
    """`trainer.step_metrics` for a sharded run: losses summed over replicas (not over shards, which
    all hold the same numbers), L0 averaged over replicas, dead fraction over all latents."""
    values = torch.stack([
        out.fvu.detach().float(), out.auxk_loss.detach().float(), out.multi_topk_fvu.detach().float(),
        (out.latent_acts > 0).sum(-1).float().mean() / layout.replicas,
    ])
    fvu, auxk_loss, multi_topk_fvu, l0 = layout.sum_over_replicas(values).tolist()
    dead = layout.sum_over_shards((tokens_since_fired_local >= dead_tokens).sum().reshape(1).long())
    dead_frac = dead.item() / (tokens_since_fired_local.numel() * layout.shards)
    return {"fvu": fvu, "auxk_loss": auxk_loss, "multi_topk_fvu": multi_topk_fvu, "l0": l0, "dead_frac": dead_frac}


# ---- one full state, whatever the layout -----------------------------------------------------


def _latent_major_state(sae: ShardedSparseAutoencoder, optimizer: torch.optim.Optimizer | None,
                        extra: dict[str, Tensor] | None) -> list[tuple[str, Tensor, bool]]:
    """(full-state name, local tensor, latent-major?) in an order that is the same on every rank."""
    items = [(name, p, name in SHARDED_PARAMETERS) for name, p in sae.named_parameters()]
    if optimizer is not None:
        sharded = {id(sae.get_parameter(name)) for name in SHARDED_PARAMETERS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for param_id, p in enumerate(params):  # numbered as Optimizer.state_dict() numbers them
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(value, Tensor):
                    latent_major = id(p) in sharded and value.dim() > 0 and value.shape[0] == sae.n_local
                    items.append((f"optimizer.{param_id}.{key}", value, latent_major))
    for name, value in (extra or {}).items():
        if value.shape[:1] != (sae.n_local,):
            raise ValueError(f"extra tensor '{name}' must be latent-major with {sae.n_local} local rows, "
                             f"got shape {tuple(value.shape)}")
        items.append((name, value, True))
    return items


@torch.no_grad()
def gather_full_state(sae: ShardedSparseAutoencoder, optimizer: torch.optim.Optimizer | None = None,
                      extra: dict[str, Tensor] | None = None, max_chunk_bytes: int = 1 << 28) -> dict[str, Tensor] | None:
    """One full state dict (CPU tensors) on rank 0, None on the other ranks.

    Keys: `encoder.weight`, `encoder.bias`, `W_dec`, `b_dec` (full shapes); with `optimizer`, its
    tensors as `optimizer.{param_id}.{key}` (`checkpoint.optimizer_to_flat`'s names: exp_avg and
    exp_avg_sq full, step as is); and each `extra` latent-major tensor (e.g. the dead-latent
    counters) by its name. Call it on every rank: replica 0's shard group gathers (in chunks of at
    most `max_chunk_bytes` per collective, so rank 0's device never holds a whole tensor), the other
    replicas hold identical copies and return at once.
    """
    layout = sae.layout
    items = _latent_major_state(sae, optimizer, extra)
    if layout.replica != 0:
        return None
    full = {}
    for name, tensor, latent_major in items:
        if latent_major:
            value = _gather_rows_to_rank0(tensor.detach(), layout, max_chunk_bytes)
        else:
            value = tensor.detach().cpu().clone() if layout.is_main else None
        if layout.is_main:
            full[name] = value
    return full if layout.is_main else None


def _gather_rows_to_rank0(local: Tensor, layout: ShardLayout, max_chunk_bytes: int) -> Tensor | None:
    if layout.shard_group is None:
        return local.cpu().clone()
    n_local, shards = local.shape[0], layout.shards
    row_bytes = max(1, local[:1].numel() * local.element_size())
    rows_per_chunk = max(1, max_chunk_bytes // (row_bytes * shards))
    full = torch.empty((shards * n_local, *local.shape[1:]), dtype=local.dtype) if layout.is_main else None
    for start in range(0, n_local, rows_per_chunk):
        chunk = local[start : start + rows_per_chunk].contiguous()
        pieces = [torch.empty_like(chunk) for _ in range(shards)] if layout.is_main else None
        dist.gather(chunk, pieces, dst=layout.shard_ranks[0], group=layout.shard_group)
        if layout.is_main:
            for shard, piece in enumerate(pieces):
                full[shard * n_local + start : shard * n_local + start + len(chunk)] = piece.cpu()
    return full


@torch.no_grad()
def load_from_full_state(sae: ShardedSparseAutoencoder, full: dict[str, Tensor],
                         optimizer: torch.optim.Optimizer | None = None, optimizer_meta: dict[str, Any] | None = None,
                         extra: dict[str, Tensor] | None = None) -> None:
    """Inverse of `gather_full_state`, on every rank, from a full state every rank has read (e.g.
    from the checkpoint file): no communication. Copies this rank's rows into the parameters, loads
    the optimizer's sliced state (`optimizer_meta`: `checkpoint.optimizer_to_flat`'s meta; by default
    the optimizer's own param_groups) and copies each `extra` name's rows into the given tensor."""
    def rows(name: str, latent_major: bool) -> Tensor:
        if name not in full:
            raise KeyError(f"the full state has no '{name}'")
        return (sae.local_rows(full[name]) if latent_major else full[name]).clone()  # never alias `full`

    for name, parameter in sae.named_parameters():
        value = rows(name, name in SHARDED_PARAMETERS)
        if value.shape != parameter.shape:
            raise ValueError(f"'{name}': the full state's shape {tuple(full[name].shape)} does not fit this SAE's cfg")
        parameter.copy_(value)
    if optimizer is not None:
        sharded = {id(sae.get_parameter(name)) for name in SHARDED_PARAMETERS}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tensors = {}
        for name, value in full.items():
            if name.startswith("optimizer."):
                param_id = int(name.split(".")[1])
                tensors[name] = rows(name, id(params[param_id]) in sharded and value.dim() > 0)
        meta = optimizer_meta or {"param_groups": optimizer.state_dict()["param_groups"], "scalars": {}}
        checkpoint.optimizer_from_flat(optimizer, tensors, meta)
    for name, target in (extra or {}).items():
        target.copy_(rows(name, True))


def sae_from_full_state(full: dict[str, Tensor], cfg: SaeConfig) -> SparseAutoencoder:
    """An ordinary `SparseAutoencoder` holding the full state's parameters (no RNG drawn), to `save`."""
    sae = SparseAutoencoder(cfg, device="meta")
    sae.load_state_dict({name: full[name] for name in PARAMETER_NAMES}, assign=True)
    return sae
