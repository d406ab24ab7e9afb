"""How one SAE is split over the ranks of a torchrun job: world = replicas x shards.

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") train their largest autoencoders by
splitting the latents over GPUs; `ShardLayout` does that with `torch.distributed` (NCCL or gloo),
composed with data parallelism. Every run has a layout: a process alone is 1 x 1 (no communication
at all), plain data parallelism is world x 1, and `--shard_latents S` makes it (world / S) x S.

Rank r holds latent shard s = r % shards of replica p = r // shards.
    shard group    the `shards` ranks of one replica: they see the SAME batch rows and together hold
                   every latent (rank s: latents [s n/S, (s+1) n/S) of encoder.weight, encoder.bias,
                   W_dec; b_dec is replicated).
    replica group  the `replicas` ranks that hold the same latent slice: plain data parallelism
                   between them (each replica streams its own data shard: replica / replicas).

The SAE's forward (`model.SparseAutoencoder.forward`) is one code path for every layout; what it
needs from the layout is here, and each of these is the identity for a group of one:
    top_over_shards      each rank sends its local top-K candidates (values, global ids); the global
                         top-k of the S*K candidates is exactly the top-k of the full pre-activations
                         (every global winner is in its own shard's local top-K)
    sum_reconstructions  sum of the shards' partial decodes, an all-reduce whose backward is the
                         identity: every rank of the group computes the same loss from the same sum
    b_dec_for_encoder    b_dec's encoder use, an identity whose backward sums the shards' parts
    variance             the normalized MSE's denominator over the global batch (the replica group's
                         rows; ranks of a shard group hold the same rows and are not double counted)

Communication per training step (N rows per replica, S shards, d = d_in, kx = min(k_aux used, the
most dead latents on one shard)):
    shard group    all-gather candidates N x min(K, n/S) x (value + 8 index bytes); with AuxK,
                   all-gather 1 int (dead counts) and N x kx candidates; all-reduce of the
                   (1 + multi_topk + auxk) x N x d partial reconstructions; in backward, all-reduce
                   of d (b_dec's encoder part); all-reduce of 3 numbers (gradient-norm clip).
                   `broadcast_rows` of the N x d batch (bitwise-equal rows).
    replica group  all-reduce of d + 2 numbers per distinct variance (x, and the AuxK residual);
                   all-reduce of the local gradients (2 n/S d + n/S + d); all-reduce (max) of n/S
                   bytes (latents that fired).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UsageError


class ShardLayout:
    """Where this rank sits in world = replicas x shards, with the two kinds of process groups.

    `new_group` is collective over the whole job, so every rank creates every group, in the same
    order. A group of one rank is None (no communication); a group of every rank is the world group.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, shards: int = 1):
        if shards < 1 or world_size < 1 or world_size % shards:
            raise UsageError(f"the world of {world_size} ranks cannot be split into groups of {shards} latent shards")
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

    @property
    def reads_data(self) -> bool:
        """Whether this rank streams batches: the first rank of each shard group (the others get its
        rows through `broadcast_rows`)."""
        return self.shard == 0

    def latent_range(self, n_latents: int) -> tuple[int, int]:
        """[start, stop) of this rank's latents."""
        if n_latents % self.shards:
            raise UsageError(f"n_latents={n_latents} is not divisible by shard_latents={self.shards}")
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
        """The shard group's first rank's `x` on every rank of the group (`x` itself for one shard).

        The group's other ranks read no data (`reads_data`): they pass a tensor of the right shape
        and get the first rank's rows, bitwise equal, so every shard selects from the same inputs.
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
        """sum ||x - mean(x)||^2 over the global batch (the replica group's rows), without gathering x:
        an all-reduce of the rows' sums, sum of squares and count, in float64."""
        rows = x.double()
        sums = torch.cat([rows.sum(0), rows.pow(2).sum().reshape(1), rows.new_full((1,), rows.shape[0])])
        self.sum_over_replicas(sums)
        total, squared, count = sums[:-2], sums[-2], sums[-1]
        return (squared - total.pow(2).sum() / count).to(x.dtype).reshape(())

    @torch.no_grad()
    def sum_gradients_over_replicas(self, parameters) -> None:
        """Data parallelism: sum the parameters' gradients over the replica group, one flattened all-reduce."""
        if self.replica_group is None:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.replica_group)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def gradient_norm(self, grads: list[Tensor], replicated: list[bool]) -> Tensor:
        """The 2-norm of the whole SAE's gradient from this rank's `grads`: latent-sharded ones summed
        over the shard group, the `replicated` ones (b_dec's) counted once. For one shard it is
        `torch.nn.utils.get_total_norm(grads)`, in their order: bitwise what `clip_grad_norm_`
        computes for a single process."""
        if self.shard_group is None:
            return torch.nn.utils.get_total_norm(grads)
        latent_major = [grad for grad, once in zip(grads, replicated) if not once]
        squares = self.sum_over_shards(torch.nn.utils.get_total_norm(latent_major).pow(2).reshape(1)).reshape(())
        if any(replicated):
            squares = squares + torch.nn.utils.get_total_norm([g for g, once in zip(grads, replicated) if once]).pow(2)
        return squares.sqrt()

    # ---- the pieces of the forward ----

    def b_dec_for_encoder(self, b_dec: Tensor) -> Tensor:
        """b_dec as the encoder subtracts it: the identity, whose backward sums b_dec's encoder gradient
        over the shards (each shard's encoder sees only its latents' part)."""
        return b_dec if self.shard_group is None else _SumGradOverShards.apply(b_dec, self.shard_group)

    def sum_reconstructions(self, partial: Tensor) -> Tensor:
        """The sum over the shard group of each rank's partial decode (N, d); the backward is the
        identity, since every rank of the group computes the same loss from the same sum."""
        return partial if self.shard_group is None else _SumOverShards.apply(partial, self.shard_group)

    def total_over_shards(self, count: Tensor) -> tuple[int, int]:
        """(sum, max) over the shard group of one integer per rank (e.g. its dead latents), given as a
        tensor on this rank's device (NCCL communicates device tensors only)."""
        count = count.reshape(1).long()
        if self.shard_group is None:
            return int(count), int(count)
        counts = [torch.empty_like(count) for _ in range(self.shards)]
        dist.all_gather(counts, count, group=self.shard_group)
        counts = torch.cat(counts)
        return int(counts.sum()), int(counts.max())

    def top_over_shards(self, values: Tensor, indices: Tensor, k: int, width: int | None = None,
                        sorted: bool = False) -> "ShardTop":
        """The top k of every shard's candidates together, per row.

        values (N, c), indices (N, c): this rank's candidates (values detached for the exchange,
        indices GLOBAL latent ids); each rank pads its c to `width` columns (default c; padding never
        wins). For one shard the candidates are the selection: returned as they are (then c = k).
        """
        width = values.shape[1] if width is None else width
        if self.shard_group is None:
            return ShardTop(values, indices, None, width, 0)
        pad = width - values.shape[1]
        exchanged = values.detach()
        if pad:
            exchanged = torch.cat([exchanged, exchanged.new_full((len(values), pad), -torch.inf)], dim=1)
            indices = torch.cat([indices, indices.new_zeros(len(indices), pad)], dim=1)
        all_values, all_indices = self._all_gather_candidates(exchanged, indices)
        top = all_values.topk(k, dim=1, sorted=sorted)
        return ShardTop(top.values, all_indices.gather(1, top.indices), top.indices, width, self.shard)

    def _all_gather_candidates(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Every shard's (values (N, c), indices (N, c)) side by side, in shard order: (N, S c) each.
        One all-gather: the pair is packed into one byte tensor per rank."""
        values, indices = values.contiguous(), indices.contiguous()
        packed = torch.cat([values.view(torch.uint8), indices.view(torch.uint8)], dim=1)
        pieces = [torch.empty_like(packed) for _ in range(self.shards)]
        dist.all_gather(pieces, packed, group=self.shard_group)
        widths = [values.shape[1] * values.element_size(), indices.shape[1] * indices.element_size()]
        value_parts, index_parts = zip(*(piece.split(widths, dim=1) for piece in pieces))
        return (torch.cat([part.contiguous().view(values.dtype) for part in value_parts], dim=1),
                torch.cat([part.contiguous().view(indices.dtype) for part in index_parts], dim=1))


@dataclass
class ShardTop:
    """`ShardLayout.top_over_shards`: a row-wise top-k over all shards' candidates."""

    values: Tensor
    """(N, k) the selected values (for one shard: this rank's candidates themselves, with their gradient)."""

    indices: Tensor
    """(N, k) their global latent ids."""

    positions: Tensor | None
    """(N, k) where each winner sits among all shards' candidates side by side (shard * width + column);
    None for one shard."""

    width: int
    """Candidates per shard in the exchange."""

    shard: int

    def head(self, k: int) -> tuple[Tensor, Tensor]:
        """The first k of the selection (values, indices), (N, k) each: the top k when it was sorted."""
        if k == self.values.shape[1]:
            return self.values, self.indices
        return self.values[:, :k].contiguous(), self.indices[:, :k].contiguous()

    def local_part(self, values: Tensor, local_indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's share of the first k winners, to decode with its rows of W_dec: its candidates
        `values` (N, c, with their gradient) zeroed where they did not win, and their `local_indices`."""
        if self.positions is None:
            if k == values.shape[1]:
                return values, local_indices
            return values[:, :k].contiguous(), local_indices[:, :k].contiguous()
        positions = self.positions[:, :k]
        mine = positions // self.width == self.shard
        # winners of other shards go to a spare last column, dropped after
        columns = torch.where(mine, positions % self.width, torch.full_like(positions, self.width))
        won = torch.zeros(len(values), self.width + 1, dtype=values.dtype, device=values.device)
        won.scatter_(1, columns, 1.0)
        return values * won[:, : values.shape[1]], local_indices


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
