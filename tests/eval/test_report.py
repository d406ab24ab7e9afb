"""The interpretability table of `python -m eval`: one row per SAE, the LM it reads, "–" where not run."""

from eval.report import interpretability_table


def test_interpretability_table_rows_and_missing_values():
    reports = [
        {"sae": "runs/a", "n2g": {"precision": None, "recall": 0.5, "precision_shuffled": float("nan"), "recall_shuffled": 0.1}},
        {"sae": "runs/random", "model_init": "random (seed 0)", "ablation_sparsity": {"mean": 0.0123},
         "probe": {"mean_loss": 0.2, "baseline_loss": 0.3, "neuron_mean_loss": 0.25},
         "explain": {"mean_score_top_and_random": 0.4567}},
    ]
    header, first, second = [line.split("  ") for line in interpretability_table(reports).splitlines()]
    header, first, second = ([cell.strip() for cell in line if cell.strip()] for line in (header, first, second))
    assert header == ["sae", "lm", "explain", "ablation", "probe (prior / neurons)", "n2g P / R (shuffled)"]
    assert first == ["runs/a", "pretrained", "–", "–", "–", "– / 0.500 (– / 0.100)"]
    assert second == ["runs/random", "random (seed 0)", "0.457", "0.0123", "0.2000 (0.3000 / 0.2500)", "–"]
