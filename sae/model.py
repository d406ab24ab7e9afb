"""The TopK sparse autoencoder of Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

Parameter names and the saved file layout follow EleutherAI's sparsify, so a folder saved here loads
there (`SparseCoder.load_from_disk`) and gives the same outputs:

    encoder.weight  W_enc (n_latents, d_in)     encoder.bias  b_enc (n_latents)
    W_dec           (n_latents, d_in), unit-norm rows          b_dec (d_in)

    encode:  pre = W_enc (x - b_dec) + b_enc;  keep the top k per row;  values = ReLU(top values)
    decode:  x_hat = sum_j values_j * W_dec[indices_j] + b_dec

A transcoder (`SaeConfig.transcode`; Dunefsky et al. 2024, "Transcoders find interpretable LLM feature
circuits"; sparsify's `transcode`) reads a module's input x and predicts its output y, in the same
parameters: pre = W_enc x + b_enc (no b_dec subtracted: b_dec is the output's bias), and
y_hat = sum_j values_j W_dec[indices_j] + b_dec. A skip transcoder (`skip_connection`; Paulo, Shabalin
& Belrose 2025, arXiv 2501.18823) adds a dense path, y_hat += x @ W_skip.T with W_skip (d_in, d_in), kept
whole on every rank like b_dec.

`encode`, `decode` and `forward` run on the sparse `sae_kernels` ops (Triton on CUDA, eager torch on CPU).

Two other sparsity rules share them: BatchTopK (`activation` "batchtopk", sae/batchtopk.py) keeps the k N
largest values of a batch of N tokens in training and encodes by a threshold at inference; Matryoshka
(`matryoshka` prefix sizes) adds the fvu of each prefix of the dictionary to the loss, and changes
nothing else.

An SAE imported from OpenAI's TopK SAEs (sae/formats/) also has an input transform, `input_norm`
"layer_norm": encode normalises each token x to (x - mean) / (std + 1e-5) first, and `reconstruct` maps
the reconstruction back (x_hat * std + mean). Our trainer makes SAEs without one ("none"), and `load`
reads the other tools' layouts too (sae/formats/__init__.py lists them).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

import sae_kernels
from sae_kernels import sparse_decode

from .batchtopk import FIRST_CANDIDATES_PER_K, batch_threshold, candidates_cover, keep_at_or_above
from .config import SaeConfig
from .files import TensorSpec
from .folder import fold_scales, read_sae_files, write_sae_folder
from .formats.common import INPUT_NORMS  # cfg.json names a non-default one under "input_norm"
from .parallel import ShardLayout, ShardTop

LATENT_MAJOR_PARAMETERS = ("encoder.weight", "encoder.bias", "W_dec")
"""Split by rows under latent sharding; `b_dec` is replicated."""
LAYER_NORM_EPS = 1e-5
"""Added to each token's std by `layer_norm_input` (OpenAI's and SAELens's value)."""

VarianceFn = Callable[[Tensor], Tensor]
"""Maps a batch (N, d) to sum ||t - mean_batch(t)||^2, the denominator of the normalized MSE."""

DeadMaskFn = Callable[[Tensor, Tensor], Tensor]
"""Called by `forward` with this batch's (latent_indices (N, k), latent_acts (N, k), detached): counts
them into the dead-latent statistics and returns the dead mask after this batch of this rank's
latents, (n_local,) bool."""


class ComputeWeights(NamedTuple):
    """The parameters as one forward computes with them: cast to `SparseAutoencoder.compute_dtype`
    (a cast is an autograd node, so gradients reach the float32 parameters in float32)."""

    W_enc: Tensor
    """(n_local, d_in)."""
    b_enc: Tensor
    """(n_local,)."""
    W_dec: Tensor
    """(n_local, d_in)."""
    b_dec: Tensor | None
    """(d_in,): b_dec as the encoders subtract it (`ShardLayout.b_dec_for_encoder`). One autograd node for
    the TopK and the AuxK encode, so under latent sharding its gradient is summed over the shards once.
    None for a transcoder, whose encoder subtracts nothing."""


class TopLatents(NamedTuple):
    """A row-wise top-k over every shard's latents (`SparseAutoencoder._top_over_shards`), with this
    rank's candidates it was chosen from. For one shard the candidates are the selection."""

    candidates: Tensor
    """(N, c) this rank's candidate values after ReLU, with their gradient."""
    local_indices: Tensor
    """(N, c) int64: their indices into this rank's latents."""
    over_shards: ShardTop
    """The winners among all shards' candidates."""

    def codes(self, k: int) -> tuple[Tensor, Tensor]:
        """The first k winners (values (N, k), global latent ids (N, k)): the top k when sorted."""
        return self.over_shards.head(k)

    def local_winners(self, k: int) -> tuple[Tensor, Tensor]:
        """What this rank decodes of the first k winners with its rows of W_dec: (values, local indices),
        its candidates zeroed where another shard's latent won, (N, c) each; for one shard the first k
        candidates, (N, k) each."""
        return self.over_shards.local_part(self.candidates, self.local_indices, k)


class ForwardOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns. Losses are scalars."""

    x_hat: Tensor
    """Reconstruction, (N, d_in)."""

    latent_acts: Tensor
    """Values of the top-k latents after ReLU, (N, k); under BatchTopK, (N, c) with 0 where a candidate
    was not kept (c varies by batch)."""

    latent_indices: Tensor
    """Their indices, (N, k) or (N, c) int64 (global latent ids, whatever the layout)."""

    fvu: Tensor
    """Main loss: normalized MSE, sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""

    auxk_loss: Tensor
    """AuxK loss (normalized MSE of the dead latents' reconstruction of the residual); 0 when off."""

    multi_topk_fvu: Tensor
    """Normalized MSE with the top 4k latents; 0 unless `multi_topk`."""

    prefix_fvu: Tensor
    """Matryoshka: the mean normalized MSE of the prefixes' reconstructions (`SaeConfig.matryoshka`),
    each from the selected latents below its size; 0 without prefixes."""

    loss: Tensor
    """Training objective: fvu + auxk_weight * auxk_loss + multi_topk_fvu / 8 (`SaeConfig.auxk_weight`); with
    G Matryoshka prefixes, (fvu + G prefix_fvu) / (G + 1) in place of fvu."""

    batch_threshold: Tensor | None = None
    """BatchTopK: the global batch's threshold theta_b (sae/batchtopk.py), 0-dim; None under TopK."""


def layer_norm_input(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """OpenAI's input preprocessing of TopK SAEs (openai/sparse_autoencoder, model.py `LN`; SAELens's
    normalize_activations "layer_norm" is the same), per row of x (N, d): mean mu, std sigma of x - mu
    (the unbiased one, torch.std's default), and x_n = (x - mu) / (sigma + 1e-5). Returns (x_n (N, d),
    mu (N, 1), sigma (N, 1)); a reconstruction x_hat_n of x_n maps back as x_hat_n * sigma + mu, without
    the eps, as there."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + LAYER_NORM_EPS), mean, std


def batch_variance(x: Tensor) -> Tensor:
    """sum ||x - mean_batch(x)||^2 over the rows of x (N, d)."""
    return (x - x.mean(0)).pow(2).sum()


def normalized_mse(target: Tensor, prediction: Tensor, variance: VarianceFn = batch_variance) -> Tensor:
    """sum ||target - prediction||^2 / variance(target): the fraction of variance unexplained.

    `variance` computes sum ||t - mean_batch(t)||^2; data-parallel training passes one that covers
    the global batch, so each rank's share of the loss sums to the single-process loss.
    """
    return (target - prediction).pow(2).sum() / variance(target)


def fire_counts(values: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """(n_latents,) int64 on the CPU: on how many rows of a TopK code, values and indices (N, k), each
    latent fires (its value > 0; a selected latent whose ReLU output is 0 does not fire)."""
    return torch.bincount(indices[values > 0].cpu(), minlength=n_latents)


@torch.no_grad()
def normalize_rows_(matrix: Tensor) -> Tensor:
    """Scale each row of `matrix` (n, d) to unit norm, in place (a zero row stays zero)."""
    return matrix.div_(matrix.norm(dim=1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).eps))


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Point minimising the sum of Euclidean distances to `points` (N, d), by Weiszfeld's algorithm.

    Gao et al. initialise b_dec to the geometric median of a batch of activations.
    """
    points = points.double()
    median = points.mean(0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1 / distances
        new_median = (weights[:, None] * points).sum(0) / weights.sum()
        converged = (new_median - median).norm() <= tol * median.norm().clamp_min(1e-12)
        median = new_median
        if converged:
            break
    return median


class SparseAutoencoder(nn.Module):
    """TopK SAE with AuxK and optional Multi-TopK losses. See the module docstring for the math.

    `layout` (default: a process alone) says which latents this rank holds: the rows
    `layout.latent_range(n_latents)` of encoder.weight, encoder.bias and W_dec (all of them unless
    the latents are sharded), and b_dec. The forward is the same code for every layout; under
    latent sharding it is collective over the shard group (sae/parallel.py) and equals the whole
    SAE's forward up to floating-point summation order.
    """

    def __init__(self, cfg: SaeConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 layout: ShardLayout | None = None, compute_dtype: torch.dtype | None = None, input_norm: str = "none"):
        super().__init__()
        self.compute_dtype = compute_dtype
        """Dtype of the training forward's matmuls and kernel inputs (None: the parameters' dtype). With
        bfloat16 the parameters, their gradients, the optimiser state and the losses stay float32
        (mixed precision); `encode` and `decode` (evaluation) always use the parameters as stored."""
        if cfg.d_in <= 0:
            raise ValueError(f"SaeConfig.d_in must be positive to build an SAE, got {cfg.d_in}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {list(INPUT_NORMS)}, got {input_norm!r}")
        self.input_norm = input_norm
        """The input transform of `encode` and `reconstruct`: "none", or "layer_norm" (`layer_norm_input`,
        SAEs imported from OpenAI's TopK SAEs). Such an SAE is for evaluation only: `forward` (training)
        and `decode` (which has no token statistics to map back with) refuse it."""
        self.cfg = cfg
        self.layout = layout or ShardLayout()
        self.latent_start, self.latent_stop = self.layout.latent_range(cfg.n_latents)
        self.n_local = self.latent_stop - self.latent_start
        # skip_init: the RNG is drawn in reset_parameters only, the same way for every layout
        self.encoder = nn.utils.skip_init(nn.Linear, cfg.d_in, self.n_local, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(self.n_local, cfg.d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.W_skip = (nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device, dtype=dtype))
                       if cfg.skip_connection else None)
        """(d_out, d_in) = (d_in, d_in), a skip transcoder's dense path; None otherwise."""
        self.threshold = (nn.Parameter(torch.zeros((), device=device, dtype=dtype), requires_grad=False)
                          if cfg.activation == "batchtopk" else None)
        """BatchTopK's running threshold theta (0-dim, no gradient: training sets it, sae/batchtopk.py),
        which `encode` uses; None under TopK. Whole on every rank, like b_dec."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows random unit vectors; encoder tied to the decoder; biases zero (Gao et al. §2).

        The init is drawn from the CPU generator (`torch.manual_seed`) whatever the device and the
        layout, and each rank keeps its rows: a shard equals the slice of a single process's SAE, and
        a run starts from the same SAE on a GPU as on the CPU. The whole (n_latents, d_in) draw is in
        host memory, transient, freed before any gradient or optimiser state exists (torch's
        generators cannot skip ahead to a row); a device only ever holds its rows. The two uniform
        draws first are an nn.Linear encoder's own init, discarded: they leave the RNG stream where
        building the encoder with nn.Linear leaves it, so a seed draws the same SAE as with one."""
        if self.device.type == "meta":  # shapes only, to be loaded with `assign=True`: nothing to draw
            return
        n_latents, d_in = self.cfg.n_latents, self.cfg.d_in
        full = torch.empty(n_latents, d_in, dtype=self.dtype)
        full.uniform_()  # nn.Linear's weight init
        torch.empty(n_latents, dtype=self.dtype).uniform_()  # and its bias init
        full.normal_()
        self.W_dec.copy_(normalize_rows_(full[self.latent_start : self.latent_stop]))
        del full
        self.encoder.weight.copy_(self.W_dec)
        self.encoder.bias.zero_()
        self.b_dec.zero_()
        if self.cfg.transcode and not self.cfg.normalize_decoder:  # sparsify's transcoder: a zero decoder
            self.W_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()
        if self.threshold is not None:
            self.threshold.zero_()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # ---- the forward pass -------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k latents of `x` (N, d_in), raw activations (normalised here if `input_norm` says so):
        (values (N, k) after ReLU, indices (N, k) int64). A whole SAE's."""
        self._check_whole("encode")
        if self.input_norm == "layer_norm":
            x = layer_norm_input(x.to(self.dtype))[0]
        return self._encode_normalized(x)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction (N, d_in) from top-k `values` and `indices`, both (N, k). A whole SAE's.
        With an input transform the raw reconstruction needs each token's statistics: use `reconstruct`."""
        self._check_whole("decode")
        if self.input_norm != "none":
            raise ValueError(f"decode of an SAE with input_norm {self.input_norm!r} would be in normalised units; "
                             "use reconstruct(x), which maps it back with each token's mean and std")
        return self._decode_normalized(values, indices)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_hat (N, d_in) in the units of `x`, values (N, k), indices (N, k)) for raw activations x (N, d_in):
        `encode`, decode, and with input_norm "layer_norm" x_hat_n * std + mean with each token's own
        statistics (`layer_norm_input`). For a transcoder, x is the module's input and x_hat the predicted
        output (with the skip path, if any). A whole SAE's."""
        self._check_whole("reconstruct")
        if self.input_norm == "none":
            values, indices = self._encode_normalized(x)
            return self._decode_normalized(values, indices) + self.skip(x), values, indices
        normalized, mean, std = layer_norm_input(x.to(self.dtype))
        values, indices = self._encode_normalized(normalized)
        return self._decode_normalized(values, indices) * std + mean, values, indices

    def output_scale(self, x: Tensor) -> Tensor:
        """(N, 1): what a decoder row's contribution is multiplied by in the raw units of x (N, d_in):
        each token's std under input_norm "layer_norm", else 1. Latent j's share of `reconstruct(x)[0]`
        is value_j * W_dec[j] * output_scale(x) (the ablation of eval/ablation.py removes it)."""
        if self.input_norm == "layer_norm":
            return layer_norm_input(x.to(self.dtype))[2]
        return torch.ones(x.shape[0], 1, dtype=self.dtype, device=x.device)

    def skip(self, x: Tensor) -> Tensor | float:
        """A skip transcoder's dense path x @ W_skip.T (N, d_in) for inputs x (N, d_in); 0 without one."""
        return 0.0 if self.W_skip is None else x.to(self.W_skip.dtype) @ self.W_skip.T

    def _encode_normalized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`encode` of an input already transformed by `input_norm`. BatchTopK: every latent at or above
        the running threshold, (N, c) with zeros, c as wide as the row with the most needs."""
        b_dec = None if self.cfg.transcode else self.b_dec
        if self.threshold is None:
            return sae_kernels.topk_encode(x, self.encoder.weight, self.encoder.bias, self.cfg.k, b_dec=b_dec)
        weights = ComputeWeights(self.encoder.weight, self.encoder.bias, self.W_dec, b_dec)
        top, _ = self._top_at_threshold(x, weights, self.threshold)
        return top.codes(top.over_shards.values.shape[1])

    def _decode_normalized(self, values: Tensor, indices: Tensor) -> Tensor:
        """The reconstruction in the units `encode` works in (normalised ones under an input transform)."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | DeadMaskFn | None = None, variance: VarianceFn | None = None,
                target: Tensor | None = None) -> ForwardOutput:
        """The training forward of a batch `x` (N, d_in), on the `sae_kernels` ops (below for an SAE; a
        transcoder's differ as the module docstring says: its encoder reads x without b_dec, and x_hat,
        the fvu and AuxK's residual are of `target` (N, d_in), the module's output, which it must be given):

            encode, top-k  pre = W_enc (x - b_dec) + b_enc; the top k per row (Multi-TopK: the top 4k,
                           sorted, whose first k are the TopK selection); ReLU
            dead latents   `dead_mask`, if a function, counts this selection into the dead-latent statistics
            decode         x_hat = sum_j values_j W_dec[index_j] + b_dec
            fvu            normalized_mse(x, x_hat)
            AuxK           the normalized MSE of the top-k_aux dead latents' reconstruction of x - x_hat
            Multi-TopK     the normalized MSE of the top-4k reconstruction
            loss           fvu + cfg.auxk_weight * AuxK + Multi-TopK / 8

        dead_mask: this rank's latents the AuxK loss may use, (n_local,) bool; or a `DeadMaskFn`,
        called with this batch's TopK selection before AuxK, that counts it into the dead-latent
        statistics and returns the mask after them. Training passes the function, so a latent that
        fires in this batch is not trained as dead on it (the order of OpenAI's reference). None, or
        no dead latent, turns AuxK off.
        variance: the normalized MSEs' denominator (see `normalized_mse`); by default the global
        batch's, which for one replica is the batch's own (`batch_variance`).

        One code path for every layout. The steps that involve other ranks are named for what they do
        over the shard group, and for one shard they are the identity: `_top_over_shards` (the
        candidates are the selection), `_decode_over_shards` (the sum of one part) and the dead count
        in `_auxk_loss` (this rank's own). Under latent sharding every rank of the shard group returns
        the same output; latent_indices are global latent ids, and the losses are this replica's share
        of the global batch's.
        """
        self._check_trainable()
        cfg = self.cfg
        if (target is None) == cfg.transcode:
            raise ValueError("a transcoder's forward needs the module's output as target" if cfg.transcode
                             else "an SAE reconstructs its input: no target")
        x = x.to(self.dtype)  # the losses are in the parameters' dtype
        y = x if target is None else target.to(self.dtype)
        if variance is None:
            variance = self._global_batch_variance()
        weights = self._compute_weights()
        x_in = x.to(weights.W_enc.dtype)  # the kernels' inputs, in the compute dtype

        n_top = min(4 * cfg.k, cfg.n_latents) if cfg.multi_topk else cfg.k
        batch_threshold = None
        if self.threshold is None:
            candidates = sae_kernels.topk_encode(x_in, weights.W_enc, weights.b_enc, min(n_top, self.n_local),
                                                 b_dec=weights.b_dec, sorted=cfg.multi_topk)  # among this rank's latents
            top = self._top_over_shards(*candidates, n_top, sorted=cfg.multi_topk)
            n_codes = cfg.k
        else:
            top, batch_threshold = self._top_at_threshold(x_in, weights)
            n_codes = top.over_shards.values.shape[1]
        latent_acts, latent_indices = top.codes(n_codes)
        if callable(dead_mask):
            dead_mask = dead_mask(latent_indices, latent_acts.detach())

        dense = self.b_dec + self.skip(x)  # the same on every shard
        x_hat = self._decode_over_shards(weights, top, n_codes) + dense
        fvu = normalized_mse(y, x_hat, variance)
        zero = fvu.new_zeros(())

        auxk_loss = zero
        if dead_mask is not None and cfg.auxk_weight > 0:
            auxk_loss = self._auxk_loss(weights, x_in, (y - x_hat).detach(), dead_mask, variance)

        multi_topk_fvu = zero
        if cfg.multi_topk:
            multi_topk_fvu = normalized_mse(y, self._decode_over_shards(weights, top, n_top) + dense, variance)

        reconstruction, prefix_fvu = fvu, zero
        if cfg.matryoshka:
            prefix_fvus = [normalized_mse(y, self._decode_over_shards(weights, top, n_codes, below=size) + dense, variance)
                           for size in cfg.matryoshka]
            prefix_fvu = torch.stack(prefix_fvus).mean()
            reconstruction = (fvu + sum(prefix_fvus)) / (len(prefix_fvus) + 1)

        loss = reconstruction + cfg.auxk_weight * auxk_loss + multi_topk_fvu / 8
        return ForwardOutput(x_hat, latent_acts, latent_indices, fvu, auxk_loss, multi_topk_fvu, prefix_fvu, loss,
                             batch_threshold)

    def _top_at_threshold(self, x: Tensor, weights: ComputeWeights,
                          threshold: Tensor | None = None) -> tuple[TopLatents, Tensor]:
        """BatchTopK's selection (sae/batchtopk.py) of `x` (N, d_in), in the dtype of `weights`: every
        shard's candidates, all of them winners, with those below the threshold set to 0; and the
        threshold. `threshold` None (training): the global batch's theta_b; else that one (inference,
        the running theta). The candidates widen until they hold every value that reaches it.
        Collective over every rank."""
        width = min(FIRST_CANDIDATES_PER_K * self.cfg.k, self.n_local)
        while True:
            values, local_indices = sae_kernels.topk_encode(x, weights.W_enc, weights.b_enc, width,
                                                            b_dec=weights.b_dec, sorted=True)
            everyone = self.layout.top_over_shards(values, local_indices + self.latent_start,
                                                   width * self.layout.shards, sorted=True)
            reached = batch_threshold(everyone.values, self.cfg.k, self.layout) if threshold is None else threshold
            if candidates_cover(values, reached, self.n_local, self.layout):
                break
            width = min(2 * width, self.n_local)
        kept = keep_at_or_above(values, reached)
        if everyone.positions is None:  # one shard: the candidates themselves, with their gradient
            everyone = replace(everyone, values=kept)
        else:
            everyone = replace(everyone, values=keep_at_or_above(everyone.values, reached))
        return TopLatents(kept, local_indices, everyone), reached

    def _auxk_loss(self, weights: ComputeWeights, x: Tensor, residual: Tensor, dead_mask: Tensor,
                   variance: VarianceFn) -> Tensor:
        """AuxK (Gao et al. §2.4): the normalized MSE of the top-k_aux dead latents' reconstruction of
        the residual `x - x_hat` (detached), k_aux = min(cfg.k_aux, dead latents); 0 when none is dead.
        `x` (N, d_in) in the compute dtype, `dead_mask` (n_local,) this rank's dead latents."""
        if dead_mask.shape != (self.n_local,):
            raise ValueError(f"dead_mask must have shape ({self.n_local},), got {tuple(dead_mask.shape)}")
        dead_latents = dead_mask.nonzero().squeeze(1)
        n_dead, most_dead_on_one_shard = self.layout.total_over_shards(dead_latents.new_tensor(dead_latents.numel()))
        k_aux = min(self.cfg.k_aux, n_dead)
        if k_aux == 0:
            return x.new_zeros(())
        # Each shard sends min(k_aux, its dead) real candidates (padded to a common width): at least
        # k_aux real ones in all, and every global winner is among them.
        width = min(k_aux, most_dead_on_one_shard)
        top = self._top_over_shards(*self.encode_among(x, dead_latents, width, weights), k_aux, width=width)
        if variance is batch_variance and self.layout.shards == 1:  # fused decode and error (the batch's variance)
            return sae_kernels.auxk_loss(*top.local_winners(k_aux), weights.W_dec, residual).to(self.dtype)
        loss = normalized_mse(residual, self._decode_over_shards(weights, top, k_aux), variance)
        return torch.where(loss.isnan(), torch.zeros_like(loss), loss)

    def _top_over_shards(self, values: Tensor, local_indices: Tensor, k: int, width: int | None = None,
                         sorted: bool = False) -> TopLatents:
        """The top k per row among every shard's candidates, from this rank's: `values` (N, c) after
        ReLU, with their gradient, and their `local_indices` (N, c) into this rank's latents
        (`ShardLayout.top_over_shards`, padded to `width`; for one shard the candidates themselves)."""
        top = self.layout.top_over_shards(values, local_indices + self.latent_start, k, width=width, sorted=sorted)
        return TopLatents(values, local_indices, top)

    def _decode_over_shards(self, weights: ComputeWeights, top: TopLatents, k: int, below: int | None = None) -> Tensor:
        """sum_j values_j W_dec[index_j] over the first k winners of `top` (N, d_in), without b_dec, in
        the parameters' dtype (the kernels accumulate in float32 whatever their inputs): each rank
        decodes its own winners with its rows of W_dec and the parts are summed over the shard group.
        `below`: only the winners whose global latent id is below it (a Matryoshka prefix)."""
        values, local_indices = top.local_winners(k)
        if below is not None:
            values = torch.where(local_indices + self.latent_start < below, values, values.new_zeros(()))
        return self.layout.sum_reconstructions(sparse_decode(values, local_indices, weights.W_dec).to(self.dtype))

    def _global_batch_variance(self) -> VarianceFn:
        """The normalized MSEs' default denominator: over the global batch (`ShardLayout.variance`, an
        all-reduce over the replicas), which for one replica is the batch's own, `batch_variance`."""
        return batch_variance if self.layout.replicas == 1 else self.layout.variance

    def _compute_weights(self) -> ComputeWeights:
        dtype = self.compute_dtype or self.dtype
        W_enc, b_enc, W_dec = self.encoder.weight.to(dtype), self.encoder.bias.to(dtype), self.W_dec.to(dtype)
        if self.cfg.transcode:  # its encoder reads x as it is
            return ComputeWeights(W_enc, b_enc, W_dec, None)
        return ComputeWeights(W_enc, b_enc, W_dec, self.layout.b_dec_for_encoder(self.b_dec).to(dtype))

    def _check_trainable(self) -> None:
        if self.input_norm != "none":
            raise ValueError(f"this SAE has input_norm {self.input_norm!r} (imported): training it is not supported, "
                             "and its reconstruction is reconstruct(x)")

    def encode_among(self, x: Tensor, latents: Tensor, k: int,
                     weights: ComputeWeights | None = None) -> tuple[Tensor, Tensor]:
        """The top min(k, len(latents)) of each row of `x` (N, d_in) among this rank's `latents` (n,)
        int64 only: (values (N, k') after ReLU, indices (N, k') int64 into this rank's latents). The
        pre-activations of the other latents are never computed: the cost is len(latents) / n_local
        of `encode`'s. `weights`: the forward's (default: the parameters as stored)."""
        if latents.numel() == 0 or k == 0:
            return x.new_zeros(len(x), 0), latents.new_zeros(len(x), 0)
        if weights is None:
            weights = ComputeWeights(self.encoder.weight, self.encoder.bias, self.W_dec,
                                     None if self.cfg.transcode else self.b_dec)
        values, local = sae_kernels.topk_encode(
            x, weights.W_enc.index_select(0, latents), weights.b_enc.index_select(0, latents), min(k, latents.numel()),
            b_dec=weights.b_dec,
        )
        return values, latents[local]

    def _check_whole(self, what: str) -> None:
        if self.n_local != self.cfg.n_latents:
            raise ValueError(f"{what} needs the whole SAE; this rank holds latents [{self.latent_start}, "
                             f"{self.latent_stop}) of {self.cfg.n_latents} (use forward, or gather it: full_state)")

    # ---- decoder constraint -------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the tangent space of the unit sphere."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    # ---- saving and loading -------------------------------------------------------------------

    @torch.no_grad()
    def folded_state_dict(self, input_scale: float = 1.0, output_scale: float | None = None) -> dict[str, Tensor]:
        """Parameters for raw inputs, when this SAE was trained on inputs multiplied by `input_scale` (and
        a transcoder on targets multiplied by `output_scale`, default the same: `fold_scales`); new
        tensors, never the parameters themselves."""
        return {name: fold_scales(name, tensor.detach().clone(), input_scale, output_scale)
                for name, tensor in self.state_dict().items()}

    @torch.no_grad()
    def folded(self, input_scale: float, output_scale: float | None = None) -> "SparseAutoencoder":
        """A copy that takes raw activations, when this SAE was trained on inputs times `input_scale`
        (a transcoder: and targets times `output_scale`)."""
        self._check_foldable(input_scale)
        copy = type(self)(self.cfg, device=self.device, dtype=self.dtype, input_norm=self.input_norm)
        copy.load_state_dict(self.folded_state_dict(input_scale, output_scale))
        return copy

    def _check_foldable(self, input_scale: float) -> None:
        if self.input_norm != "none" and input_scale != 1:  # the eps of layer_norm_input does not scale with x
            raise ValueError(f"cannot fold an input scale into an SAE with input_norm {self.input_norm!r}")

    def save(self, path: str | Path, input_scale: float = 1.0, metadata: dict[str, Any] | None = None,
             output_scale: float | None = None) -> Path:
        """Write path/cfg.json and path/sae.safetensors (each written to a temp file, then renamed).

        input_scale: the factor the training inputs were multiplied by (a transcoder's targets: by
        output_scale, default the same); folded into the weights so the saved SAE takes raw activations.
        metadata: extra cfg.json keys (model, hookpoint, provenance).
        """
        self._check_foldable(input_scale)
        tensors = self.folded_state_dict(input_scale, output_scale)
        specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
        return write_sae_folder(path, self.cfg, specs, tensors.values(), input_scale, metadata, self.input_norm,
                                output_scale)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "SparseAutoencoder":
        """Load an SAE from `path`, in whichever layout it is (told apart by its files): a folder written
        by `save` or by sparsify's `SparseCoder.save_to_disk`, a SAELens TopK folder (or a JumpReLU one with one
        threshold: BatchTopK), an OpenAI TopK state
        dict, dictionary_learning's AutoEncoderTopK ae.pt (sae/formats/). Never unpickles: torch files
        are read with weights_only=True.

        An SAE whose math this SAE does not implement is refused with a UsageError naming the key that
        says so (sparsify's: sae/formats/sparsify.py `SPARSIFY_KEY_RULES`, checked before any weights are
        read; the other tools': their sae/formats/ modules); an unknown layout is refused naming what is
        there and the known ones; weights with NaN or inf values are refused naming the file and the
        tensors (`read_sae_files`).
        dtype: default the stored one (SAELens: its cfg.json's, which SAELens computes in).
        `path` may be on the Hugging Face Hub: hf://OWNER/REPO[/SUBFOLDER][@REVISION], fetched into (or, with
        HF_HUB_OFFLINE=1, read from) huggingface_hub's cache (sae/hub.py).
        """
        from .hub import resolve_sae_path  # here: sae.hub reads sae.formats, which import this module

        files = read_sae_files(resolve_sae_path(path))
        return cls.from_state_dict(files.cfg, files.tensors, device, dtype, files.input_norm)

    @classmethod
    def from_state_dict(cls, cfg: SaeConfig, tensors: dict[str, Tensor], device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, input_norm: str = "none") -> "SparseAutoencoder":
        """A whole SAE with the parameters `tensors` (`PARAMETER_NAMES`, in the shapes `cfg` implies), in
        `dtype` (default theirs)."""
        sae = cls(cfg, device=device, dtype=dtype or tensors["W_dec"].dtype, input_norm=input_norm)
        sae.load_state_dict(tensors)
        return sae
