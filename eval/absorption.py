"""Feature absorption (Chanin et al. 2024, "A is for Absorption: Studying feature splitting and
absorption in sparse autoencoders", arXiv 2409.14507): how often the latent that should carry a feature
stays silent on a token that has it while a more specific latent fires and carries the feature instead.

Chanin et al.'s first-letter task, adapted to what an eval of this repository has (docs/metrics.md,
"Feature absorption", says why each way):
- the feature "the token starts with L", per letter L a-z, on the eval text's own tokens at the
  hookpoint (not single-token words in an in-context prompt: a small LM cannot follow that prompt).
  A token counts when its string, whitespace and a leading "Ġ"/"▁" marker stripped, is ASCII letters
  only (`first_letter`); other positions take no part. Labels of letter L: 1 on L tokens, 0 on the other
  alphabetic ones (SAEBench's probe, too, only sees alphabetic tokens);
- the positions are split by alternate eval windows (probe.fit_half): a one-vs-rest logistic probe on
  the hookpoint's activations (sparse_probe.fit_logistic, float64 Newton, C = 1) is fitted on the train
  half, and its test-half accuracy, precision, recall, F1 (at logit 0) and AUC are reported. Its weights, mapped back from
  standardised to raw coordinates and normalised, are the probe direction p. A letter whose probe's test
  F1 is under MIN_PROBE_F1 (SAEBench's min_GT_probe_f1) is reported but left out of the means: the metric
  means something only where the probe finds the feature (Chanin et al. §3);
- main latents (Chanin et al.'s k-sparse probing with their feature-splitting rule): latents ranked on
  the train half by their mean on L tokens minus on other letters' (sparse_probe.latent_mean_difference,
  positive differences first), logistic probes on the top k = 1, 2, ... MAX_MAIN_LATENTS; k grows while
  its train-half F1 beats the best so far by more than SPLIT_F1_JUMP (tau_fs = 0.03), and the main
  latents are the top k kept. Chosen on the train half: nothing of the test half ranks or fits;
- on the test half's true positives of the probe (L tokens the probe calls L), each firing latent j's
  contribution along p is c_j = value_j * (W_dec[j] . p) (times the token's scale under an input
  transform, SparseAutoencoder.output_scale) and the probe projection is a = (x - offset) . p, offset
  being the part of the reconstruction no latent carries (b_dec; under layer_norm also each token's
  mean): a = (x - x_hat) . p + sum_j c_j. SAEBench projects the raw x, b_dec included, which no latent
  can carry. With m = sum of the main latents' c and A = sum of the MAX_ABSORBERS largest positive c of
  other latents whose decoder cosine with p is at least FRACTION_COS, the absorption fraction (SAEBench's
  `absorption_fraction`, Demian Till's partial-absorption extension) is 0 when m >= a or A < PROJECTION_SHARE a,
  1 when m <= 0, else min(A, a - m) / (min(A, a - m) + m). Full absorption (Chanin et al.'s definition as
  SAEBench computes it): every main latent silent (value <= SILENT), and the latent of largest c has decoder
  cosine >= FULL_COS with p and c >= PROJECTION_SHARE a. Per letter: the mean fraction and the full-absorption
  rate over the true positives; the section's means are over the letters with a usable probe.

Token hygiene: positions of `excluded_token_ids` (BOS/EOS/pad of an SAE trained without them) are left
out of everything; the halves stay the windows'. A transcoder is refused (`check_absorption_sae`): its
decoder writes its module's output, not the space the probe reads.

    from eval.absorption import absorption_section
    section = absorption_section(model, tokenizer, sae, "transformer.h.2", windows)   # windows (n, ctx_len)
    section["mean_absorption_fraction"], section["full_absorption_rate"], section["probe_quality"]
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from sae.errors import UsageError
from sae.hygiene import token_keep_mask
from sae.model import SparseAutoencoder

from .explain.records import TokenStrings, cat_codes, encode_windows
from .missing import mean_or_none
from .probe import MIN_CLASS_TOKENS, fit_half, too_few_reason
from .sparse_probe import LogisticProbe, auc, fit_logistic, latent_columns, latent_mean_difference, top_units

LETTERS = "abcdefghijklmnopqrstuvwxyz"

MIN_PROBE_F1 = 0.6
"""Test F1 a letter's probe needs for its absorption to count in the means (SAEBench's min_GT_probe_f1)."""

SPLIT_F1_JUMP = 0.03
"""Chanin et al.'s feature-splitting threshold tau_fs: one more main latent while the k-sparse F1 gains more."""

MAX_MAIN_LATENTS = 10
"""Most main latents a letter may have (SAEBench's max_k_value)."""

FRACTION_COS = 0.1
"""Decoder cosine with p an absorbing latent needs in the absorption fraction (SAEBench's
absorption_fraction_probe_cos_sim_threshold)."""

FULL_COS = 0.025
"""Decoder cosine with p the top latent needs for full absorption (Chanin et al.; SAEBench's
full_absorption_probe_cos_sim_threshold)."""

PROJECTION_SHARE = 0.4
"""Share of the probe projection the absorbing latents must carry (SAEBench's probe_projection_proportion_threshold)."""

MAX_ABSORBERS = 3
"""Most latents that count as absorbing one token in the fraction (SAEBench's absorption_fraction_max_absorbing_latents)."""

SILENT = 1e-8
"""A main latent at most this is silent (SAEBench's EPS)."""

TOP_ABSORBERS = 5
"""Latents listed per letter as the most frequent full absorbers."""


def first_letter(token: str) -> str | None:
    """The lower-case first letter of a token string that is ASCII letters only once whitespace and a
    leading "Ġ"/"▁" word marker are stripped (" The" -> "t"); None for any other token ("3", " don't", "")."""
    word = token.strip().lstrip("Ġ▁")
    return word[0].lower() if word.isascii() and word.isalpha() else None


class Positions(NamedTuple):
    """The scored positions (N of them, positions >= 1 of each window, in order)."""

    hidden: Tensor
    """(N, d_in) what the SAE encodes (the hookpoint's output)."""
    values: Tensor
    """(N, k) SAE latent values."""
    indices: Tensor
    """(N, k) int64 SAE latent ids."""
    letters: list[str | None]
    """(N,) each token's `first_letter`."""
    train: Tensor
    """(N,) bool: the train half (probe.fit_half)."""
    keep: Tensor
    """(N,) bool: kept by token hygiene. All tensors on one device."""


@torch.no_grad()
def encode_positions(model: nn.Module, hookpoint: str, sae: SparseAutoencoder, windows: Tensor,
                     batch_windows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden (N, d_in), values (N, c), indices (N, c)) of positions >= 1 of every window (records.encode_windows),
    window after window; BatchTopK's codes of different widths padded (records.cat_codes)."""
    batches = [encode_windows(model, hookpoint, sae, windows[first : first + batch_windows])
               for first in range(0, len(windows), batch_windows)]
    values, indices = cat_codes([codes.values for codes in batches], [codes.indices for codes in batches])
    return torch.cat([codes.hidden.flatten(0, 1) for codes in batches]), values, indices


# ---- the probe ---------------------------------------------------------------------------------------

def binary_scores(predicted: Tensor, labels: Tensor) -> dict:
    """{accuracy, precision, recall, f1} of predicted (N,) bool against labels (N,) 0/1; precision and f1
    are 0 when nothing is predicted positive."""
    truth = labels.bool()
    true_positives = int((predicted & truth).sum())
    precision = true_positives / max(int(predicted.sum()), 1)
    recall = true_positives / max(int(truth.sum()), 1)
    return {"accuracy": float((predicted == truth).double().mean()), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0}


def probe_direction(probe: LogisticProbe) -> Tensor:
    """(d_in,) float64 unit vector: the probe's weights in raw activation coordinates. The logit is
    ((x - mean) / scale) . w + b, so its gradient in x is w / scale."""
    raw = probe.weight / probe.scale
    return raw / raw.norm().clamp_min(torch.finfo(torch.float64).tiny)


def main_latents(values: Tensor, indices: Tensor, labels: Tensor, n_latents: int,
                 max_k: int = MAX_MAIN_LATENTS, jump: float = SPLIT_F1_JUMP) -> tuple[list[int], list[float]]:
    """(main latents, F1 of the k-sparse probe for each k tried) from codes values, indices (N, k) and
    labels (N,) 0/1 with both classes, all of one half. Latents are ranked by their mean on positives minus
    on negatives, positive first (a first-letter latent fires more on its letter); k grows while the probe
    on the top k beats the best F1 so far by more than `jump` (Chanin et al.'s tau_fs)."""
    ranked = top_units(latent_mean_difference(values, indices, labels, n_latents).clamp_min(0), max_k)
    columns = latent_columns(values, indices, ranked)
    best, kept, f1s = -1.0, 1, []
    for k in range(1, len(ranked) + 1):
        predicted = fit_logistic(columns[:, :k], labels).logits(columns[:, :k]) > 0
        f1s.append(binary_scores(predicted, labels)["f1"])
        if f1s[-1] <= best + jump:
            break
        best, kept = f1s[-1], k
    return ranked[:kept].tolist(), f1s


# ---- absorption on the probe's true positives ---------------------------------------------------------

class AlongProbe(NamedTuple):
    """Each position's probe projection and its firing latents' contributions along p."""

    target: Tensor
    """(n,) float64: a = (x - offset) . p, what the latents should carry along p."""
    contributions: Tensor
    """(n, k) float64: c = value * (W_dec[latent] . p) * scale, per code entry."""
    values: Tensor
    """(n, k) the codes' values."""
    indices: Tensor
    """(n, k) int64 the codes' latents."""


def along_probe(sae: SparseAutoencoder, hidden: Tensor, direction: Tensor) -> AlongProbe:
    """The probe projection and contributions along `direction` (d_in,) unit float64 of positions hidden
    (n, d_in). The offset no latent carries is x_hat minus the latents' sum, so a = (x - x_hat) . p + sum c."""
    x = hidden.to(sae.device, sae.dtype)
    x_hat, values, indices = sae.reconstruct(x)
    along = sae.W_dec.double() @ direction.to(sae.device)  # (n_latents,)
    contributions = values.double() * along[indices] * sae.output_scale(x).double()
    residual = (x.double() - x_hat.double()) @ direction.to(sae.device)
    return AlongProbe(residual + contributions.sum(1), contributions, values, indices)


def decoder_cosines(sae: SparseAutoencoder, direction: Tensor) -> Tensor:
    """(n_latents,) float64: each decoder row's cosine with `direction` (d_in,) unit (0 for a zero row)."""
    rows = sae.W_dec.double()
    return rows @ direction.to(sae.device) / rows.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


def absorption_fractions(along: AlongProbe, is_main: Tensor, cosines: Tensor) -> Tensor:
    """(n,) float64 SAEBench's absorption fraction per position; is_main (n, k) marks the main latents'
    entries, cosines (n_latents,) the decoder cosines with p (module docstring)."""
    a, c = along.target, along.contributions
    m = (c * is_main).sum(1)
    absorbing = ~is_main & (cosines[along.indices] >= FRACTION_COS) & (c > 0)
    carried = torch.where(absorbing, c, 0.0).topk(min(MAX_ABSORBERS, c.shape[1]), dim=1).values.sum(1)
    absorbed = torch.minimum(carried, a - m)
    partial = (absorbed / (absorbed + m)).clamp(0, 1)
    none = (a <= 0) | (m >= a) | (carried < PROJECTION_SHARE * a)
    return torch.where(none, 0.0, torch.where(m <= 0, 1.0, partial))


def full_absorbers(along: AlongProbe, is_main: Tensor, cosines: Tensor) -> Tensor:
    """(n,) int64: per position, the latent that fully absorbs the feature, -1 where none does: every main
    latent silent, and the latent of largest contribution has cosine >= FULL_COS with p and carries at
    least PROJECTION_SHARE of the probe projection (Chanin et al.; SAEBench's `_is_full_absorption`)."""
    silent = (along.values.double() * is_main).sum(1) <= SILENT
    top_value, top_entry = along.contributions.max(1)
    top = along.indices.gather(1, top_entry[:, None]).squeeze(1)
    full = silent & (along.target > 0) & (cosines[top] >= FULL_COS) & (top_value >= PROJECTION_SHARE * along.target)
    return torch.where(full, top, -1)


# ---- per letter and the section -----------------------------------------------------------------------

def score_letter(letter: str, positions: Positions, sae: SparseAutoencoder, min_class_tokens: int) -> dict | str:
    """A letter's entry of the section, or why it is skipped (probe.too_few_reason over the kept
    alphabetic positions)."""
    device = positions.hidden.device
    alphabetic = positions.keep & torch.tensor([found is not None for found in positions.letters], device=device)
    labels = torch.tensor([float(found == letter) for found in positions.letters], dtype=torch.float64, device=device)
    if (reason := too_few_reason(labels[alphabetic], positions.train[alphabetic], min_class_tokens)) is not None:
        return reason
    train, test = positions.train & alphabetic, ~positions.train & alphabetic
    hidden = positions.hidden.double()
    probe = fit_logistic(hidden[train], labels[train])
    logits = probe.logits(hidden[test])
    predicted = logits > 0
    scores = binary_scores(predicted, labels[test])
    main, split_f1 = main_latents(positions.values[train], positions.indices[train], labels[train], sae.cfg.n_latents)
    direction = probe_direction(probe)
    cosines = decoder_cosines(sae, direction)
    true_positives = test.nonzero().squeeze(1)[predicted & labels[test].bool()]
    along = along_probe(sae, positions.hidden[true_positives], direction)
    is_main = torch.isin(along.indices, torch.tensor(main, device=along.indices.device))
    fractions = absorption_fractions(along, is_main, cosines)
    absorbers = full_absorbers(along, is_main, cosines)
    n = len(true_positives)
    return {
        "positives": int(labels[alphabetic].sum()), "test_positives": int(labels[test].sum()),
        "test_negatives": int((1 - labels[test]).sum()),
        "probe": {**scores, "auc": auc(logits, labels[test]),
                  "majority_accuracy": float((labels[test] == 0).double().mean())},
        "usable": scores["f1"] >= MIN_PROBE_F1,
        "main_latents": main, "main_latent_cos": cosines[main].tolist(), "split_f1": split_f1,
        "probe_true_positives": n,
        "main_silent_rate": float(((along.values.double() * is_main).sum(1) <= SILENT).double().mean()) if n else None,
        "mean_absorption_fraction": float(fractions.mean()) if n else None,
        "full_absorptions": int((absorbers >= 0).sum()),
        "full_absorption_rate": float((absorbers >= 0).double().mean()) if n else None,
        "top_absorbers": [[latent, count] for latent, count in
                          Counter(absorbers[absorbers >= 0].tolist()).most_common(TOP_ABSORBERS)],
    }


def probe_quality(letters: dict) -> dict:
    """How well the letters' probes find their letter: mean test F1, accuracy and AUC, the letters whose F1
    reaches MIN_PROBE_F1 and those that miss it, and a verdict: "good" (all do), "partial", or "poor" (none:
    the metric means nothing on this model)."""
    usable = [letter for letter, entry in letters.items() if entry["usable"]]
    verdict = "good" if letters and len(usable) == len(letters) else "partial" if usable else "poor"
    return {"min_f1": MIN_PROBE_F1, "mean_f1": mean_or_none(entry["probe"]["f1"] for entry in letters.values()),
            "mean_accuracy": mean_or_none(entry["probe"]["accuracy"] for entry in letters.values()),
            "mean_auc": mean_or_none(entry["probe"]["auc"] for entry in letters.values()),
            "usable_letters": usable, "unusable_letters": [letter for letter in letters if letter not in usable],
            "verdict": verdict}


@torch.no_grad()
def absorption_scores(positions: Positions, sae: SparseAutoencoder, min_class_tokens: int = MIN_CLASS_TOKENS) -> dict:
    """The section (see `absorption_section`) from the scored positions."""
    letters, skipped = {}, {}
    for letter in LETTERS:
        result = score_letter(letter, positions, sae, min_class_tokens)
        (skipped if isinstance(result, str) else letters)[letter] = result
    usable = [entry for entry in letters.values() if entry["usable"] and entry["probe_true_positives"]]
    return {
        "mean_absorption_fraction": mean_or_none(entry["mean_absorption_fraction"] for entry in usable),
        "full_absorption_rate": mean_or_none(entry["full_absorption_rate"] for entry in usable),
        "letters_averaged": len(usable),
        "probe_true_positives": sum(entry["probe_true_positives"] for entry in usable),
        "probe_quality": probe_quality(letters), "letters": letters, "skipped": skipped,
        "thresholds": {"min_probe_f1": MIN_PROBE_F1, "split_f1_jump": SPLIT_F1_JUMP, "max_main_latents": MAX_MAIN_LATENTS,
                       "fraction_cos": FRACTION_COS, "full_cos": FULL_COS, "projection_share": PROJECTION_SHARE,
                       "max_absorbers": MAX_ABSORBERS},
    }


def check_absorption_sae(sae: SparseAutoencoder, where: str) -> None:
    """One line for a transcoder: its decoder writes its module's output, not the activations the probe reads."""
    if sae.cfg.transcode:
        raise UsageError(f"--absorption compares decoder rows with a probe on the activations the SAE encodes; "
                         f"{where} is a transcoder, whose decoder writes its module's output: run it without --absorption")


def absorption_section(
    model: nn.Module,
    tokenizer,
    sae: SparseAutoencoder,
    hookpoint: str,
    windows: Tensor,
    batch_windows: int = 16,
    max_tokens: int | None = None,
    excluded_token_ids: Sequence[int] = (),
    min_class_tokens: int = MIN_CLASS_TOKENS,
) -> dict:
    """The report's `absorption` section for an SAE on `windows` (n_windows, ctx_len) of held-out text.

    Keys: mean_absorption_fraction and full_absorption_rate (means over the letters whose probe is usable
    and has true positives; None when none), letters_averaged, probe_true_positives (the positions behind
    those means), probe_quality {min_f1, mean_f1, mean_accuracy, mean_auc, usable_letters, unusable_letters, verdict},
    letters {letter: {positives, test_positives, test_negatives, probe {accuracy, precision, recall, f1, auc,
    majority_accuracy}, usable, main_latents, main_latent_cos, split_f1, probe_true_positives,
    main_silent_rate, mean_absorption_fraction, full_absorptions, full_absorption_rate, top_absorbers
    [[latent, count]]}}, skipped {letter: reason with the counts}, thresholds, excluded_token_ids.
    `max_tokens` caps the positions (positions >= 1, the first windows first) as in probe.probe_tasks.
    """
    check_absorption_sae(sae, "this SAE")
    if max_tokens is not None:
        windows = windows[: math.ceil(max_tokens / (windows.shape[1] - 1))]
    hidden, values, indices = encode_positions(model, hookpoint, sae, windows, batch_windows)
    token_ids = windows[:, 1:].flatten()[: max_tokens or None]
    n, device = len(token_ids), values.device
    positions = Positions(
        hidden=hidden[:n], values=values[:n], indices=indices[:n],
        letters=[first_letter(token) for token in TokenStrings(tokenizer)(token_ids)],
        train=fit_half(n, windows.shape[1] - 1).to(device),
        keep=token_keep_mask(token_ids, excluded_token_ids).to(device))
    return {**absorption_scores(positions, sae, min_class_tokens), "excluded_token_ids": list(excluded_token_ids)}
