"""The index page of the site: the run, headline numbers, plots and sortable tables of the units."""

from __future__ import annotations

from pathlib import Path

from ..missing import mean_or_none
from ..report import sae_kind
from .detection import auc_cells, auc_columns, auc_header_html, classification_summary_html
from .inputs import Unit, log_series, read_training_log
from .metrics import absorption_html, ablation_html, n2g_html, probe_html, scaling_html, sparse_probe_html
from .pages import facts_table, kinds_of, number_cell, page, plural, run_title, score_of, simulator_names, text_cell
from .svg import bar_chart, esc, format_number, line_chart

LOG_CURVES = [
    ("Fraction of variance unexplained", ["fvu", "eval/fvu"]),
    ("Normalized MSE", ["nmse", "eval/nmse"]),
    ("L0 (active latents per token)", ["l0", "eval/l0"]),
    ("Dead latent fraction (training: silent for dead_tokens)", ["dead_frac"]),
    # eval/dead_frac: older logs' name for eval/never_fired_frac
    ("Latents never fired on the held-out eval", ["eval/never_fired_frac", "eval/dead_frac"]),
    ("CE loss recovered (eval)", ["eval/ce_recovered", "eval/ce_recovered_mean"]),
]
"""(chart title, log keys drawn in it); a chart is drawn when the log has any of its keys."""

REPORT_METRICS = [
    ("fvu", "fraction of variance unexplained"),
    ("nmse", "normalized MSE"),
    ("l0", "L0 (active latents per token)"),
    ("never_fired_frac", "latents that never fired (fraction)"),
    ("never_fired_tokens", "tokens never_fired_frac counts over"),
    ("dense_frac", "latents firing on more than 10% of those tokens (fraction)"),
    ("ce_clean", "LM cross-entropy, clean"),
    ("ce_sae", "LM cross-entropy, SAE spliced in"),
    ("ce_recovered", "CE loss recovered (vs zero ablation)"),
    ("ce_recovered_mean", "CE loss recovered (vs mean ablation)"),
    ("kl", "KL(clean ‖ SAE)"),
    ("tokens", "eval tokens"),
]
"""Headline numbers of an eval report (and of cfg.json's final_metrics.held_out), in the order shown."""

TRAINING_METRICS = [
    ("fvu", "fraction of variance unexplained"),
    ("l0", "L0 (active latents per token)"),
    ("dead_frac", "dead latent fraction (silent for dead_tokens)"),
    ("lr", "learning rate"),
]
"""Headline numbers of cfg.json's final_metrics.last_train_batch, in the order shown."""

SORT_SCRIPT = """
"use strict";
// Click a header of a table.sortable to sort its rows by that column (again to reverse).
function cellKey(row, column) {
  const cell = row.cells[column], value = cell.dataset.value;
  if (value === undefined) return cell.textContent.trim().toLowerCase();
  return value === "" ? NaN : Number(value);  // "": a missing number ("–")
}
function isMissing(key) {
  return typeof key === "number" && isNaN(key);
}
function sortTable(table, column) {
  const header = table.tHead.rows[0].cells[column];
  const direction = header.dataset.direction === "ascending" ? "descending" : "ascending";
  for (const cell of table.tHead.rows[0].cells) delete cell.dataset.direction;
  header.dataset.direction = direction;
  const sign = direction === "ascending" ? 1 : -1;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const ka = cellKey(a, column), kb = cellKey(b, column);
    if (isMissing(ka) || isMissing(kb)) return isMissing(ka) - isMissing(kb);  // blanks last
    return sign * (ka < kb ? -1 : ka > kb ? 1 : 0);
  });
  for (const row of rows) body.appendChild(row);
}
for (const table of document.querySelectorAll("table.sortable")) {
  Array.from(table.tHead.rows[0].cells).forEach((header, column) => {
    header.title = "click to sort";
    header.addEventListener("click", () => sortTable(table, column));
  });
}
"""


def sae_facts(cfg: dict) -> str:
    """The SAE's kind (a transcoder reads its hookpoint's input and predicts its output), shape and training
    length from cfg.json."""
    keys = [("model", "model"), ("hookpoint", "hookpoint"), ("d_in", "d_in"), ("num_latents", "latents"),
            ("k", "k (active latents per token)"), ("tokens_trained", "tokens trained")]
    kind = sae_kind(bool(cfg.get("transcode")), bool(cfg.get("skip_connection")))
    return facts_table([("kind", kind), *((label, cfg[key]) for key, label in keys if key in cfg)])


def held_out_metrics(metrics: dict) -> dict:
    """Eval numbers (a report, final_metrics.held_out) with never_fired_frac and never_fired_tokens:
    older files call the first `dead_frac` and count it over the report's `tokens`."""
    if "dead_frac" not in metrics or "never_fired_frac" in metrics:
        return metrics
    renamed = {**metrics, "never_fired_frac": metrics["dead_frac"]}
    if "tokens" in metrics:
        renamed["never_fired_tokens"] = metrics["tokens"]
    return renamed


def final_metrics_of(cfg: dict) -> tuple[dict, dict]:
    """(last training batch, held-out eval) of cfg.json's final_metrics. Older files hold both in one
    flat dict, the held-out eval's under "eval/" keys."""
    final = cfg.get("final_metrics") if isinstance(cfg.get("final_metrics"), dict) else {}
    if "last_train_batch" in final or "held_out" in final:
        parts = [final.get("last_train_batch"), final.get("held_out")]
        train, held_out = (part if isinstance(part, dict) else {} for part in parts)
    else:
        train = {key: value for key, value in final.items() if not key.startswith("eval/")}
        held_out = {key.removeprefix("eval/"): value for key, value in final.items() if key.startswith("eval/")}
    return train, held_out_metrics(held_out)


def headline_html(cfg: dict, report: dict | None, report_path: Path | None) -> str:
    """Headline numbers side by side: the SAE's shape, the last training batch's numbers and the held-out
    eval at the end of training (cfg.json) and, when given, the eval report's."""
    cards = [("SAE", "", sae_facts(cfg))]
    train, held_out = final_metrics_of(cfg)
    if rows := [(label, train[key]) for key, label in TRAINING_METRICS if key in train]:
        cards.append(("Last training batch", "cfg.json's final_metrics.last_train_batch: that batch, at the "
                      "training weights (not the saved SAE's)", facts_table(rows)))
    if rows := [(label, held_out[key]) for key, label in REPORT_METRICS if key in held_out]:
        cards.append(("Held-out eval, end of training", "cfg.json's final_metrics.held_out: the saved SAE",
                      facts_table(rows)))
    if report is not None:
        report = held_out_metrics(report)
        data = report.get("data") if isinstance(report.get("data"), dict) else {}
        where = ", ".join(str(data[key]) for key in ("dataset", "held_out") if data.get(key))
        source = f"{report_path}" + (f" ({where})" if where else "")
        rows = [(label, report[key]) for key, label in REPORT_METRICS if key in report]
        cards.append(("Evaluation", source, facts_table(rows)))
    parts = []
    for title, source, table in cards:
        note = f'<p class="note">{esc(source)}</p>' if source else ""
        parts.append(f"<section><h2>{esc(title)}</h2>{note}{table}</section>")
    return f'<div class="cards">{"".join(parts)}</div>'


def density_histogram_html(report: dict) -> str:
    """The report's latent-density histogram as an SVG bar chart ("" when the report has none)."""
    density = report.get("density_histogram")
    if not isinstance(density, dict) or not density.get("counts"):
        return ""
    if len(density.get("log10_bin_edges") or []) != len(density["counts"]) + 1:
        return ('<h2>Latent density</h2>\n'
                '<p class="note">The report\'s density histogram has mismatched edges and counts.</p>')
    chart = bar_chart("Latent density", density["log10_bin_edges"], density["counts"],
                      "log10(fraction of eval tokens the latent fires on)", "latents")
    never = density.get("never_fired")
    note = "" if never is None else ('<p class="note">Latents that never fired on the eval tokens (not in the chart): '
                                     f"{esc(format_number(never))}.</p>")
    return f"<h2>Latent density</h2>\n{chart}\n{note}"


def training_curves_html(log_path: Path) -> str:
    """Training curves from the log as SVG line charts, or a note that there is no log."""
    log = read_training_log(log_path)
    if log is None:
        return (f'<h2>Training curves</h2>\n<p class="note" id="no-training-log">No training log at {esc(log_path)}: '
                "training curves are not shown.</p>")
    records, unreadable = log
    charts = []
    for title, keys in LOG_CURVES:
        series = {key: log_series(records, key) for key in keys}
        series = {key: points for key, points in series.items() if points}
        if series:
            charts.append(line_chart(title, series))
    note = f'<p class="note">From {esc(log_path)}'
    note += f"; {unreadable} unreadable line(s) skipped.</p>" if unreadable else ".</p>"
    if not charts:
        note = f'<p class="note" id="no-training-log">{esc(log_path)} has no curves to plot.</p>'
    return f'<h2>Training curves</h2>\n{note}\n<div class="plots">{"".join(charts)}</div>'


def mean_score_row(label: str, unit_scores: list[dict], simulators: list[str]) -> str:
    """A table row: `label`, then the mean top+random score of `unit_scores` under each simulator."""
    cells = []
    for name in simulators:
        values = [value for value in (score_of(scores, name) for scores in unit_scores) if value is not None]
        cells.append(number_cell(mean_or_none(values)))
    return f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>"


def score_summary_html(units: list[Unit]) -> str:
    """Mean top+random score per simulator: each kind, and its shuffled-explanation control."""
    simulators = simulator_names(units)
    if not simulators:
        return ""
    head = "".join(f'<th class="num">{esc(name)}</th>' for name in simulators)
    rows = []
    for kind in kinds_of(units):
        of_kind = [unit for unit in units if unit.kind == kind]
        rows.append(mean_score_row(f"{plural(kind)} ({len(of_kind)})", [unit.scores for unit in of_kind], simulators))
        shuffled = [unit.shuffled_scores for unit in of_kind if unit.shuffled_scores]
        if shuffled:
            rows.append(mean_score_row(f"{plural(kind)}, shuffled control ({len(shuffled)})", shuffled, simulators))
    return ('<h2>Explanation scores</h2>\n<p class="note">Mean correlation of the simulated with the true activations '
            "(top and random excerpts). The shuffled control scores each unit with another unit's explanation.</p>\n"
            f"<table><thead><tr><th>units</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def units_table_html(units: list[Unit], kind: str) -> str:
    """The sortable table of the units of one kind, each linking to its page."""
    of_kind = [unit for unit in units if unit.kind == kind]
    simulators = simulator_names(of_kind)
    aucs = auc_columns(of_kind)
    head = ('<th class="num">unit</th><th class="num">max act.</th><th class="num">density*</th><th>explanation</th>'
            + "".join(f'<th class="num">{esc(name)}</th>' for name in simulators) + auc_header_html(aucs))
    rows = []
    for unit in of_kind:
        cells = [f'<td class="num" data-value="{unit.unit}"><a href="{esc(unit.page)}">{unit.unit}</a></td>',
                 number_cell(unit.max_activation), number_cell(unit.random_density), text_cell(unit.explanation),
                 *(number_cell(score_of(unit.scores, name)) for name in simulators), *auc_cells(unit, aucs)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<h2 id="{esc(kind)}s">{esc(plural(kind))} ({len(of_kind)})</h2>\n'
            f'<table class="sortable units" id="{esc(kind)}-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>\n"
            '<p class="note">max act.: largest activation over the unit\'s excerpts. *density: fraction of the tokens '
            "of its random excerpts where it is &gt; 0 (measured on the random excerpts only). Scores: top+random "
            "correlation per simulator" + ("; detection / fuzzing AUC under the primary scorer" if aucs else "")
            + ". Click a header to sort.</p>")


def units_subtitle_html(units: list[Unit], explain_path: Path) -> str:
    """How many units are explained, with links to their tables; or, with none, how to explain some."""
    if not units:
        return (f'<p class="subtitle" id="no-explanations">No explained units ({esc(explain_path)} is missing or '
                f"empty): run <code>python -m eval {esc(explain_path.parent)} --explain N</code> to explain N latents "
                "and as many MLP neurons.</p>")
    contents = " · ".join(f'<a href="#{esc(kind)}s">{esc(plural(kind))}</a>' for kind in kinds_of(units))
    return f'<p class="subtitle">{len(units)} explained units; jump to {contents}</p>'


def index_html(cfg: dict, units: list[Unit], explain_path: Path, report: dict | None, report_path: Path | None,
               log_path: Path, scaling_svg: str | None = None) -> str:
    """The index page: run, headline numbers, plots, the report's other metrics and the tables of units
    (read from `explain_path`; without units, a note says how to make them)."""
    title = run_title(cfg) or "SAE"
    body = [f"<h1>{esc(title)}</h1>",
            units_subtitle_html(units, explain_path),
            headline_html(cfg, report, report_path),
            density_histogram_html(report) if report is not None else "",
            *((ablation_html(report), probe_html(report), sparse_probe_html(report), absorption_html(report),
               n2g_html(report))
              if report is not None else ()),
            scaling_html(scaling_svg),
            training_curves_html(log_path),
            score_summary_html(units),
            classification_summary_html(units, report),
            *(units_table_html(units, kind) for kind in kinds_of(units))]
    return page(f"SAE latents: {title}", "\n".join(part for part in body if part), SORT_SCRIPT)
