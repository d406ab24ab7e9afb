"""The index's detection and fuzzing parts (Paulo et al. 2024; eval/explain/detection.py): the primary
scorer's AUC per unit in the units tables, and beside the simulation summary the mean AUC per kind and
scorer (and the eval report's headline means). Each is empty for records and reports without them."""

from __future__ import annotations

from ..explain.pipeline import PRIMARY_ORDER
from ..missing import mean_or_none
from .inputs import CLASSIFICATION_METHODS, Unit
from .pages import facts_table, kinds_of, number_cell, plural
from .svg import esc, format_number


def scorers_of(units: list[Unit], method: str) -> list[str]:
    """Every scorer of `method` ("detection", "fuzzing") that any of `units` holds, in first-seen order."""
    return list(dict.fromkeys(name for unit in units for name in unit.classification.get(method, {})))


def primary_scorer(units: list[Unit], method: str) -> str | None:
    """The scorer whose AUC a units table shows: the eval's primary one (PRIMARY_ORDER), else the first seen."""
    names = scorers_of(units, method)
    return next((name for name in PRIMARY_ORDER if name in names), names[0] if names else None)


def auc_columns(units: list[Unit]) -> list[tuple[str, str]]:
    """(method, scorer) of a units table's AUC columns: each method's primary scorer, methods present only."""
    return [(method, scorer) for method in CLASSIFICATION_METHODS if (scorer := primary_scorer(units, method))]


def auc_header_html(columns: list[tuple[str, str]]) -> str:
    """Header cells of the AUC columns, e.g. "detection AUC (embedding)"."""
    return "".join(f'<th class="num">{esc(f"{method} AUC ({scorer})")}</th>' for method, scorer in columns)


def auc_cells(unit: Unit, columns: list[tuple[str, str]]) -> list[str]:
    """A unit's AUC cells for `columns` ("–" where it has none)."""
    return [number_cell(unit.metric(method, scorer)) for method, scorer in columns]


def mean_auc_row(label: str, units: list[Unit], columns: list[tuple[str, str]], suffix: str = "") -> str:
    """A table row: `label`, then per column the mean AUC over the `units` where it is defined."""
    cells = []
    for method, scorer in columns:
        values = [value for value in (unit.metric(method + suffix, scorer) for unit in units) if value is not None]
        cells.append(number_cell(mean_or_none(values)))
    return f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>"


def report_means(report: dict | None) -> list[tuple[str, object]]:
    """(label, value) of the eval report's headline means: the latents' mean AUC under the primary scorer, with
    ±1.96 SE over latents where the report has it; none for a report without detection or fuzzing."""
    explain = (report or {}).get("explain")
    if not isinstance(explain, dict):
        return []
    rows = []
    for method in CLASSIFICATION_METHODS:
        if f"mean_{method}_auc" not in explain:
            continue
        scorer, mean = explain.get(f"primary_{method}_scorer"), explain[f"mean_{method}_auc"]
        latents = ((explain.get(method) or {}).get(scorer) or {}).get("latents") or {}
        ci95 = latents.get("ci95_auc")
        shown = mean if ci95 is None or mean is None else f"{format_number(mean)} ± {format_number(ci95)}"
        rows.append((f"mean {method} AUC over latents ({scorer or 'no scorer'}), eval report", shown))
    return rows


def classification_summary_html(units: list[Unit], report: dict | None) -> str:
    """Mean detection and fuzzing AUC per kind and its shuffled control, one column per method and scorer,
    and the report's headline means; "" when neither the units nor the report have any."""
    columns = [(method, scorer) for method in CLASSIFICATION_METHODS for scorer in scorers_of(units, method)]
    reported = report_means(report)
    if not columns and not reported:
        return ""
    parts = [('<h2 id="detection">Detection and fuzzing</h2>\n<p class="note">Mean AUC over units of a scorer\'s '
              "yes/no answers (Paulo et al. 2024): detection, does the unit fire in this excerpt; fuzzing, are the "
              "marked tokens its firing ones. 0.5 is chance; the shuffled control answers from another unit's "
              "explanation.</p>")]
    if reported:
        parts.append(facts_table(reported))
    if columns:
        rows = []
        for kind in kinds_of(units):
            of_kind = [unit for unit in units if unit.kind == kind]
            rows.append(mean_auc_row(f"{plural(kind)} ({len(of_kind)})", of_kind, columns))
            shuffled = [unit for unit in of_kind if any(key.endswith("_shuffled") for key in unit.classification)]
            if shuffled:
                rows.append(mean_auc_row(f"{plural(kind)}, shuffled control ({len(shuffled)})", shuffled, columns,
                                         "_shuffled"))
        parts.append(f'<table id="detection-summary"><thead><tr><th>units</th>{auc_header_html(columns)}</tr></thead>'
                     f"<tbody>{''.join(rows)}</tbody></table>")
    return "\n".join(parts)
