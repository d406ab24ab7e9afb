"""HTML of the site: the page skeleton (CSS), shaded tokens, table cells, and the page of each unit."""

from __future__ import annotations

import math

from .inputs import CLASSIFICATION_METHODS, Excerpt, Unit
from .svg import bar_chart, esc, format_number, histogram

SHADE_RGB = "255, 140, 0"
"""Colour of the token shading; its alpha is the token's activation over the unit's maximum."""

VISIBLE_WHITESPACE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}
"""Characters shown as a symbol so that an excerpt stays one block of text."""


def _visible_characters() -> dict[int, str]:
    """str.translate table: newline, tab and CR as symbols, other control characters as their Unicode
    "control pictures", lone surrogates (which UTF-8 cannot encode) as U+FFFD."""
    table = {code: chr(0x2400 + code) for code in range(0x20)}
    table[0x7F] = "\u2421"
    table.update({ord(char): symbol for char, symbol in VISIBLE_WHITESPACE.items()})
    table.update({code: "\ufffd" for code in range(0xD800, 0xE000)})
    return table


VISIBLE_CHARACTERS = _visible_characters()

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 72rem;
       padding: 1rem 1.5rem 3rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.subtitle, .note { color: #666; } .note { font-size: .9rem; }
nav { display: flex; gap: 1.5rem; padding: .5rem 0; border-bottom: 1px solid #ddd; }
a { color: #1f5fa8; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:hover { background: #f0f0f0; }
.cards { display: flex; flex-wrap: wrap; gap: 0 3rem; } .cards .note { margin: 0; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plots svg, svg.chart { background: #fff; border: 1px solid #e4e4e4; }
blockquote.explanation { font-size: 1.1rem; margin: .5rem 0; padding: .5rem 1rem; background: #f6f6f6;
                         border-left: 4px solid #e0601a; }
.excerpt { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem; white-space: pre-wrap;
           word-break: break-word; padding: .4rem .6rem; margin: .3rem 0; border: 1px solid #e4e4e4; }
.excerpt .peak { float: right; color: #888; margin-left: 1rem; }
.tok { border-radius: 2px; }
"""

# ----------------------------------------------------------------------------------------------
# HTML pieces


def page(title: str, body: str, script: str = "") -> str:
    """A complete HTML document: UTF-8, embedded CSS, no external resources."""
    script_element = f"<script>{script}</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n{script_element}</body>\n</html>\n"
    )


def visible_text(token: str) -> str:
    """`token` with newlines, tabs and other control characters shown as visible symbols."""
    return token.translate(VISIBLE_CHARACTERS)


def shading_opacity(activation: float, max_activation: float | None) -> float:
    """Background alpha of a token: its activation over the unit's maximum, clipped to [0, 1]."""
    if not max_activation or max_activation <= 0:
        return 0.0
    return min(max(activation / max_activation, 0.0), 1.0)


def token_span(token: str, activation: float, max_activation: float | None) -> str:
    """A token as a <span> shaded by its activation, with the exact value as its tooltip."""
    opacity = shading_opacity(activation, max_activation)
    return (f'<span class="tok" style="background-color: rgba({SHADE_RGB}, {opacity:.4f})" '
            f'title="{esc(repr(activation))}">{esc(visible_text(token))}</span>')


def excerpt_html(excerpt: Excerpt, max_activation: float | None) -> str:
    """One excerpt as a block of shaded tokens, its peak activation on the right."""
    peak = max(excerpt.activations, default=0.0)
    pairs = zip(excerpt.tokens, excerpt.activations, strict=True)
    spans = "".join(token_span(token, value, max_activation) for token, value in pairs)
    return f'<div class="excerpt"><span class="peak">max {esc(format_number(peak))}</span>{spans}</div>'


def number_cell(value, text: str | None = None) -> str:
    """A right-aligned table cell that the index's sort script orders numerically."""
    sort_value = "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(value)
    shown = format_number(value) if text is None else text
    return f'<td class="num" data-value="{esc(sort_value)}">{esc(shown)}</td>'


def text_cell(text) -> str:
    """A plain table cell holding `text`, escaped."""
    return f"<td>{esc(text)}</td>"


def facts_table(rows: list[tuple[str, object]]) -> str:
    """A two-column table of (label, value) rows."""
    body = "".join(f"<tr><th>{esc(label)}</th>{value_cell(value)}</tr>" for label, value in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


def value_cell(value) -> str:
    """A numeric cell for a number or a missing one (None: "–"), a text cell for anything else."""
    return number_cell(value) if value is None or isinstance(value, (int, float)) else text_cell(value)


def simulator_names(units: list[Unit]) -> list[str]:
    """Every simulator that scored any of `units`, in first-seen order."""
    return list(dict.fromkeys(name for unit in units for name in unit.scores))


def score_of(scores: dict, simulator: str, key: str = "top_and_random") -> float | None:
    """One score of one simulator, None when absent."""
    value = scores.get(simulator, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def kinds_of(units: list[Unit]) -> list[str]:
    """The unit kinds present, latents first."""
    return list(dict.fromkeys(unit.kind for unit in units))


def plural(kind: str) -> str:
    """A kind's heading, e.g. "Latents" for "latent"."""
    return kind.capitalize() + "s"


def run_title(cfg: dict) -> str:
    """"run · model · hookpoint" from cfg.json."""
    return " · ".join(str(cfg[key]) for key in ("run_name", "model", "hookpoint") if cfg.get(key))


# ----------------------------------------------------------------------------------------------
# Unit pages


def scores_table_html(scores: dict) -> str:
    """A table of one unit's scores: per simulator, top+random, random-only and any flags."""
    rows = []
    for name, score in scores.items():
        flags = "; ".join(f"{key}: {reason}" for key, reason in (score.get("flags") or {}).items())
        rows.append(f"<tr><th>{esc(name)}</th>{number_cell(score_of(scores, name))}"
                    f"{number_cell(score_of(scores, name, 'random_only'))}<td>{esc(flags)}</td></tr>")
    return ('<table class="scores"><thead><tr><th>simulator</th><th class="num">top+random</th>'
            f'<th class="num">random only</th><th>flags</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


CLASSIFICATION_METRICS = (("balanced_accuracy", "balanced accuracy"), ("f1", "F1"), ("auc", "AUC"))
"""(key, column title) of the detection and fuzzing metrics, in the order shown."""


def classification_table_html(unit: Unit) -> str:
    """A table of one unit's detection and fuzzing metrics: per method and scorer, balanced accuracy, F1 and
    AUC, the same of the shuffled control where the record has it, the questions asked and any flags."""
    shuffled = any(key.endswith("_shuffled") for key in unit.classification)
    groups = [("", "")] + ([("_shuffled", "shuffled ")] if shuffled else [])
    head = "".join(f'<th class="num">{esc(prefix + title)}</th>' for _, prefix in groups for _, title in CLASSIFICATION_METRICS)
    rows = []
    for method in (method for method in CLASSIFICATION_METHODS if method in unit.classification):
        for scorer, metrics in unit.classification[method].items():
            cells = [number_cell(unit.metric(method + suffix, scorer, key)) for suffix, _ in groups
                     for key, _ in CLASSIFICATION_METRICS]
            asked = f"{format_number(metrics.get('positives'))} / {format_number(metrics.get('negatives'))}"
            flags = "; ".join(map(str, metrics.get("flags") or []))
            rows.append(f"<tr><th>{esc(method)}</th><th>{esc(scorer)}</th>{''.join(cells)}"
                        f"{text_cell(asked)}{text_cell(flags)}</tr>")
    return ('<table class="scores classification"><thead><tr><th>method</th><th>scorer</th>'
            f'{head}<th>yes / no questions</th><th>flags</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def unit_nav_html(unit: Unit, previous: Unit | None, following: Unit | None) -> str:
    """Links to the index and to the previous and next unit of the same kind."""
    links = [f'<a href="index.html#{esc(unit.kind)}s">↑ index</a>']
    no_link = "<span></span>"
    links.append(f'<a href="{esc(previous.page)}" rel="prev">← {esc(previous.label)}</a>' if previous else no_link)
    links.append(f'<a href="{esc(following.page)}" rel="next">{esc(following.label)} →</a>' if following else no_link)
    return f"<nav>{''.join(links)}</nav>"


def unit_html(unit: Unit, cfg: dict, previous: Unit | None, following: Unit | None, pages: set[str]) -> str:
    """The page of one unit: explanation, scores, activation histogram and shaded excerpts."""
    max_activation = unit.max_activation
    body = [unit_nav_html(unit, previous, following),
            f"<h1>{esc(unit.label.capitalize())}</h1>",
            f'<p class="subtitle">{esc(run_title(cfg))}</p>',
            f'<blockquote class="explanation">{esc(unit.explanation) or "(no explanation)"}</blockquote>']
    if unit.scores:
        body += ["<h2>Scores</h2>", scores_table_html(unit.scores)]
    if any(method in unit.classification for method in CLASSIFICATION_METHODS):
        body += ["<h2>Detection and fuzzing</h2>",
                 ('<p class="note">Yes/no questions with known answers (Paulo et al. 2024): detection asks whether '
                  "the unit fires in an excerpt, fuzzing whether the marked tokens are ones where it fires. AUC 0.5 "
                  "is chance. Shuffled: the same questions answered from the shuffled control's explanation.</p>"),
                 classification_table_html(unit)]
    if unit.shuffled_scores:
        other = unit.shuffled_explanation_of
        other_page = f"{unit.kind}-{other}.html"
        other_name = esc(f"{unit.kind} {other}") if other is not None else "another unit"
        if other_page in pages:
            other_name = f'<a href="{esc(other_page)}">{other_name}</a>'
        body += ["<h2>Shuffled control</h2>",
                 f'<p class="note">The explanation of {other_name} scored on this unit\'s excerpts: what a score '
                 "means when the explanation is unrelated.</p>", scores_table_html(unit.shuffled_scores)]
    body += ["<h2>Activations</h2>", facts_table([
        ("max activation (over the excerpts)", max_activation),
        ("density (fraction > 0 on the random excerpts)", unit.random_density),
        ("excerpts (top, random)", f"{len(unit.top)}, {len(unit.random)}"),
    ])]
    nonzero = [value for value in unit.all_activations() if value != 0]
    if nonzero:
        edges, counts = histogram(nonzero)
        body.append(bar_chart(f"Non-zero activations ({len(nonzero):,} tokens)", edges, counts,
                              "activation (all excerpts, top and random)", "tokens"))
    else:
        body.append('<p class="note">The unit is zero on every token of its excerpts.</p>')
    for group, excerpts in (("Top excerpts", unit.top), ("Random excerpts", unit.random)):
        body.append(f"<h2>{group} ({len(excerpts)})</h2>")
        body.extend(excerpt_html(excerpt, max_activation) for excerpt in excerpts)
    body.append('<p class="note">Shading: activation / the unit\'s max activation; hover a token for its exact '
                "value. ⏎ is a newline, ⇥ a tab.</p>")
    return page(f"{unit.label.capitalize()}: {unit.explanation[:80]}", "\n".join(body))


def unit_pages(units: list[Unit], cfg: dict) -> dict[str, str]:
    """File name -> HTML of every unit's page, each linked to its neighbours of the same kind."""
    pages = {unit.page for unit in units}
    written = {}
    for kind in kinds_of(units):
        of_kind = [unit for unit in units if unit.kind == kind]
        for index, unit in enumerate(of_kind):
            previous = of_kind[index - 1] if index > 0 else None
            following = of_kind[index + 1] if index + 1 < len(of_kind) else None
            written[unit.page] = unit_html(unit, cfg, previous, following, pages)
    return written
