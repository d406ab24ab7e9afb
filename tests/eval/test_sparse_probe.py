"""k-sparse probing (eval/sparse_probe.py): the ranking and AUC against brute force, the penalised Newton
fit against a float64 L-BFGS, a planted latent that is a perfect probe, the train/test split (labels
flipped on the test half), skipped tasks, token hygiene, and the option end to end (report section,
table column, --help, the browser's section)."""

import json

import pytest
import torch

from eval import sparse_probe
from eval.__main__ import main
from eval.browse.metrics import sparse_probe_html
from eval.probe import TASKS, Features, ProbeTask, fit_half
from eval.report import interpretability_table
from eval.sparse_probe import (auc, check_ks, dense_mean_difference, fit_logistic, latent_columns,
                               latent_mean_difference, top_units)
from sae.errors import UsageError

from known_saes import random_sae


BLOCK = 10
"""Positions per half-block in the synthetic tasks: tokens 0-9 train, 10-19 test, ..."""


def codes_with_planted_latent(labels: torch.Tensor, planted: int, n_latents: int = 40, k: int = 4, seed: int = 0):
    """SAE-like codes values, indices (N, k): `planted` fires with value 1 exactly where labels is 1; the
    other slots hold random other latents with random values (noise independent of the labels)."""
    generator = torch.Generator().manual_seed(seed)
    others = torch.tensor([latent for latent in range(n_latents) if latent != planted])
    indices = others[torch.rand(len(labels), len(others), generator=generator).argsort(1)[:, :k]]
    values = torch.rand(len(labels), k, generator=generator) * 2
    indices[:, 0] = torch.where(labels.bool(), planted, indices[:, 0])
    values[:, 0] = torch.where(labels.bool(), 1.0, values[:, 0])
    return values, indices


def synthetic_task(labels: torch.Tensor, planted: int = 7, d_in: int = 6, seed: int = 0,
                   token_ids: torch.Tensor | None = None) -> ProbeTask:
    """A task whose latent `planted` equals the label; random neurons (d_in, N)."""
    values, indices = codes_with_planted_latent(labels, planted, seed=seed)
    neurons = torch.randn(d_in, len(labels), generator=torch.Generator().manual_seed(seed + 1))
    ids = torch.zeros(len(labels), dtype=torch.long) if token_ids is None else token_ids
    return ProbeTask(labels.double(), ids, Features(values, indices, neurons))


def pattern_labels(n: int, seed: int = 0, p: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=generator) < p).double()


# ---- ranking and AUC -----------------------------------------------------------------------------------

def test_mean_difference_ranking_picks_the_planted_latent_among_noise():
    labels = pattern_labels(400, seed=1)
    values, indices = codes_with_planted_latent(labels, planted=13, seed=2)
    values[:, 0] += 0.5 * torch.rand(400, generator=torch.Generator().manual_seed(3))  # planted, but noisy too
    dense = torch.zeros(400, 40, dtype=torch.float64).scatter_(1, indices, values.double())
    brute = dense[labels == 1].mean(0) - dense[labels == 0].mean(0)
    difference = latent_mean_difference(values, indices, labels, 40)
    torch.testing.assert_close(difference, brute, rtol=0, atol=1e-12)
    torch.testing.assert_close(dense_mean_difference(dense.T, labels), brute, rtol=0, atol=1e-12)
    assert top_units(difference, 3)[0] == 13
    torch.testing.assert_close(latent_columns(values, indices, top_units(difference, 3)),
                               dense[:, top_units(difference, 3)], rtol=0, atol=0)


def test_ranking_uses_the_absolute_difference_and_breaks_ties_by_id():
    assert top_units(torch.tensor([0.1, -0.9, 0.5, 0.9, 0.0], dtype=torch.float64), 4).tolist() == [1, 3, 2, 0]


def test_auc_equals_a_brute_force_pairwise_count_with_ties():
    scores = torch.tensor([0.3, 0.1, 0.3, 0.8, 0.5, 0.1, 0.3, 0.9], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.float64)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    assert auc(scores, labels) == pytest.approx(wins / (len(positives) * len(negatives)), abs=1e-15)
    assert wins == 6.5  # by hand: positives 0.3, 0.8, 0.1, 0.3 win 1.5 + 3 + 0.5 + 1.5 of the 16 pairs


# ---- the fit -------------------------------------------------------------------------------------------

def lbfgs_penalised(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """(w..., b) minimising the same penalised objective on standardised x, by float64 L-BFGS."""
    z = (x - x.mean(0)) / x.std(0, correction=0)
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        s = z @ params[:-1] + params[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y, reduction="sum") \
            + params[:-1].square().sum() / (2 * c)
        loss.backward()
        return loss

    optimizer.step(closure)
    return params.detach()


@pytest.mark.parametrize("separable", [False, True])
def test_newton_fit_matches_a_float64_lbfgs_of_the_same_objective(separable):
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([1.0, 10.0, 0.01], dtype=torch.float64)  # standardisation must handle any scale
    x = torch.randn(300, 3, dtype=torch.float64, generator=generator) * scales
    logits = x[:, 0] - 0.2 * x[:, 1] + 50 * x[:, 2]
    y = (logits > 0).double() if separable else torch.bernoulli(torch.sigmoid(logits), generator=generator)
    probe = fit_logistic(x, y)
    reference = lbfgs_penalised(x, y, c=1.0)
    torch.testing.assert_close(torch.cat([probe.weight, torch.tensor([probe.bias], dtype=torch.float64)]), reference,
                               rtol=1e-5, atol=1e-5)
    assert torch.isfinite(probe.weight).all()  # separable: the penalty keeps it finite


def test_a_constant_feature_gets_weight_zero():
    y = pattern_labels(100, seed=4)
    x = torch.stack([y + 0.1 * torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                     torch.full((100,), 3.0, dtype=torch.float64)], 1)
    probe = fit_logistic(x, y)
    assert probe.weight[1] == 0 and probe.weight[0] > 0


# ---- scoring a task ------------------------------------------------------------------------------------

def test_a_planted_latent_equal_to_the_label_is_a_perfect_one_sparse_probe():
    labels = pattern_labels(600, seed=6)
    task = sparse_probe._score_task(synthetic_task(labels, planted=7), n_latents=40, ks=(1, 2, 5), block=BLOCK,
                                    excluded_token_ids=[], min_class_tokens=5)
    assert task["latents"]["1"] == {"accuracy": 1.0, "auc": 1.0, "units": [7]}
    assert task["latents"]["2"]["units"][0] == 7 and len(task["latents"]["5"]["units"]) == 5
    assert task["latents"]["5"]["auc"] == 1.0
    assert 0.3 < task["neurons"]["1"]["auc"] < 0.7  # random neurons: chance
    test = ~fit_half(600, BLOCK)
    assert (task["test_positives"], task["test_negatives"]) == (int(labels[test].sum()), int((1 - labels[test]).sum()))
    assert (task["positives"], task["negatives"]) == (int(labels.sum()), 600 - int(labels.sum()))
    assert task["majority_accuracy"] == pytest.approx(float((labels[test] == 0).double().mean()))


def test_nothing_of_the_test_half_ranks_or_fits():
    """The planted latent equals the label on the train half; the test half's labels are flipped. Had the
    test half been used to rank or fit, the latent would not be first, or its probe not inverted on it."""
    labels = pattern_labels(600, seed=7)
    task = synthetic_task(labels, planted=7)
    test = ~fit_half(600, BLOCK)
    flipped = ProbeTask(torch.where(test, 1 - labels, labels), task.token_ids, task.features)
    entry = sparse_probe._score_task(flipped, n_latents=40, ks=(1,), block=BLOCK, excluded_token_ids=[],
                                     min_class_tokens=5)
    assert entry["latents"]["1"] == {"accuracy": 0.0, "auc": 0.0, "units": [7]}


def test_a_task_with_too_few_positives_is_skipped_with_its_counts():
    labels = torch.zeros(200, dtype=torch.float64)
    labels[[3, 5, 15]] = 1  # two in the train half (blocks 0-9), one in the test half (10-19)
    reason = sparse_probe._score_task(synthetic_task(labels), n_latents=40, ks=(1,), block=BLOCK,
                                      excluded_token_ids=[], min_class_tokens=2)
    assert reason == ("3 positive and 197 negative tokens of 200 (2 and 98 in the fit half, 1 and 99 in the "
                      "held-out half); needs at least 2 of each in each half")


def test_excluded_tokens_positions_are_left_out_of_ranking_fitting_and_scoring():
    """Positions of an excluded token id carry labels that would make another latent the best; left out,
    the planted latent is a perfect probe again and the counts are the kept positions'."""
    labels = pattern_labels(600, seed=8)
    token_ids = torch.where(torch.arange(600) % 4 == 0, 50256, 1)
    task = synthetic_task(labels, planted=7, token_ids=token_ids)
    sabotaged = torch.where(token_ids == 50256, 1 - labels, labels)  # the planted latent is wrong there
    task = ProbeTask(sabotaged, task.token_ids, task.features)
    kept = sparse_probe._score_task(task, n_latents=40, ks=(1,), block=BLOCK, excluded_token_ids=[50256],
                                    min_class_tokens=5)
    every = sparse_probe._score_task(task, n_latents=40, ks=(1,), block=BLOCK, excluded_token_ids=[],
                                     min_class_tokens=5)
    assert kept["latents"]["1"]["auc"] == 1.0 and every["latents"]["1"]["auc"] < 0.9
    assert kept["positives"] + kept["negatives"] == 450


def test_section_on_the_tiny_lm_scores_user_tasks_without_the_excluded_positions(tiny_lm, windows, tmp_path):
    model, tokenizer = tiny_lm
    text = "the model reads every window of the stream " * 5
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [int("e" in tokenizer.decode([token])) for token in ids]
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"task": "has_e", "text": text, "labels": labels}) + "\n")
    ids, labels = ids[:64], labels[:64]  # the tiny LM's context: the rest of the text is cut
    excluded = [ids[1]]  # a token of the text, standing in for a special token
    section = sparse_probe.sparse_probe_section(model, tokenizer, random_sae(32, n_latents=64, k=4), "transformer.h.1",
                                                windows, ks=(1, 3), tasks_file=tmp_path / "tasks.jsonl",
                                                excluded_token_ids=excluded, min_class_tokens=1)
    assert set(section["tasks"]) | set(section["skipped"]) == {*TASKS, "has_e"} and "has_e" in section["tasks"]
    task = section["tasks"]["has_e"]
    kept = [label for token, label in zip(ids[1:], labels[1:]) if token not in excluded]
    assert (task["positives"], task["negatives"]) == (sum(kept), len(kept) - sum(kept))
    assert section["excluded_token_ids"] == excluded and section["ks"] == [1, 3]


def test_ks_are_checked_in_one_line():
    for ks in ([], [0, 1], [2, 1], [1, 1], [1.5]):
        with pytest.raises(UsageError, match="increasing positive integers"):
            check_ks(ks)
    with pytest.raises(UsageError, match="asks for 16 units, but the SAE has 8"):
        check_ks([1, 16], 8)


# ---- end to end: the option, the report, the table, the browser ----------------------------------------

def test_option_adds_the_section_and_the_table_column(embedded_sae_dir, tmp_path, capsys):
    data_dir = str(embedded_sae_dir.parent.parent.parent / "data")  # the embedded fixture builds its corpus there
    out = tmp_path / "report.json"
    [report] = main([str(embedded_sae_dir), "--sparse_probe", "--sparse_probe_ks", "[1,4]", "--tokens", "2048",
                     "--data_dir", data_dir, "--out", str(out)])
    section = report["sparse_probe"]
    assert json.loads(out.read_text())["sparse_probe"] == section
    assert section["ks"] == [1, 4] and section["excluded_token_ids"]  # the SAE was trained without its separators
    assert section["tasks"] and set(section["tasks"]) | set(section["skipped"]) >= {"stop_word", "code_block"}
    for task in section["tasks"].values():
        assert task["positives"] + task["negatives"] <= report["tokens"]
        for units in ("latents", "neurons"):
            assert set(task[units]) == {"1", "4"} and len(task[units]["4"]["units"]) == 4
            assert all(0 <= task[units][k][metric] <= 1 for k in ("1", "4") for metric in ("accuracy", "auc"))
    scored = section["tasks"].values()
    mean = sum(task["latents"]["4"]["auc"] for task in scored) / len(scored)
    assert section["mean"]["4"]["auc"] == pytest.approx(mean)
    printed = capsys.readouterr().out
    assert "sparse probe AUC (neurons)" in printed
    assert f"k=1 {section['mean']['1']['auc']:.3f} ({section['neuron_mean']['1']['auc']:.3f})" in printed


def test_help_lists_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["x", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--sparse_probe " in printed and "--sparse_probe_ks" in printed and "k-sparse probing" in printed


def test_table_cell_and_browser_section_from_a_report():
    means = {"1": {"accuracy": 0.9, "auc": 0.8125}, "16": {"accuracy": 0.95, "auc": None}}
    neuron_means = {"1": {"accuracy": 0.8, "auc": 0.7}, "16": {"accuracy": 0.9, "auc": 0.85}}
    task = {"positives": 40, "negatives": 60, "test_positives": 20, "test_negatives": 30, "majority_accuracy": 0.6,
            "latents": {"1": {"accuracy": 0.9, "auc": 0.8125, "units": [12]},
                        "16": {"accuracy": 0.95, "auc": 0.9, "units": list(range(16))}},
            "neurons": {"1": {"accuracy": 0.8, "auc": 0.7, "units": [3]},
                        "16": {"accuracy": 0.9, "auc": 0.85, "units": list(range(16))}}}
    report = {"sae": "runs/a", "sparse_probe": {"ks": [1, 16], "mean": means, "neuron_mean": neuron_means,
                                                "tasks": {"has_digit": task}, "skipped": {"code_block": "0 positive"},
                                                "excluded_token_ids": []}}
    header, row = interpretability_table([report]).splitlines()
    assert "sparse probe AUC (neurons)" in header and row.endswith("k=1 0.812 (0.700) · k=16 – (0.850)")
    html = sparse_probe_html(report)
    assert 'id="sparse-probe-table"' in html and "has_digit" in html and "code_block: 0 positive" in html
    assert 'data-value="0.8125"' in html and 'data-value="12"' in html
    assert sparse_probe_html({"sae": "runs/a"}) == ""


def test_a_batchtopk_sae_whose_codes_differ_in_width_from_batch_to_batch(tiny_lm, windows):
    """BatchTopK codes are as wide as the busiest token of their batch: the probes pad them (this crashed)."""
    from sae.config import SaeConfig
    from sae.model import SparseAutoencoder

    model, tokenizer = tiny_lm
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4, activation="batchtopk"))
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    section = sparse_probe.sparse_probe_section(model, tokenizer, sae, "transformer.h.1", windows, ks=(1,),
                                                min_class_tokens=1, batch_windows=3)
    assert section["tasks"] or section["skipped"]
