"""The index page's sections for Gao et al.'s other metrics, from the eval report: ablation sparsity
(`--ablation`), probe loss (`--probe`), k-sparse probing (`--sparse_probe`), feature absorption (`--absorption`), N2G (`--n2g`),
and the scaling fit of the run (`python -m eval.scaling`). Each section is "" when its input is absent, so a report without them renders as before."""

from __future__ import annotations

import math

from .pages import facts_table, number_cell, text_cell
from .svg import bar_chart, esc, histogram


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ablation_html(report: dict) -> str:
    """Mean and quantiles of the per-latent ablation sparsity, and their histogram in log10."""
    section = report.get("ablation_sparsity")
    if not isinstance(section, dict):
        return ""
    facts = [(label, section[key]) for label, key in (  # a key present but null (nothing measured) shows "–"
        ("latents", "latents"), ("ablations", "ablations"), ("mean", "mean"), ("median", "median"),
        ("positions per ablation (T)", "horizon"), ("vocabulary (V)", "vocab")) if key in section]
    values = [value for value in (section.get("per_latent") or {}).values() if _finite(value) and value > 0]
    chart = ""
    if values:
        edges, counts = histogram([math.log10(value) for value in values])
        chart = bar_chart("Ablation sparsity per latent", edges, counts, "log10((L1/L2)^2 / (V T))", "latents")
    return ('<h2 id="ablation">Ablation sparsity</h2>\n<p class="note">How many logits a latent\'s ablation moves, '
            "as a fraction of the V·T logits at the ablated position and the T − 1 after it (Gao et al. §4.5); "
            "smaller is sparser. 1/(V·T) is a single logit.</p>\n"
            f'{facts_table(facts)}\n{chart}')


def probe_html(report: dict) -> str:
    """Per probe task: the best latent's loss against the prior and the best neuron's."""
    section = report.get("probe")
    if not isinstance(section, dict):
        return ""
    rows = []
    for name, task in (section.get("tasks") or {}).items():
        rows.append("<tr>" + "".join([text_cell(name), number_cell(task.get("positives")), number_cell(task.get("tokens")),
                                      number_cell(task.get("loss")), number_cell(task.get("best_latent")),
                                      number_cell(task.get("baseline_loss")), number_cell(task.get("neuron_loss")),
                                      number_cell(task.get("best_neuron"))]) + "</tr>")
    skipped = section.get("skipped") or {}
    note = "".join(f"<li>{esc(name)}: {esc(reason)}</li>" for name, reason in skipped.items())
    means = facts_table([("mean loss, best latent", section.get("mean_loss")),
                         ("mean loss, label prior", section.get("baseline_loss")),
                         ("mean loss, best neuron", section.get("neuron_mean_loss"))])
    head = "".join(f"<th>{title}</th>" for title in ("task", "positives", "tokens", "loss", "best latent", "prior",
                                                     "neuron loss", "best neuron"))
    return ('<h2 id="probe">Probe loss</h2>\n<p class="note">Per task, the binary cross-entropy of the best '
            "one-latent logistic probe (Gao et al. §4.2), the label prior's entropy, and the same probe on the "
            "hookpoint's neurons. Lower is better.</p>\n"
            f'{means}\n<table class="sortable" id="probe-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>\n" + (f'<p class="note">Skipped:</p><ul>{note}</ul>' if note else ""))


def sparse_probe_html(report: dict) -> str:
    """Per task and k, the test AUC of the k-sparse probe on latents and on neurons; means with accuracy."""
    section = report.get("sparse_probe")
    if not isinstance(section, dict):
        return ""
    ks = [str(k) for k in section.get("ks") or []]
    means, neuron_means = section.get("mean") or {}, section.get("neuron_mean") or {}
    facts = [(f"k={k}: {label} {metric}", (means if label == "latents" else neuron_means).get(k, {}).get(metric))
             for k in ks for label in ("latents", "neurons") for metric in ("auc", "accuracy")]
    rows = []
    for name, task in (section.get("tasks") or {}).items():
        latents, neurons = task.get("latents") or {}, task.get("neurons") or {}
        cells = [text_cell(name), number_cell(task.get("test_positives")), number_cell(task.get("test_negatives")),
                 number_cell(task.get("majority_accuracy"))]
        for k in ks:
            cells += [number_cell(latents.get(k, {}).get("auc")), number_cell(neurons.get(k, {}).get("auc"))]
        first = (latents.get(ks[0], {}).get("units") or [None])[0] if ks else None
        rows.append("<tr>" + "".join(cells + [number_cell(first)]) + "</tr>")
    skipped = section.get("skipped") or {}
    note = "".join(f"<li>{esc(name)}: {esc(reason)}</li>" for name, reason in skipped.items())
    titles = ["task", "test positives", "test negatives", "majority accuracy",
              *(title for k in ks for title in (f"AUC k={k}", f"neurons k={k}")), "top latent"]
    head = "".join(f"<th>{esc(title)}</th>" for title in titles)
    return ('<h2 id="sparse-probe">k-sparse probing</h2>\n<p class="note">Per task, the test AUC of a logistic '
            "probe on the k latents (and the k hookpoint neurons) whose mean differs most between positive and "
            "negative tokens, ranked and fitted on the other half of the windows (Gurnee et al. 2023; Kantamneni "
            "et al. 2025). Higher is better; 0.5 is chance.</p>\n"
            f'{facts_table(facts)}\n<table class="sortable" id="sparse-probe-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>\n" + (f'<p class="note">Skipped:</p><ul>{note}</ul>' if note else ""))


def absorption_html(report: dict) -> str:
    """Per letter, the probe's test F1, the main latents and the absorption on the probe's true positives;
    the means over letters with a usable probe, the probe quality, and the skipped letters."""
    section = report.get("absorption")
    if not isinstance(section, dict):
        return ""
    quality = section.get("probe_quality") or {}
    facts = facts_table([("mean absorption fraction", section.get("mean_absorption_fraction")),
                         ("full-absorption rate", section.get("full_absorption_rate")),
                         ("letters averaged", section.get("letters_averaged")),
                         ("probe true positives behind them", section.get("probe_true_positives")),
                         ("probe verdict", quality.get("verdict")), ("probe mean test F1", quality.get("mean_f1"))])
    rows = []
    for letter, entry in (section.get("letters") or {}).items():
        probe = entry.get("probe") or {}
        cells = [text_cell(letter), number_cell(entry.get("test_positives")), number_cell(probe.get("f1")),
                 text_cell("yes" if entry.get("usable") else "no"),
                 text_cell(", ".join(map(str, entry.get("main_latents") or []))),
                 number_cell(entry.get("probe_true_positives")), number_cell(entry.get("mean_absorption_fraction")),
                 number_cell(entry.get("full_absorption_rate")),
                 text_cell(", ".join(f"{latent} ×{count}" for latent, count in entry.get("top_absorbers") or []))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    skipped = section.get("skipped") or {}
    note = "".join(f"<li>{esc(letter)}: {esc(reason)}</li>" for letter, reason in skipped.items())
    head = "".join(f"<th>{title}</th>" for title in ("letter", "test positives", "probe F1", "usable", "main latents",
                                                     "true positives", "absorption", "full", "top full absorbers"))
    return ('<h2 id="absorption">Feature absorption</h2>\n<p class="note">Per first letter, a probe on the '
            "hookpoint's activations and the SAE's main latents for it; on the probe's true positives, how often "
            "the main latents stay silent while other latents carry the probe direction (Chanin et al. 2024; "
            "SAEBench's absorption fraction and full-absorption rate). Lower is better; only letters whose probe "
            f"reaches test F1 {esc(quality.get('min_f1', ''))} count in the means.</p>\n"
            f'{facts}\n<table class="sortable" id="absorption-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>\n" + (f'<p class="note">Skipped:</p><ul>{note}</ul>' if note else ""))


def n2g_html(report: dict) -> str:
    """N2G precision and recall per latent, with the shuffled-latent control."""
    section = report.get("n2g")
    if not isinstance(section, dict):
        return ""
    means = facts_table([("latents", section.get("units")), ("precision", section.get("precision")),
                         ("recall", section.get("recall")), ("precision, shuffled", section.get("precision_shuffled")),
                         ("recall, shuffled", section.get("recall_shuffled"))])
    rows = []
    for unit in section.get("per_unit") or []:
        rows.append("<tr>" + "".join([number_cell(unit.get("unit")), text_cell(unit.get("patterns", "")),
                                      number_cell(unit.get("precision")), number_cell(unit.get("recall"))]) + "</tr>")
    head = '<th class="num">latent</th><th>patterns</th><th class="num">precision</th><th class="num">recall</th>'
    return ('<h2 id="n2g">N2G</h2>\n<p class="note">Token patterns found by pruning and wildcarding each top '
            "excerpt (Foote et al. 2023), scored by the precision and recall of the firing they predict on held-out "
            "excerpts (Gao et al. §4.4); the shuffled control scores each latent with another's patterns.</p>\n"
            f'{means}\n<table class="sortable" id="n2g-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def scaling_html(svg: str | None) -> str:
    """The run's scaling-law plot (scaling.svg next to the SAE folders), when there is one."""
    if not svg:
        return ""
    return ('<h2 id="scaling">Scaling fit</h2>\n<p class="note">From scaling.svg, written by '
            "<code>python -m eval.scaling</code> over this run's SAEs.</p>\n" + f'<div class="plots">{svg}</div>')
