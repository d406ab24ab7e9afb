"""`evaluate`: reconstruction, sparsity and downstream loss of SAEs on held-out token windows.

Per batch of windows: one LM forward in which the hookpoint's output (positions >= 1) is replaced by
each variant at once (eval/splice.py): clean, zero, mean, and every SAE's reconstruction. Before that,
one pass up to the hookpoint computes the layer's mean activation over the same tokens (the mean-
ablation variant, and the centre for fvu).

Token hygiene (sae/hygiene.py), as the SAE was trained: the positions of `excluded_token_ids`, and with
`outlier_norm_ratio` those whose activation norm exceeds that many times the median over the eval's
text, keep their clean activations in every variant and are left out of the reconstruction metrics and
the mean; the loss is still scored at every position >= 1.

    from eval import evaluate
    report = evaluate(sae, model, tokens, hookpoint="transformer.h.8")   # tokens (n_windows, ctx_len)
    report["ce_recovered"], report["fvu"], report["l0"]
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae.activations import capture_many, get_module, get_site
from sae.config import TrainConfig
from sae.errors import UsageError
from sae.hygiene import excluded_ids, norm_keep_mask, token_keep_mask
from sae.model import SparseAutoencoder

from .data import held_out_windows
from .downstream import LossStats, recovered
from .reconstruction import ReconstructionStats
from .splice import SpliceMode, SpliceRunner

# Variants before the SAEs' in every forward: 0 clean, 1 zero ablation, 2 mean ablation.
_CLEAN, _ZERO, _MEAN = 0, 1, 2


@torch.no_grad()
def activation_means(model: nn.Module, sites: list[str], tokens: Tensor, batch_windows: int = 16,
                     start: int = 1, kept: "KeptPositions | None" = None) -> list[Tensor]:
    """Mean of each site's activations (a hookpoint's output; HOOKPOINT:input, its module's input) over all
    windows and positions >= start (that `kept` keeps, given one for the first site), (d,) float64 each,
    from one LM forward per batch."""
    hooked = [get_site(model, site) for site in sites]
    device = next(model.parameters()).device
    totals, count = None, 0
    for first in range(0, len(tokens), batch_windows):
        input_ids = tokens[first : first + batch_windows].to(device)
        batch = [acts[:, start:] for acts in capture_many(model, hooked, input_ids)]
        mask = kept.mask(input_ids, batch[0]) if kept is not None else None
        rows = [acts.flatten(0, 1) if mask is None else acts[mask] for acts in batch]
        sums = [acts.double().sum(0) for acts in rows]
        totals = sums if totals is None else [total + part for total, part in zip(totals, sums)]
        count += len(rows[0])
    if totals is None:
        raise ValueError("no token windows to evaluate")
    if count == 0:
        raise UsageError("token hygiene leaves no position of the eval text (all special tokens or outlier norms)")
    return [total / count for total in totals]


def activation_mean(model: nn.Module, hookpoint: str, tokens: Tensor, batch_windows: int = 16, start: int = 1,
                    kept: "KeptPositions | None" = None) -> Tensor:
    """Mean of the hookpoint's output over all windows and positions >= start (that `kept` keeps), (d,) float64."""
    return activation_means(model, [hookpoint], tokens, batch_windows, start, kept)[0]


class KeptPositions:
    """Which positions >= start of a batch token hygiene keeps: not a token of `excluded_token_ids`, and with
    `outlier_norm_ratio`, an activation norm at most that many times `median_norm` (of the eval's text:
    `median_activation_norm`). `mask` is None when nothing is ever excluded, so such an eval is exactly
    the eval without hygiene."""

    def __init__(self, excluded_token_ids: list[int], outlier_norm_ratio: float = 0.0,
                 median_norm: Tensor | None = None, start: int = 1):
        if outlier_norm_ratio > 0 and median_norm is None:
            raise ValueError("an outlier_norm_ratio needs the median norm of the eval's text")
        self.excluded_token_ids = list(excluded_token_ids)
        self.outlier_norm_ratio = outlier_norm_ratio
        self.median_norm = median_norm
        self.start = start

    @property
    def excludes_anything(self) -> bool:
        return bool(self.excluded_token_ids) or self.outlier_norm_ratio > 0

    def mask(self, input_ids: Tensor, acts: Tensor) -> Tensor | None:
        """(B, T - start) bool for input_ids (B, T) and the hookpoint's activations there, acts
        (B, T - start, d); None when nothing is excluded."""
        if not self.excludes_anything:
            return None
        keep = token_keep_mask(input_ids[:, self.start :].to(acts.device), self.excluded_token_ids).flatten()
        medians = None if self.median_norm is None else [self.median_norm]
        keep = norm_keep_mask([acts.flatten(0, 1)], keep, self.outlier_norm_ratio, medians)
        return keep.view(acts.shape[:2])


@torch.no_grad()
def median_activation_norm(model: nn.Module, hookpoint: str, tokens: Tensor, excluded_token_ids: list[int],
                           batch_windows: int = 16, start: int = 1) -> Tensor:
    """The median norm of the hookpoint's output over the eval's positions >= start, those of
    `excluded_token_ids` left out: what an outlier norm is measured against (0-dim float32)."""
    site, device = get_site(model, hookpoint), next(model.parameters()).device
    norms = []
    for first in range(0, len(tokens), batch_windows):
        input_ids = tokens[first : first + batch_windows].to(device)
        acts = capture_many(model, [site], input_ids)[0][:, start:].flatten(0, 1)
        keep = token_keep_mask(input_ids[:, start:].flatten(), excluded_token_ids)
        norms.append(acts[keep].float().norm(dim=-1).cpu())
    norms = torch.cat(norms)
    return norms.median() if norms.numel() else torch.zeros(())


def kept_positions(model: nn.Module, hookpoint: str, tokens: Tensor, excluded_token_ids: list[int],
                   outlier_norm_ratio: float, batch_windows: int = 16) -> KeptPositions:
    """The `KeptPositions` of an eval on `tokens` at `hookpoint` with this hygiene (the median norm
    measured here when `outlier_norm_ratio` asks for it)."""
    median = (median_activation_norm(model, hookpoint, tokens, excluded_token_ids, batch_windows)
              if outlier_norm_ratio > 0 else None)
    return KeptPositions(excluded_token_ids, outlier_norm_ratio, median)


def _keep_clean(replace, batch: "_Batch"):
    """`replace` (a splice Replacement) with the positions hygiene excludes given back their clean values."""
    def replaced(acts: Tensor) -> Tensor:
        new = replace(acts)
        return new if batch.mask is None else torch.where(batch.mask[..., None], new, acts)

    return replaced


class _Batch:
    """The hygiene mask of the batch in flight, (B, T - start) or None: set by the first replacement to
    run (it sees the clean activations), read by the others."""

    def __init__(self, kept: KeptPositions):
        self.kept = kept
        self.input_ids: Tensor | None = None
        self.mask: Tensor | None = None

    def clean(self, acts: Tensor) -> Tensor:
        """The clean variant (`acts` unchanged), which also computes this batch's mask from them."""
        self.mask = self.kept.mask(self.input_ids, acts)
        return acts


class _SaeSplice:
    """Replacement for one SAE: encode + decode the activations, keeping the last batch's codes. A
    transcoder's replaces the module's output by its prediction from the module's input (`runner`'s
    clean input of the same batch), and its reconstruction statistics compare that with the output."""

    def __init__(self, sae: SparseAutoencoder, runner: SpliceRunner, batch: _Batch):
        self.sae = sae
        self.runner = runner
        self.batch = batch
        self.last: tuple[Tensor, ...] | None = None

    def __call__(self, acts: Tensor) -> Tensor:
        mask = self.batch.mask
        x = self.runner.sae_input(acts, self.sae.cfg.transcode)
        target, x = (rows.flatten(0, 1) if mask is None else rows[mask] for rows in (acts, x))
        x_hat, values, indices = self.sae.reconstruct(x.to(self.sae.dtype))  # raw units, whatever the SAE's transform
        self.last = (target.to(self.sae.dtype), x_hat, values, indices)  # overwritten, never accumulated: see splice.Replacement
        if mask is None:
            return x_hat.to(acts.dtype).view_as(acts)
        spliced = acts.clone()  # the excluded positions keep their clean activations
        spliced[mask] = x_hat.to(acts.dtype)
        return spliced


@torch.no_grad()
def evaluate_many(
    saes: Mapping[str, SparseAutoencoder],
    model: nn.Module,
    tokens: Tensor,
    hookpoint: str,
    batch_windows: int = 16,
    splice_mode: SpliceMode = "auto",
    progress: bool = False,
    excluded_token_ids: list[int] | None = None,
    outlier_norm_ratio: float = 0.0,
) -> dict[str, dict]:
    """Evaluate several SAEs on the same hookpoint and tokens (n_windows, ctx_len); one report each.

    Token hygiene (the module docstring): `excluded_token_ids` (None or []: none) and `outlier_norm_ratio`
    (0: off), as the SAEs were trained (`sae.hygiene.excluded_ids`); `tokens` counts the positions kept.

    SAEs take raw activations (as saved); a transcoder at `hookpoint` (a module) reads its input and
    replaces its output, and its fvu is of that output. Each report has nmse, fvu, mse, l0, never_fired_frac,
    never_fired_tokens, density_histogram (eval/reconstruction.py), ce_clean, ce_sae, ce_zero,
    ce_mean, ce_recovered, ce_recovered_mean, delta_ce, kl (eval/downstream.py), and the counts
    `tokens` (activations reconstructed) and `ce_positions` (predictions scored). `splice_mode` is for tests; see splice.py.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (n_windows, ctx_len), got shape {tuple(tokens.shape)}")
    if not saes:
        raise ValueError("no SAEs to evaluate")
    module = get_module(model, hookpoint)
    device = next(model.parameters()).device
    kept = kept_positions(model, hookpoint, tokens, excluded_token_ids or [], outlier_norm_ratio, batch_windows)
    mean = activation_mean(model, hookpoint, tokens, batch_windows, kept=kept)
    d_model = mean.numel()
    for name, sae in saes.items():
        if sae.cfg.d_in != d_model:
            raise UsageError(f"SAE '{name}' takes d_in={sae.cfg.d_in}, but {hookpoint} outputs {d_model} features")
    model_dtype = next(model.parameters()).dtype
    mean_activation = mean.to(device=device, dtype=model_dtype)
    runner = SpliceRunner(model, module, start=1, mode=splice_mode)
    batch = _Batch(kept)
    splices = {name: _SaeSplice(sae.to(device).eval(), runner, batch) for name, sae in saes.items()}
    replacements = [batch.clean, _keep_clean(torch.zeros_like, batch),
                    _keep_clean(lambda acts: mean_activation.expand_as(acts), batch), *splices.values()]
    losses = LossStats(len(replacements), start=1)
    reconstruction = {name: ReconstructionStats(sae.cfg.n_latents, mean) for name, sae in saes.items()}

    for first in tqdm(range(0, len(tokens), batch_windows), desc="eval", unit="batch", disable=not progress):
        input_ids = tokens[first : first + batch_windows].to(device)
        batch.input_ids = input_ids
        logits = runner.logits(input_ids, replacements)
        losses.update(logits, input_ids)
        for name, splice in splices.items():
            reconstruction[name].update(*splice.last)

    ce, kl = losses.mean_ce(), losses.mean_kl()
    reports = {}
    for position, name in enumerate(splices, start=len(replacements) - len(splices)):
        ce_sae = ce[position]
        summary = reconstruction[name].summary()
        histogram = summary.pop("density_histogram")
        reports[name] = {
            **summary,
            "ce_clean": ce[_CLEAN],
            "ce_sae": ce_sae,
            "ce_zero": ce[_ZERO],
            "ce_mean": ce[_MEAN],
            "ce_recovered": recovered(ce[_ZERO], ce_sae, ce[_CLEAN]),
            "ce_recovered_mean": recovered(ce[_MEAN], ce_sae, ce[_CLEAN]),
            "delta_ce": ce_sae - ce[_CLEAN],
            "kl": kl[position],
            "tokens": reconstruction[name].tokens,
            "ce_positions": losses.positions,
            "density_histogram": histogram,
        }
    return reports


def evaluate(sae: SparseAutoencoder, model: nn.Module, tokens: Tensor, hookpoint: str, **options) -> dict:
    """One SAE's report; see `evaluate_many` for the keys and options."""
    return evaluate_many({"sae": sae}, model, tokens, hookpoint, **options)["sae"]


# Keys of the report the trainer logs during training (as eval/KEY).
TRAINING_EVAL_KEYS = ("fvu", "nmse", "l0", "never_fired_frac", "never_fired_tokens", "dense_frac", "ce_clean", "ce_sae",
                      "ce_recovered", "ce_recovered_mean", "delta_ce", "kl")


def training_evaluator(cfg: TrainConfig, model: nn.Module, tokenizer) -> Callable[[SparseAutoencoder, float, str], dict[str, float]]:
    """The held-out eval a training run `cfg` logs every `eval_every` steps,
    for `sae.trainer.train(cfg, evaluator=training_evaluator)`: the held-out windows are read once,
    here; the returned function scores an SAE trained on inputs times `input_scale` at `hookpoint`
    and gives {"eval/KEY": value} for TRAINING_EVAL_KEYS."""
    windows, _ = held_out_windows(cfg.data, tokenizer, cfg.eval_tokens, cfg.eval_split)
    excluded = excluded_ids(tokenizer, cfg.data.exclude_special_tokens)

    def score(sae: SparseAutoencoder, input_scale: float, hookpoint: str) -> dict[str, float]:
        report = evaluate(sae.folded(input_scale), model, windows, hookpoint, batch_windows=cfg.data.lm_batch_windows,
                          excluded_token_ids=excluded, outlier_norm_ratio=cfg.data.outlier_norm_ratio)
        return {f"eval/{key}": report[key] for key in TRAINING_EVAL_KEYS}

    return score
