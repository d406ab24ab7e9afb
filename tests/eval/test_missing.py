"""Missing values (eval/missing.py): the one mean of the reports, and null read back as "–" by the
report table and the browsing site."""

import json
import math

import pytest

from eval.browse.metrics import ablation_html, n2g_html, probe_html
from eval.browse.pages import facts_table
from eval.missing import format_or_dash, mean_or_none
from eval.report import interpretability_table


def test_mean_or_none():
    assert mean_or_none([]) is None and mean_or_none(iter([])) is None
    assert mean_or_none([0.1] * 10) == 0.1  # summed exactly: sum() gives 0.09999999999999999
    assert mean_or_none(value for value in (1, 2, 6)) == 3.0


@pytest.mark.parametrize("value, shown", [(None, "–"), (math.nan, "–"), (0.12345, "0.123"), (2, "2.000"), (True, "–")])
def test_format_or_dash(value, shown):
    assert format_or_dash(value, ".3f") == shown


NULL_SECTIONS = {
    "sae": "runs/a",
    "probe": {"mean_loss": None, "baseline_loss": None, "neuron_mean_loss": None, "tasks": {}, "skipped": {"t": "why"}},
    "ablation_sparsity": {"mean": None, "median": None, "quantiles": {"0.1": None}, "mean_over_ablations": None,
                          "latents": 0, "ablations": 0, "no_effect": 0, "horizon": 16, "vocab": 0, "per_latent": {}},
    "n2g": {"units": 0, "precision": None, "recall": None, "precision_shuffled": None, "recall_shuffled": None,
            "per_unit": []},
}


def test_null_means_read_back_as_dashes():
    report = json.loads(json.dumps(NULL_SECTIONS, allow_nan=False))
    html = ablation_html(report) + probe_html(report) + n2g_html(report)
    assert "None" not in html and "nan" not in html.lower()
    assert html.count(">–<") == 2 + 3 + 4  # ablation mean and median, the probe's three means, n2g's four
    row = interpretability_table([report]).splitlines()[1]
    assert "– (– / –)" in row and "– / – (– / –)" in row


def test_a_null_fact_is_a_dash_not_the_word_none():
    assert ">–<" in facts_table([("mean", None)]) and "None" not in facts_table([("mean", None)])


def test_a_report_with_a_nan_ratio_is_written_as_strict_json(tmp_path):
    """ce_recovered is NaN in memory when ablating does not change the loss (a zero denominator); the
    file has null there, and strict JSON readers accept it."""
    from eval.report import write_report

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    report = {"sae": "a", "ce_recovered": math.nan, "kl": math.inf, "nested": [{"x": -math.inf, "y": 1.5}], "n": 3}
    path = write_report(tmp_path / "report.json", [report])
    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "sae": "a", "ce_recovered": None, "kl": None, "nested": [{"x": None, "y": 1.5}], "n": 3}
    assert math.isnan(report["ce_recovered"])  # the report in memory is left as it was
