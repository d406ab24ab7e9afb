"""The tables of `python -m eval`: the comparison table (never_fired with the tokens it counts over) and
the interpretability table (one row per SAE, the LM it reads, "–" where not run); both name each row's
kind (a report written before transcoders is an SAE's)."""

from eval.report import comparison_table, interpretability_table


def test_comparison_table_names_never_fired_and_its_token_count():
    report = dict(sae="runs/a", model="m", hookpoint="h", data={"dataset": "x", "held_out": "split 'test'"}, l0=4.0,
                  fvu=0.5, nmse=0.4, ce_sae=4.0, delta_ce=0.1, kl=0.1, ce_recovered=0.9, ce_recovered_mean=0.8,
                  never_fired_frac=0.0625, never_fired_tokens=16384, ce_clean=3.9, ce_zero=9.0, ce_mean=6.0,
                  ce_positions=16000)
    header, row, _, footer = comparison_table([report]).splitlines()
    # a report read from a file written before dense_frac has a dash there
    assert header.split()[-2:] == ["never_fired", "dense"] and "dead" not in header and row.split()[-2:] == ["0.0625", "–"]
    _, row, _, _ = comparison_table([{**report, "dense_frac": 0.125}]).splitlines()
    assert row.split()[-1] == "0.1250"
    assert header.split()[:3] == ["sae", "kind", "hookpoint"] and row.split()[1] == "sae"
    assert footer.endswith("(x, split 'test'); never_fired: no firing on any of 16,384 tokens")


def test_interpretability_table_rows_and_missing_values():
    reports = [
        {"sae": "runs/a", "kind": "skip transcoder",
         "n2g": {"precision": None, "recall": 0.5, "precision_shuffled": float("nan"), "recall_shuffled": 0.1}},
        {"sae": "runs/random", "model_init": "random (seed 0)", "ablation_sparsity": {"mean": 0.0123},
         "probe": {"mean_loss": 0.2, "baseline_loss": 0.3, "neuron_mean_loss": 0.25},
         "explain": {"mean_score_top_and_random": 0.4567}},
    ]
    header, first, second = [line.split("  ") for line in interpretability_table(reports).splitlines()]
    header, first, second = ([cell.strip() for cell in line if cell.strip()] for line in (header, first, second))
    assert header == ["sae", "kind", "lm", "explain", "ablation", "probe (prior / neurons)", "n2g P / R (shuffled)"]
    assert first == ["runs/a", "skip transcoder", "pretrained", "–", "–", "–", "– / 0.500 (– / 0.100)"]
    assert second == ["runs/random", "sae", "random (seed 0)", "0.457", "0.0123", "0.2000 (0.3000 / 0.2500)", "–"]


def test_the_kinds_of_sae():
    from eval.report import sae_kind

    assert [sae_kind(transcode, skip) for transcode, skip in ((False, False), (True, False), (True, True), (False, True))] \
        == ["sae", "transcoder", "skip transcoder", "skip sae"]
