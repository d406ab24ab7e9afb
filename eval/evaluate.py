"""`evaluate`: reconstruction, sparsity and downstream loss of SAEs on held-out token windows.

Per batch of windows: one LM forward in which the hookpoint's output (positions >= 1) is replaced by
each variant at once (eval/splice.py): clean, zero, mean, and every SAE's reconstruction. Before that,
one pass up to the hookpoint computes the layer's mean activation over the same tokens (the mean-
ablation variant, and the centre for fvu).

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
from sae.model import SparseAutoencoder

from .data import held_out_windows
from .downstream import LossStats, recovered
from .reconstruction import ReconstructionStats
from .splice import SpliceMode, SpliceRunner

# Variants before the SAEs' in every forward: 0 clean, 1 zero ablation, 2 mean ablation.
_CLEAN, _ZERO, _MEAN = 0, 1, 2


@torch.no_grad()
def activation_means(model: nn.Module, sites: list[str], tokens: Tensor, batch_windows: int = 16,
                     start: int = 1) -> list[Tensor]:
    """Mean of each site's activations (a hookpoint's output; HOOKPOINT:input, its module's input) over all
    windows and positions >= start, (d,) float64 each, from one LM forward per batch."""
    hooked = [get_site(model, site) for site in sites]
    device = next(model.parameters()).device
    totals, count = None, 0
    for first in range(0, len(tokens), batch_windows):
        input_ids = tokens[first : first + batch_windows].to(device)
        batch = [acts[:, start:] for acts in capture_many(model, hooked, input_ids)]
        sums = [acts.double().sum((0, 1)) for acts in batch]
        totals = sums if totals is None else [total + part for total, part in zip(totals, sums)]
        count += batch[0].shape[0] * batch[0].shape[1]
    if totals is None:
        raise ValueError("no token windows to evaluate")
    return [total / count for total in totals]


def activation_mean(model: nn.Module, hookpoint: str, tokens: Tensor, batch_windows: int = 16, start: int = 1) -> Tensor:
    """Mean of the hookpoint's output over all windows and positions >= start, (d,) float64."""
    return activation_means(model, [hookpoint], tokens, batch_windows, start)[0]


class _SaeSplice:
    """Replacement for one SAE: encode + decode the activations, keeping the last batch's codes. A
    transcoder's replaces the module's output by its prediction from the module's input (`runner`'s
    clean input of the same batch), and its reconstruction statistics compare that with the output."""

    def __init__(self, sae: SparseAutoencoder, runner: SpliceRunner):
        self.sae = sae
        self.runner = runner
        self.last: tuple[Tensor, ...] | None = None

    def __call__(self, acts: Tensor) -> Tensor:
        target = acts.flatten(0, 1).to(self.sae.dtype)
        x = self.runner.sae_input(acts, self.sae.cfg.transcode).flatten(0, 1).to(self.sae.dtype)
        x_hat, values, indices = self.sae.reconstruct(x)  # in raw units, whatever the SAE's input transform
        self.last = (target, x_hat, values, indices)  # overwritten, never accumulated: see splice.Replacement
        return x_hat.to(acts.dtype).view_as(acts)


@torch.no_grad()
def evaluate_many(
    saes: Mapping[str, SparseAutoencoder],
    model: nn.Module,
    tokens: Tensor,
    hookpoint: str,
    batch_windows: int = 16,
    splice_mode: SpliceMode = "auto",
    progress: bool = False,
) -> dict[str, dict]:
    """Evaluate several SAEs on the same hookpoint and tokens (n_windows, ctx_len); one report each.

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
    mean = activation_mean(model, hookpoint, tokens, batch_windows)
    d_model = mean.numel()
    for name, sae in saes.items():
        if sae.cfg.d_in != d_model:
            raise UsageError(f"SAE '{name}' takes d_in={sae.cfg.d_in}, but {hookpoint} outputs {d_model} features")
    model_dtype = next(model.parameters()).dtype
    mean_activation = mean.to(device=device, dtype=model_dtype)
    runner = SpliceRunner(model, module, start=1, mode=splice_mode)
    splices = {name: _SaeSplice(sae.to(device).eval(), runner) for name, sae in saes.items()}
    replacements = [None, torch.zeros_like, lambda acts: mean_activation.expand_as(acts), *splices.values()]
    losses = LossStats(len(replacements), start=1)
    reconstruction = {name: ReconstructionStats(sae.cfg.n_latents, mean) for name, sae in saes.items()}

    for first in tqdm(range(0, len(tokens), batch_windows), desc="eval", unit="batch", disable=not progress):
        input_ids = tokens[first : first + batch_windows].to(device)
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
TRAINING_EVAL_KEYS = ("fvu", "nmse", "l0", "never_fired_frac", "never_fired_tokens", "ce_clean", "ce_sae",
                      "ce_recovered", "ce_recovered_mean", "delta_ce", "kl")


def training_evaluator(cfg: TrainConfig, model: nn.Module, tokenizer) -> Callable[[SparseAutoencoder, float, str], dict[str, float]]:
    """The held-out eval a training run `cfg` logs every `eval_every` steps,
    for `sae.trainer.train(cfg, evaluator=training_evaluator)`: the held-out windows are read once,
    here; the returned function scores an SAE trained on inputs times `input_scale` at `hookpoint`
    and gives {"eval/KEY": value} for TRAINING_EVAL_KEYS."""
    windows, _ = held_out_windows(cfg.data, tokenizer, cfg.eval_tokens, cfg.eval_split)

    def score(sae: SparseAutoencoder, input_scale: float, hookpoint: str) -> dict[str, float]:
        report = evaluate(sae.folded(input_scale), model, windows, hookpoint, batch_windows=cfg.data.lm_batch_windows)
        return {f"eval/{key}": report[key] for key in TRAINING_EVAL_KEYS}

    return score
