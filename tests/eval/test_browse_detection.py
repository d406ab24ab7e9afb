"""`python -m eval.browse` with detection and fuzzing scores (Paulo et al. 2024) in explain.jsonl and the
report: shown on the unit pages, as AUC columns of the index's tables and in its summary; absent, nothing."""

import json

import pytest

from eval.browse import build_site

from browser_helpers import CHROMIUM_INSTALL_HINT, chromium_executable, parse_html, render_pages
from test_browse import make_sae_dir, read, write_report


def metrics(balanced_accuracy, f1, auc, positives=8, negatives=4, flags=()):
    """One scorer's entry as eval/explain/detection.classification_metrics writes it."""
    return {"balanced_accuracy": balanced_accuracy, "f1": f1, "auc": auc, "positives": positives,
            "negatives": negatives, "flags": list(flags)}


# unit -> the keys `python -m eval --explain` adds to its record; latent 12 has none (an older record).
CLASSIFICATION = {
    3: {"detection": {"token-lookup": metrics(0.8125, 0.7333, 0.875), "embedding": metrics(0.625, 0.5, 0.6875)},
        "detection_shuffled": {"token-lookup": metrics(0.5, 0.4, 0.4375), "embedding": metrics(0.5, 0.25, 0.5625)},
        "fuzzing": {"token-lookup": metrics(0.75, 0.6667, 0.8125), "embedding": metrics(0.5, 0.0, 0.9375)},
        "fuzzing_shuffled": {"token-lookup": metrics(0.25, 0.2, 0.3125), "embedding": metrics(0.5, 0.0, 0.375)}},
    7: {"detection": {"token-lookup": metrics(0.5, 0.5, 0.625), "embedding": metrics(0.75, 0.8, 0.8125),
                      "odd<scorer>": metrics(0.5, 0.5, 0.5)},
        "fuzzing": {"token-lookup": metrics(0.5, 0.5, 0.5), "embedding": metrics(0.625, 0.5, 0.6875)}},
    5: {"detection": {"token-lookup": metrics(0.9, 0.85, 0.95),
                      "embedding": metrics(None, 0.9, None, negatives=0, flags=["no negatives"])}},
}

REPORT_EXPLAIN = {
    "mean_score_top_and_random": 0.5, "mean_score_random_only": 0.1,
    "primary_detection_scorer": "embedding", "mean_detection_auc": 0.75,
    "detection": {"embedding": {"latents": {"mean_auc": 0.75, "ci95_auc": 0.0625, "units": 2}}},
    "primary_fuzzing_scorer": "embedding", "mean_fuzzing_auc": 0.8125,
    "fuzzing": {"embedding": {"latents": {"mean_auc": 0.8125, "ci95_auc": None, "units": 2}}},
}


def add_classification(sae_dir, classification=CLASSIFICATION):
    """Rewrites explain.jsonl with the keys of `classification` (unit -> keys) added to its records."""
    path = sae_dir / "explain.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.update(classification.get(record["unit"], {}))
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def scored_site(tmp_path):
    """The site folder of an SAE whose records and report carry detection and fuzzing."""
    sae_dir = make_sae_dir(tmp_path)
    add_classification(sae_dir)
    report = write_report(tmp_path / "report.json")
    report.write_text(json.dumps({**json.loads(report.read_text()), "explain": REPORT_EXPLAIN}))
    out = tmp_path / "site"
    build_site(sae_dir, out, report_path=report)
    return out


def table_rows(page, **attributes):
    """The body rows of the one table with `attributes`, each as the texts of its cells."""
    [table] = [element for element in parse_html(page) if element.tag == "table"
               and all(element.attributes.get(key) == value for key, value in attributes.items())]
    [body] = [child for child in table.children if child.tag == "tbody"]
    return [[cell.text for cell in row.children] for row in body.children]


def table_header(page, **attributes):
    [table] = [element for element in parse_html(page) if element.tag == "table"
               and all(element.attributes.get(key) == value for key, value in attributes.items())]
    [head] = [child for child in table.children if child.tag == "thead"]
    return [cell.text for cell in head.children[0].children]


def test_unit_page_shows_every_scorers_detection_and_fuzzing_with_the_shuffled_control(scored_site):
    page = read(scored_site / "latent-3.html")
    assert "<h2>Detection and fuzzing</h2>" in page
    header = table_header(page, **{"class": "scores classification"})
    assert header == ["method", "scorer", "balanced accuracy", "F1", "AUC", "shuffled balanced accuracy",
                      "shuffled F1", "shuffled AUC", "yes / no questions", "flags"]
    rows = table_rows(page, **{"class": "scores classification"})
    assert rows == [
        ["detection", "token-lookup", "0.8125", "0.7333", "0.875", "0.5", "0.4", "0.4375", "8 / 4", ""],
        ["detection", "embedding", "0.625", "0.5", "0.6875", "0.5", "0.25", "0.5625", "8 / 4", ""],
        ["fuzzing", "token-lookup", "0.75", "0.6667", "0.8125", "0.25", "0.2", "0.3125", "8 / 4", ""],
        ["fuzzing", "embedding", "0.5", "0", "0.9375", "0.5", "0", "0.375", "8 / 4", ""],
    ]
    assert "<h2>Scores</h2>" in page  # beside the simulation scores, which stay


def test_unit_page_without_shuffled_control_or_with_undefined_metrics(scored_site):
    latent = read(scored_site / "latent-7.html")
    assert "shuffled AUC" not in table_header(latent, **{"class": "scores classification"})
    assert "odd&lt;scorer&gt;" in latent and "odd<scorer>" not in latent
    neuron = table_rows(read(scored_site / "neuron-5.html"), **{"class": "scores classification"})
    assert neuron == [["detection", "token-lookup", "0.9", "0.85", "0.95", "8 / 4", ""],
                      ["detection", "embedding", "–", "0.9", "–", "8 / 0", "no negatives"]]


def test_index_tables_have_the_primary_scorers_auc_columns_with_a_dash_where_absent(scored_site):
    index = read(scored_site / "index.html")
    header = table_header(index, id="latent-table")
    assert header[-2:] == ["detection AUC (embedding)", "fuzzing AUC (embedding)"]
    rows = {row[0]: row[-2:] for row in table_rows(index, id="latent-table")}
    assert rows == {"3": ["0.6875", "0.9375"], "7": ["0.8125", "0.6875"], "12": ["–", "–"]}
    assert 'data-value="0.6875"' in index and '<td class="num" data-value="">–</td>' in index
    # the neurons have detection only
    assert table_header(index, id="neuron-table")[-1] == "detection AUC (embedding)"
    assert [row[-1] for row in table_rows(index, id="neuron-table")] == ["–"]  # its embedding AUC is undefined


def test_index_summary_has_mean_auc_per_kind_scorer_and_the_reports_means(scored_site):
    index = read(scored_site / "index.html")
    assert table_header(index, id="detection-summary") == [
        "units", "detection AUC (token-lookup)", "detection AUC (embedding)", "detection AUC (odd<scorer>)",
        "fuzzing AUC (token-lookup)", "fuzzing AUC (embedding)"]
    assert table_rows(index, id="detection-summary") == [
        ["Latents (3)", "0.75", "0.75", "0.5", "0.6562", "0.8125"],  # means over latents 3 and 7 (12 has none)
        ["Latents, shuffled control (1)", "0.4375", "0.5625", "–", "0.3125", "0.375"],
        ["Neurons (1)", "0.95", "–", "–", "–", "–"],
    ]
    assert "mean detection AUC over latents (embedding), eval report" in index
    assert "0.75 ± 0.0625" in index and ">0.8125</td>" in index
    assert "odd&lt;scorer&gt;" in index and "odd<scorer>" not in index


def test_records_without_detection_or_fuzzing_render_as_before(tmp_path):
    """Older explain.jsonl (no such keys) and a report without them; keys of the wrong shape are ignored."""
    sae_dir = make_sae_dir(tmp_path)
    wrong_shapes = {"detection": "not a table", "fuzzing": {"token-lookup": 0.5}, "fuzzing_shuffled": []}
    add_classification(sae_dir, {3: wrong_shapes})
    out = tmp_path / "site"
    index = read(build_site(sae_dir, out, report_path=write_report(tmp_path / "report.json")))
    assert "AUC" not in index and 'id="detection"' not in index and "Explanation scores" in index
    assert table_header(index, id="latent-table")[-1] == "embedding"  # the simulation scores' column ends it
    for unit in (3, 7, 12):
        page = read(out / f"latent-{unit}.html")
        assert "Detection and fuzzing" not in page and "<h2>Scores</h2>" in page


@pytest.mark.skipif(chromium_executable() is None, reason=f"chromium not on PATH; {CHROMIUM_INSTALL_HINT}")
def test_sorting_by_an_auc_column_puts_the_dashes_last(scored_site, tmp_path):
    """The index's sort script, run in headless chromium: a header clicked once (ascending) and twice
    (descending); the unit without a detection AUC ("–") stays last either way."""
    index = read(scored_site / "index.html")
    orders = []
    for clicks in (1, 2):
        click = "const h = document.querySelector('#latent-table thead th:nth-last-child(2)');" + " h.click();" * clicks
        copy = scored_site / f"sorted-{clicks}.html"
        copy.write_text(index.replace("</body>", f"<script>{click}</script>\n</body>"), encoding="utf-8")
        [rendered] = render_pages([copy], tmp_path / f"chromium-{clicks}")
        assert rendered.console == []
        orders.append([row[0] for row in table_rows(rendered.dom, id="latent-table")])
    assert orders == [["3", "7", "12"], ["7", "3", "12"]]
