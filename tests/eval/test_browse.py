"""`python -m eval.browse`: the static site of an SAE's latents, checked as HTML and in a headless browser."""

import json
import re

import pytest

from eval.browse import BrowseError, build_site, nice_ticks
from eval.browse.__main__ import main
from sae.errors import UsageError

from browser_helpers import CHROMIUM_INSTALL_HINT, chromium_executable, parse_html, render_pages, svg_fragments

SCRIPT_TOKEN = "<script>alert(1)</script>"

# unit kind, id, explanation, [(tokens, activations)] of the top excerpts; random excerpts are made below.
UNITS = [
    ("latent", 3, "closing <b>tags</b> & ampersands", [
        ([" a", SCRIPT_TOKEN, " &", "\n", "\tb"], [0.0, 4.0, 1.0, 2.0, 0.5]),
        ([" x", " y"], [3.0, 0.0]),
    ]),
    ("latent", 7, "the word dog", [([" the", " dog"], [0.0, 2.5])]),
    ("latent", 12, "never active here", [([" nothing"], [0.0])]),
    ("neuron", 5, "commas", [([",", " and"], [1.5, -0.1])]),
]

RANDOM_EXCERPTS = [([" r1", " r2", " r3", " r4"], [0.0, 1.0, 0.0, 0.0])]
SILENT_UNIT = 12
"""The latent that is zero on all its excerpts, random ones included."""


def random_excerpts(unit):
    """The random excerpts of a unit: one token in four active, except for SILENT_UNIT."""
    return [([" r1", " r2"], [0.0, 0.0])] if unit == SILENT_UNIT else RANDOM_EXCERPTS


def unit_record(kind, unit, explanation, top, shuffled_of=None):
    """One line of explain.jsonl, as `python -m eval --explain` writes it."""
    def excerpts(pairs):
        return [{"tokens": tokens, "activations": activations} for tokens, activations in pairs]

    flagged = {"random_only": "constant activations"}
    record = {
        "kind": kind, "unit": unit, "explanation": explanation,
        "scores": {"token-lookup": {"top_and_random": 0.5 + unit / 100, "random_only": 0.1, "flags": {}},
                   "embedding": {"top_and_random": 0.25, "random_only": 0.0, "flags": flagged}},
        "excerpts": {"top": excerpts(top), "random": excerpts(random_excerpts(unit))},
    }
    if shuffled_of is not None:
        record["shuffled_scores"] = {"token-lookup": {"top_and_random": -0.02, "random_only": 0.01, "flags": {}}}
        record["shuffled_explanation_of"] = shuffled_of
    return record


FINAL_METRICS = {"last_train_batch": {"fvu": 0.3, "l0": 2.0, "dead_frac": 0.0, "lr": 1e-3},
                 "held_out": {"fvu": 0.35, "l0": 2.0, "never_fired_frac": 0.1875, "never_fired_tokens": 2048}}
"""cfg.json's final_metrics as the trainer writes them (with held-out evals)."""


def make_sae_dir(root, with_log=True, with_explain=True, final_metrics=FINAL_METRICS):
    """A run folder with SAE_DIR = root/run/layer.1 (cfg.json, explain.jsonl) and optionally run/log.jsonl."""
    sae_dir = root / "run" / "layer.1"
    sae_dir.mkdir(parents=True)
    cfg = {"d_in": 8, "num_latents": 32, "k": 2, "model": "tiny-lm", "hookpoint": "layer.1",
           "run_name": "unit-test-run", "tokens_trained": 4096, "final_metrics": final_metrics}
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    if with_explain:
        lines = [unit_record(kind, unit, explanation, top, shuffled_of=7 if unit == 3 else None)
                 for kind, unit, explanation, top in UNITS]
        (sae_dir / "explain.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if with_log:
        log = [{"step": step, "fvu": 1 / step, "auxk_loss": 0.0, "l0": 2.0, "dead_frac": 0.1 / step, "lr": 1e-3,
                "tokens": 64 * step, "tokens_per_s": 1000.0} for step in range(10, 50, 10)]
        log.insert(2, {"step": 20, "eval/fvu": 0.6, "eval/ce_recovered": 0.8, "eval/never_fired_frac": 0.25})
        log.append({"step": 40, "eval/fvu": 0.3, "eval/ce_recovered": 0.9, "eval/never_fired_frac": 0.1875})
        (root / "run" / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    return sae_dir


def write_report(path):
    """A small eval report as `python -m eval --out` writes it (the keys the index shows)."""
    report = {"sae": "elsewhere", "nmse": 0.2, "fvu": 0.25, "l0": 2.0, "never_fired_frac": 0.125,
              "never_fired_tokens": 4096, "dense_frac": 0.0625, "tokens": 4096, "ce_clean": 3.0,
              "ce_sae": 3.5, "ce_recovered": 0.9375, "ce_recovered_mean": 0.75, "kl": 0.4,
              "density_histogram": {"log10_bin_edges": [-3.0, -2.0, -1.0, 0.0], "counts": [1, 5, 2], "never_fired": 4},
              "ablation_sparsity": {"mean": 0.02, "median": 0.015, "latents": 3, "ablations": 9, "horizon": 16,
                                    "vocab": 300, "per_latent": {"1": 0.01, "5": 0.015, "9": 0.035}},
              "probe": {"mean_loss": 0.21, "baseline_loss": 0.3, "neuron_mean_loss": 0.25, "skipped": {"in_code_block": "no positives"},
                        "tasks": {"digit": {"positives": 40, "tokens": 900, "loss": 0.123, "best_latent": 17,
                                            "baseline_loss": 0.2, "neuron_loss": 0.18, "best_neuron": 3}}},
              "n2g": {"units": 2, "precision": 0.75, "recall": 0.5, "precision_shuffled": 0.1, "recall_shuffled": 0.05,
                      "per_unit": [{"unit": 3, "patterns": "«def» * «(»", "precision": 1.0, "recall": 0.625},
                                   {"unit": 8, "patterns": "no pattern", "precision": 0.5, "recall": 0.375}]}}
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def site(tmp_path):
    """(SAE folder, site folder) of a site built with the training log and an eval report."""
    sae_dir = make_sae_dir(tmp_path)
    out = tmp_path / "site"
    build_site(sae_dir, out, report_path=write_report(tmp_path / "report.json"))
    return sae_dir, out


def read(path):
    return path.read_text(encoding="utf-8")


def token_spans(page_text):
    """(shown text, exact activation from the title, background alpha from the style) of every token span."""
    spans = []
    for element in parse_html(page_text):
        if element.tag == "span" and element.attributes.get("class") == "tok":
            alpha = re.fullmatch(r"background-color: rgba\(\d+, \d+, \d+, ([0-9.]+)\)", element.attributes["style"])
            assert alpha, element.attributes["style"]
            spans.append((element.text, float(element.attributes["title"]), float(alpha.group(1))))
    return spans


def test_site_has_an_index_linking_every_unit_page(site):
    _, out = site
    expected = {f"{kind}-{unit}.html" for kind, unit, _, _ in UNITS}
    assert {path.name for path in out.glob("*.html")} == expected | {"index.html"}
    index = read(out / "index.html")
    links = {element.attributes["href"] for element in parse_html(index) if element.tag == "a"}
    assert expected <= links
    assert "unit-test-run" in index and "tiny-lm" in index and "layer.1" in index
    # Latents and neurons in separate tables, each row linking to its own page.
    for kind, table_id in (("latent", "latent-table"), ("neuron", "neuron-table")):
        tables = [element for element in parse_html(index) if element.attributes.get("id") == table_id]
        assert len(tables) == 1
        rows = [child for child in tables[0].children if child.tag == "tbody"][0].children
        assert len(rows) == sum(unit_kind == kind for unit_kind, *_ in UNITS)


def test_every_page_is_balanced_html_with_nothing_external(site):
    _, out = site
    for path in out.glob("*.html"):
        text = read(path)
        elements = parse_html(text)
        assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
        assert not re.search(r"\b(src|href)=\"(https?:)?//", text), path.name
        assert not any(element.tag in ("link", "img", "iframe") for element in elements)
        scripts = [element for element in elements if element.tag == "script"]
        assert len(scripts) == (1 if path.name == "index.html" else 0)  # the index's sort script only
        assert not any("src" in script.attributes for script in scripts)
        svg_fragments(text)  # each inline SVG is well-formed XML


def test_tokens_and_explanations_are_escaped(site):
    _, out = site
    page = read(out / "latent-3.html")
    assert SCRIPT_TOKEN not in page and "<b>tags</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and " &amp;<" in page
    assert "closing &lt;b&gt;tags&lt;/b&gt; &amp; ampersands" in read(out / "index.html")
    shown = [text for text, _, _ in token_spans(page)]
    assert SCRIPT_TOKEN in shown  # the parser unescapes it back to the token's text: shown, not run


def test_shading_is_activation_over_the_units_max(site):
    _, out = site
    for kind, unit, _, top in UNITS:
        activations = [value for _, values in top + random_excerpts(unit) for value in values]
        spans = token_spans(read(out / f"{kind}-{unit}.html"))
        assert [exact for _, exact, _ in spans] == activations  # the title holds the exact value
        peak = max(activations)
        for _, activation, alpha in spans:
            expected = min(max(activation / peak, 0.0), 1.0) if peak > 0 else 0.0
            assert alpha == pytest.approx(expected, abs=1e-4)
    assert max(alpha for _, _, alpha in token_spans(read(out / "latent-3.html"))) == 1.0


def test_newlines_and_tabs_are_shown_as_symbols(site):
    _, out = site
    elements = parse_html(read(out / "latent-3.html"))
    excerpts = [element for element in elements if element.attributes.get("class") == "excerpt"]
    assert "⏎" in excerpts[0].text and "⇥b" in excerpts[0].text
    assert not any("\n" in excerpt.text or "\t" in excerpt.text for excerpt in excerpts)


def test_unit_page_has_scores_histogram_and_neighbour_links(site):
    _, out = site
    page = read(out / "latent-7.html")
    links = {element.attributes["href"] for element in parse_html(page) if element.tag == "a"}
    assert {"index.html#latents", "latent-3.html", "latent-12.html"} <= links
    assert "token-lookup" in page and "constant activations" in page
    assert [svg.find("title").text for svg in svg_fragments(page)] == ["Non-zero activations (2 tokens)"]
    shuffled = read(out / "latent-3.html")
    assert "Shuffled control" in shuffled and 'href="latent-7.html"' in shuffled
    assert "zero on every token" in read(out / f"latent-{SILENT_UNIT}.html")  # no histogram without a non-zero value


def test_index_density_is_measured_on_the_random_excerpts(site):
    _, out = site
    index = read(out / "index.html")
    assert "measured on the random excerpts" in index
    rows = [element for element in parse_html(index) if element.tag == "tr" and element.children[0].tag == "td"
            and element.children[0].children and element.children[0].children[0].tag == "a"]
    density = {row.children[0].text: float(row.children[2].attributes["data-value"]) for row in rows}
    # 1 of the 4 random tokens is > 0, except for SILENT_UNIT (its unit ids are unique across kinds here)
    assert density == {str(unit): 0.0 if unit == SILENT_UNIT else 0.25 for _, unit, _, _ in UNITS}


def test_index_shows_the_report_and_training_curves(site):
    _, out = site
    index = read(out / "index.html")
    titles = [svg.find("title").text for svg in svg_fragments(index)]
    assert titles == ["Latent density", "Ablation sparsity per latent", "Fraction of variance unexplained",
                      "L0 (active latents per token)", "Dead latent fraction (training: silent for dead_tokens)",
                      "Latents never fired on the held-out eval", "CE loss recovered (eval)"]
    assert "0.9375" in index and "CE loss recovered (vs zero ablation)" in index
    assert "never fired on the eval tokens (not in the chart): 4" in index
    fvu_chart = svg_fragments(index)[2]
    assert len(fvu_chart.findall("polyline")) == 2  # train fvu and eval/fvu, with a legend
    for svg in svg_fragments(index):  # a title, axes with ticks, tick labels
        assert svg.find("text") is not None and len(svg.findall("line")) >= 4


def headline_cards(index):
    """{card title: {label: value shown}} of the index's headline cards."""
    cards = {}
    for section in (element for element in parse_html(index) if element.tag == "section"):
        title = next(child.text for child in section.children if child.tag == "h2")
        [table] = [child for child in section.children if child.tag == "table"]
        cards[title] = {row.children[0].text: row.children[1].text for row in table.children[0].children}
    return cards


def test_headline_says_which_weights_and_tokens_each_number_is_from(site):
    _, out = site
    index = read(out / "index.html")
    cards = headline_cards(index)
    assert cards["Last training batch"] == {"fraction of variance unexplained": "0.3", "L0 (active latents per token)": "2",
                                            "dead latent fraction (silent for dead_tokens)": "0", "learning rate": "0.001"}
    assert "final_metrics.last_train_batch: that batch, at the training weights (not the saved SAE" in index
    held_out = cards["Held-out eval, end of training"]
    assert held_out["latents that never fired (fraction)"] == "0.1875" and held_out["fraction of variance unexplained"] == "0.35"
    assert held_out["tokens never_fired_frac counts over"] == "2,048"
    report = cards["Evaluation"]
    assert report["latents that never fired (fraction)"] == "0.125" and report["tokens never_fired_frac counts over"] == "4,096"
    assert report["latents firing on more than 10% of those tokens (fraction)"] == "0.0625"
    assert not any("dead" in label for label in [*held_out, *report])


def test_headline_reads_files_written_before_never_fired_frac(tmp_path):
    """Older cfg.json: one flat final_metrics with the held-out eval under "eval/"; older reports and logs:
    the never-fired fraction under the name dead_frac."""
    flat = {"fvu": 0.3, "l0": 2.0, "dead_frac": 0.0, "lr": 1e-3, "eval/fvu": 0.35, "eval/dead_frac": 0.1875}
    sae_dir = make_sae_dir(tmp_path, final_metrics=flat)
    log = sae_dir.parent / "log.jsonl"
    log.write_text(log.read_text().replace("eval/never_fired_frac", "eval/dead_frac"))
    report = write_report(tmp_path / "report.json")
    old = json.loads(report.read_text())
    old["dead_frac"] = old.pop("never_fired_frac")
    del old["never_fired_tokens"]
    report.write_text(json.dumps(old))
    index = read(build_site(sae_dir, tmp_path / "site", report_path=report))
    cards = headline_cards(index)
    assert cards["Last training batch"]["dead latent fraction (silent for dead_tokens)"] == "0"
    assert cards["Held-out eval, end of training"] == {"fraction of variance unexplained": "0.35",
                                                       "latents that never fired (fraction)": "0.1875"}
    assert cards["Evaluation"]["latents that never fired (fraction)"] == "0.125"
    assert cards["Evaluation"]["tokens never_fired_frac counts over"] == "4,096"  # the report's tokens
    assert "Latents never fired on the held-out eval" in [svg.find("title").text for svg in svg_fragments(index)]


def test_index_shows_ablation_probe_n2g_and_the_runs_scaling_plot(tmp_path):
    sae_dir = make_sae_dir(tmp_path)
    scaling = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><title>Scaling fit of fvu</title></svg>'
    (sae_dir.parent / "scaling.svg").write_text(scaling)
    index = read(build_site(sae_dir, tmp_path / "site", report_path=write_report(tmp_path / "report.json")))
    for section in ("ablation", "probe", "n2g", "scaling"):
        assert f'id="{section}"' in index
    probe_rows = [element for element in parse_html(index) if element.attributes.get("id") == "probe-table"][0]
    cells = [cell.text for cell in [child for child in probe_rows.children if child.tag == "tbody"][0].children[0].children]
    assert cells == ["digit", "40", "900", "0.123", "17", "0.2", "0.18", "3"]
    assert "in_code_block: no positives" in index
    assert "«def» * «(»" in index and "0.625" in index
    assert "Scaling fit of fvu" in index
    histogram = [svg for svg in svg_fragments(index) if getattr(svg.find("title"), "text", "") == "Ablation sparsity per latent"][0]
    assert sum(int(rect.find("title").text.rsplit(": ", 1)[1]) for rect in histogram.findall("rect")) == 3


def test_without_log_or_report_there_are_no_plots_but_a_note(tmp_path):
    sae_dir = make_sae_dir(tmp_path, with_log=False)
    index = read(build_site(sae_dir, tmp_path / "site"))
    assert svg_fragments(index) == []
    assert 'id="no-training-log"' in index and "training curves are not shown" in index
    assert "Latent density" not in index


@pytest.mark.parametrize("explain_jsonl", ["missing", "empty"])
def test_without_explanations_the_site_is_the_index_with_the_report(tmp_path, explain_jsonl):
    """An eval without --explain (no explain.jsonl), or one that explained nothing (an empty file)."""
    sae_dir = make_sae_dir(tmp_path, with_explain=False)
    if explain_jsonl == "empty":
        (sae_dir / "explain.jsonl").write_text("")
    index_path = main([str(sae_dir), "--out", str(tmp_path / "site"), "--report", str(write_report(tmp_path / "r.json"))])
    index = read(index_path)
    assert 'id="no-explanations"' in index and f"python -m eval {sae_dir} --explain N" in index
    assert "Evaluation" in index and "Latent density" in index and "Training curves" in index
    assert "Explanation scores" not in index and "latent-table" not in index
    assert sorted(path.name for path in index_path.parent.iterdir()) == [".eval-browse.json", "index.html"]
    with pytest.raises(BrowseError, match="cfg.json"):
        build_site(tmp_path / "run", tmp_path / "site")  # the run folder, not the SAE folder


def test_refuses_a_foreign_non_empty_folder_unless_forced(tmp_path):
    sae_dir = make_sae_dir(tmp_path)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    with pytest.raises(BrowseError, match="not empty.*--force"):
        build_site(sae_dir, out)
    assert sorted(path.name for path in out.iterdir()) == ["todo.txt"]
    build_site(sae_dir, out, force=True)
    assert (out / "index.html").is_file() and (out / "todo.txt").read_text() == "mine"


def test_rebuilding_replaces_the_previous_site(tmp_path):
    sae_dir = make_sae_dir(tmp_path)
    out = tmp_path / "site"
    build_site(sae_dir, out)
    lines = (sae_dir / "explain.jsonl").read_text().splitlines()
    (sae_dir / "explain.jsonl").write_text("\n".join(line for line in lines if '"unit": 12' not in line) + "\n")
    build_site(sae_dir, out)  # a previous output: no --force needed
    assert not (out / "latent-12.html").exists() and (out / "latent-7.html").exists()
    assert not [path for path in out.iterdir() if ".tmp-" in path.name]


def test_cli(tmp_path, capsys):
    sae_dir = make_sae_dir(tmp_path)
    report = write_report(tmp_path / "report.json")
    index = main([str(sae_dir), "--out", str(tmp_path / "site"), "--report", str(report)])
    assert index == tmp_path / "site" / "index.html" and "wrote" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--out"):
        main([str(sae_dir)])
    with pytest.raises(BrowseError, match="eval report not found"):
        main([str(sae_dir), "--out", str(tmp_path / "site"), "--report", str(tmp_path / "missing.json")])


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(10, 976) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(0.13, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # a constant 0: above it
    assert nice_ticks(0, 3, integer=True) == [0, 1, 2, 3]


@pytest.mark.skipif(chromium_executable() is None, reason=f"chromium not on PATH; {CHROMIUM_INSTALL_HINT}")
def test_pages_render_in_headless_chromium_without_console_errors(site, tmp_path):
    _, out = site
    control = tmp_path / "control.html"  # proves that console errors would be seen
    control.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>c</title></head><body>'
                       '<script>console.error("seen"); notDefined();</script></body></html>')
    pages = [out / "index.html", out / "latent-3.html", control]
    index, latent, rendered_control = render_pages(pages, tmp_path / "chromium")
    assert any("Uncaught ReferenceError" in line for line in rendered_control.console)

    assert index.console == [] and latent.console == []
    elements = parse_html(index.dom)
    table = next(element for element in elements if element.attributes.get("id") == "latent-table")
    links = [element.attributes["href"] for element in parse_html(index.dom) if element.tag == "a"]
    assert {"latent-3.html", "latent-7.html", "latent-12.html", "neuron-5.html"} <= set(links)
    assert all(header.attributes.get("title") == "click to sort"  # set by the sort script: it ran
               for row in table.children if row.tag == "thead" for header in row.children[0].children)

    spans = token_spans(latent.dom)
    top_text, top_activation, top_alpha = max(spans, key=lambda span: span[1])
    assert top_text == SCRIPT_TOKEN and top_activation == 4.0 and top_alpha == 1.0
    assert sum(alpha > 0 for _, _, alpha in spans) == 6
    assert not any(element.tag == "script" for element in parse_html(latent.dom))
