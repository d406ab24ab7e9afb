"""k-sparse probing: how much of a binary feature the k most relevant latents carry, for small k.

For each binary task (eval/probe.py's per-token tasks labelled from the text, and the user's own from
--probe_tasks), the scored positions are split in two halves by alternate eval windows (probe.fit_half):
- on the train half, every unit is ranked by |mean activation on positive tokens - mean on negative
  tokens| (Gurnee et al. 2023, "Finding neurons in a haystack"; Kantamneni et al. 2025, "Are sparse
  autoencoders useful? A case study in sparse probing", arXiv 2502.16681; SAEBench's
  `get_top_k_mean_diff_mask`). The absolute value: a neuron is signed, and a unit lower on the
  positives separates them as well as one higher;
- a logistic probe is fitted, on the train half too, to the top k units for each k (KS = 1, 2, 5, 16);
- it is scored on the test half: accuracy (logit > 0) and AUC (Mann-Whitney U / (n+ n-), ties
  counted half). Nothing of the test half ranks or fits, so choosing among thousands of latents does
  not fit the tokens a probe is scored on.
The same is done for the hookpoint's d_in coordinates ("neurons": what the SAE encodes; a
transcoder's, its module's input), the reference an SAE's latents should beat. A random-model baseline
(Heap et al. 2025: an SAE trained on a random-init copy of the LM, `train.py --model_init random`) is
simply another SAE folder of the same call, `python -m eval TRAINED RANDOM --sparse_probe`: each gets
its own section.

The fit (`fit_logistic`): Newton's method in float64 on k + 1 parameters, damped by a backtracking line
search, minimising sum_t softplus(s_t) - y_t s_t + |w|^2 / (2 C), s = x w + b, on features
standardised with the train half's mean and standard deviation. C = 1 is scikit-learn's default, what
SAEBench's probes use (scikit-learn is not a dependency here, and a k <= 16 Newton fit is a few lines):
the penalty keeps a perfectly separating unit's weight finite, and is small against a sum over thousands of
tokens. Classes are not rebalanced (SAEBench samples balanced sets; these tasks are per-token and
often rare), so each task also reports the test accuracy of the train half's majority class; AUC does not
depend on the balance.

Token hygiene: positions of the tokens `excluded_token_ids` (BOS/EOS/pad when the SAE was trained
without them, sae/hygiene.py) are left out of ranking, fitting and scoring; the halves stay the windows'.

    from eval.sparse_probe import sparse_probe_section
    section = sparse_probe_section(model, tokenizer, sae, "transformer.h.2", windows)   # windows (n, ctx_len)
    section["mean"]["1"]["auc"], section["neuron_mean"]["1"]["auc"], section["tasks"], section["skipped"]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from sae.errors import UsageError
from sae.hygiene import token_keep_mask
from sae.model import SparseAutoencoder

from .missing import mean_or_none
from .probe import (ARMIJO, MIN_CLASS_TOKENS, MIN_STEP, ProbeTask, fit_half, logistic_terms, probe_tasks, softplus,
                    too_few_reason)

KS = (1, 2, 5, 16)
"""How many units each probe reads: SAEBench's default 1, 2 and 5, and 16, the smallest k in the example of
Kantamneni et al.'s sae-probes package."""

C = 1.0
"""Inverse strength of the L2 penalty on the probe's weights (not its bias): scikit-learn's default."""


# ---- ranking ----------------------------------------------------------------------------------------

def latent_mean_difference(values: Tensor, indices: Tensor, labels: Tensor, n_latents: int) -> Tensor:
    """(n_latents,) float64: each latent's mean value on positive tokens minus on negative ones, from
    SAE codes values, indices (N, k) and labels (N,) 0/1 with both classes (a latent off its top k is 0)."""
    positive = labels.bool()

    def class_mean(rows: Tensor) -> Tensor:
        sums = torch.bincount(indices[rows].flatten(), weights=values[rows].flatten().double(), minlength=n_latents)
        return sums / int(rows.sum())

    return class_mean(positive) - class_mean(~positive)


def dense_mean_difference(units: Tensor, labels: Tensor) -> Tensor:
    """(U,) float64: each unit's mean on positive tokens minus on negative ones; units (U, N), labels (N,)."""
    positive = labels.bool()
    return units[:, positive].double().mean(1) - units[:, ~positive].double().mean(1)


def top_units(difference: Tensor, k: int) -> Tensor:
    """(k,) int64: the units of largest |difference|, largest first; ties go to the lower id."""
    return torch.sort(difference.abs(), descending=True, stable=True).indices[:k]


def latent_columns(values: Tensor, indices: Tensor, latents: Tensor) -> Tensor:
    """(N, m) float64: latents (m,)'s values at every token of codes values, indices (N, k); 0 off the top k."""
    # one latent at a time: (N, k) each, where all at once would hold (N, k, m)
    return torch.stack([(values.double() * (indices == latent)).sum(1) for latent in latents.tolist()], 1)


# ---- the probe ----------------------------------------------------------------------------------------

class LogisticProbe(NamedTuple):
    """sigmoid(((x - mean) / scale) . weight + bias) for features x (.., m)."""

    weight: Tensor
    """(m,) float64, on standardised features."""
    bias: float
    mean: Tensor
    """(m,) float64: the train half's mean of each feature."""
    scale: Tensor
    """(m,) float64: its standard deviation there (1 for a constant feature)."""

    def logits(self, features: Tensor) -> Tensor:
        """(N,) float64 for features (N, m)."""
        return ((features.double() - self.mean) / self.scale) @ self.weight + self.bias


def _objective(design: Tensor, labels: Tensor, params: Tensor, penalty: Tensor) -> Tensor:
    """sum_t softplus(s_t) - y_t s_t + penalty . params^2 / 2 with s = design @ params."""
    s = design @ params
    return (softplus(s) - labels * s).sum() + (penalty * params.square()).sum() / 2


def fit_logistic(features: Tensor, labels: Tensor, c: float = C, max_iter: int = 100,
                 tol: float = 1e-10) -> LogisticProbe:
    """The L2-penalised logistic probe of features (N, m) for labels (N,) 0/1 with both classes.

    Damped Newton in float64 on (w, b): stops when Newton's predicted decrease (half the squared Newton
    decrement) is under `tol` per token, when the line search finds no step, or after `max_iter` steps.
    The objective is strictly convex in w (the penalty) and in b (both classes present), so its minimum
    is unique and finite even for a feature that separates the classes.
    """
    x = features.double()
    y = labels.double()
    mean, scale = x.mean(0), x.std(0, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant feature: its weight stays 0
    design = torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
    penalty = torch.cat([torch.full((x.shape[1],), 1 / c, dtype=torch.float64, device=x.device),
                         torch.zeros(1, dtype=torch.float64, device=x.device)])
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, device=x.device)
    params[-1] = math.log(float(y.mean()) / (1 - float(y.mean())))  # the prior: the best constant predictor
    current = _objective(design, y, params, penalty)
    for _ in range(max_iter):
        _, r, q = logistic_terms(design @ params, y)
        gradient = design.T @ r + penalty * params
        hessian = (design.T * q) @ design + torch.diag(penalty)
        direction = -torch.linalg.solve(hessian, gradient)
        decrease = -(gradient @ direction)  # Newton's model predicts objective - decrease / 2
        if decrease / 2 <= tol * len(y):
            break
        step = 1.0
        while step >= MIN_STEP:
            trial = _objective(design, y, params + step * direction, penalty)
            if trial <= current - ARMIJO * step * decrease:
                break
            step /= 2
        if step < MIN_STEP:
            break
        params, current = params + step * direction, trial
    return LogisticProbe(params[:-1], float(params[-1]), mean, scale)


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of scores (N,) for labels (N,) 0/1 with both classes: the chance that a
    random positive scores above a random negative, a tie counting half (Mann-Whitney U / (n+ n-))."""
    positive = labels.bool().cpu().numpy()
    ranks = rankdata(scores.cpu().numpy())  # ties get their average rank
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probe_scores(features: Tensor, labels: Tensor, train: Tensor, test: Tensor) -> dict:
    """{accuracy, auc} on the `test` tokens of the probe fitted on the `train` tokens; features (N, m),
    labels (N,), train and test (N,) bool."""
    probe = fit_logistic(features[train], labels[train])
    logits = probe.logits(features[test])
    return {"accuracy": float(((logits > 0).double() == labels[test]).double().mean()),
            "auc": auc(logits, labels[test])}


# ---- the report section ------------------------------------------------------------------------------

def _k_sparse(columns: Tensor, units: Tensor, labels: Tensor, train: Tensor, test: Tensor, ks: Sequence[int]) -> dict:
    """{str(k): {accuracy, auc, units}} of the probes on the first k of columns (N, max(ks)), the
    chosen units' values in rank order; units (max(ks),) their ids."""
    return {str(k): {**probe_scores(columns[:, :k], labels, train, test), "units": units[:k].tolist()} for k in ks}


def _score_task(task: ProbeTask, n_latents: int, ks: Sequence[int], block: int, excluded_token_ids: Sequence[int],
                min_class_tokens: int) -> dict | str:
    """A task's entry of the section, or why it is skipped (probe.too_few_reason, over the kept positions).
    Units are ranked and probes fitted on the train half (probe.fit_half, blocks of `block` positions),
    scored on the other."""
    features = task.features
    device = features.values.device
    labels = task.labels.to(device)
    keep = token_keep_mask(task.token_ids, excluded_token_ids).to(device)
    train_half = fit_half(len(labels), block).to(device)
    if (reason := too_few_reason(labels[keep], train_half[keep], min_class_tokens)) is not None:
        return reason
    train, test = train_half & keep, ~train_half & keep
    m = max(ks)
    latents = top_units(latent_mean_difference(features.values[train], features.indices[train], labels[train],
                                               n_latents), m)
    neurons = top_units(dense_mean_difference(features.neurons[:, train], labels[train]), m)
    train_labels, test_labels = labels[train], labels[test]
    majority = float(train_labels.mean() >= 0.5)
    return {
        "positives": int(labels[keep].sum()), "negatives": int((1 - labels[keep]).sum()),
        "test_positives": int(test_labels.sum()), "test_negatives": int((1 - test_labels).sum()),
        "majority_accuracy": float((test_labels == majority).double().mean()),
        "latents": _k_sparse(latent_columns(features.values, features.indices, latents), latents, labels, train, test,
                             ks),
        "neurons": _k_sparse(features.neurons[neurons].T.double(), neurons, labels, train, test, ks),
    }


def _means(scored: dict, units: str, ks: Sequence[int]) -> dict:
    """{str(k): {accuracy, auc}}: means over the scored tasks (None when none is)."""
    return {str(k): {metric: mean_or_none(task[units][str(k)][metric] for task in scored.values())
                     for metric in ("accuracy", "auc")} for k in ks}


def check_ks(ks: Sequence[int], n_units: int | None = None) -> None:
    """One line when `ks` is not a non-empty, increasing list of positive ints (at most `n_units`, when given)."""
    if not ks or any(type(k) is not int or k < 1 for k in ks) or list(ks) != sorted(set(ks)):
        raise UsageError(f"--sparse_probe_ks must be increasing positive integers, e.g. [1,2,5,16]; got {list(ks)}")
    if n_units is not None and ks[-1] > n_units:
        raise UsageError(f"--sparse_probe_ks asks for {ks[-1]} units, but the SAE has {n_units} latents or "
                         "neurons (its n_latents and d_in: the fewer); ask for fewer")


def sparse_probe_section(
    model: nn.Module,
    tokenizer,
    sae: SparseAutoencoder,
    hookpoint: str,
    windows: Tensor,
    ks: Sequence[int] = KS,
    batch_windows: int = 16,
    tasks_file: str | Path | None = None,
    max_tokens: int | None = None,
    excluded_token_ids: Sequence[int] = (),
    min_class_tokens: int = MIN_CLASS_TOKENS,
) -> dict:
    """The report's `sparse_probe` section for an SAE on `windows` (n_windows, ctx_len) of held-out text.

    Keys: ks; mean and neuron_mean {str(k): {accuracy, auc}} (means over the scored tasks; None when
    all are skipped); tasks {name: {positives, negatives, test_positives, test_negatives,
    majority_accuracy, latents {str(k): {accuracy, auc, units}}, neurons {the same}}}; skipped {name:
    reason}; excluded_token_ids (token hygiene). Counts are of the kept positions. `max_tokens` and
    `tasks_file` as in probe.probe_tasks.
    """
    check_ks(ks, min(sae.cfg.n_latents, sae.cfg.d_in))
    tasks = probe_tasks(model, tokenizer, sae, hookpoint, windows, batch_windows, tasks_file, max_tokens)
    scored, skipped = {}, {}
    for name, task in tasks.items():
        result = _score_task(task, sae.cfg.n_latents, ks, windows.shape[1] - 1, excluded_token_ids, min_class_tokens)
        (skipped if isinstance(result, str) else scored)[name] = result
    return {"ks": list(ks), "mean": _means(scored, "latents", ks), "neuron_mean": _means(scored, "neurons", ks),
            "tasks": scored, "skipped": skipped, "excluded_token_ids": list(excluded_token_ids)}
