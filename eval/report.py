"""Presenting eval reports: a comparison table, the JSON file, the wandb summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sae.errors import UsageError
from sae.files import DISK_ERRNOS, UnwritableError, atomic_write, check_writable_folder, disk_error_reason

from .missing import format_or_dash, report_json

# (report key, column title, format) of the comparison table.
_COLUMNS = [
    ("l0", "L0", "{:.1f}"),
    ("fvu", "fvu", "{:.4f}"),
    ("nmse", "nmse", "{:.4f}"),
    ("ce_sae", "ce_sae", "{:.4f}"),
    ("delta_ce", "delta_ce", "{:+.4f}"),
    ("kl", "kl", "{:.4f}"),
    ("ce_recovered", "ce_rec", "{:.4f}"),
    ("ce_recovered_mean", "ce_rec_mean", "{:.4f}"),
    ("never_fired_frac", "never_fired", "{:.4f}"),
    ("dense_frac", "dense", "{:.4f}"),
]


def sae_kind(transcode: bool, skip_connection: bool) -> str:
    """What a report's row is (`SaeConfig.transcode`, `skip_connection`): "sae", "transcoder" or "skip
    transcoder" (Paulo et al. 2025), or "skip sae" (an SAE with a skip connection, which sparsify allows)."""
    return f"{'skip ' if skip_connection else ''}{'transcoder' if transcode else 'sae'}"


def kind_keys(cfg) -> dict:
    """A report's `kind` of an SAE of SaeConfig `cfg` (`sae_kind`) and the two settings it comes from:
    `transcode` (it reads its hookpoint's input and predicts its output) and `skip_connection`."""
    return {"kind": sae_kind(cfg.transcode, cfg.skip_connection), "transcode": cfg.transcode,
            "skip_connection": cfg.skip_connection}


def kind_of(report: dict) -> str:
    """A report's `kind`; reports written before transcoders have none, and are SAEs."""
    return report.get("kind", "sae")


def _aligned(rows: list[list]) -> list[str]:
    """Each row's cells padded to their column's widest, two spaces apart."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]


def comparison_table(reports: Sequence[dict]) -> str:
    """A plain-text table, one row per SAE (its `kind`: a transcoder's row is its prediction of the
    hookpoint's output), then per model/hookpoint/text the SAE-independent losses and the number of tokens
    the never_fired column counts over."""
    header = ["sae", "kind", "hookpoint", *(title for _, title, _ in _COLUMNS)]
    # "–" for a key a report read from an older file lacks (dense_frac)
    rows = [[r["sae"], kind_of(r), r["hookpoint"], *(fmt.format(r[key]) if key in r else "–" for key, _, fmt in _COLUMNS)]
            for r in reports]
    lines = _aligned([header, *rows])
    baselines = {}
    for r in reports:  # one line per model, hookpoint and evaluation text: rows on other text get their own
        init = r.get("model_init", "pretrained")
        key = (r["model"], init, r["hookpoint"], json.dumps(r["data"], sort_keys=True))
        model = _model_text(r)
        baselines[key] = f"{model} @ {r['hookpoint']}: ce_clean={r['ce_clean']:.4f} ce_zero={r['ce_zero']:.4f} " \
                         f"ce_mean={r['ce_mean']:.4f} over {r['ce_positions']:,} predictions " \
                         f"({r['data']['dataset']}, {r['data']['held_out']}); " \
                         f"never_fired: no firing on any of {r['never_fired_tokens']:,} tokens"
    return "\n".join([*lines, "", *baselines.values()])


def _model_text(report: dict) -> str:
    """The LM a report was measured on, saying when its weights were re-initialised."""
    init = report.get("model_init", "pretrained")
    return report["model"] if init == "pretrained" else f"{report['model']} with {init} weights"


_REPLACEMENT_COLUMNS = [
    ("l0", "L0", "{:.1f}"),
    ("fvu", "fvu", "{:.4f}"),
    ("fvu_alone", "fvu_alone", "{:.4f}"),
    ("nmse", "nmse", "{:.4f}"),
    ("never_fired_frac", "never_fired", "{:.4f}"),
]


def replacement_table(report: dict) -> str:
    """The replacement model (`--replace_all`, eval/replacement.py): one row per transcoder, its fvu inside
    the replacement model and alone on the clean LM, then the set's losses against the clean LM."""
    header = ["sae", "kind", "hookpoint", *(title for _, title, _ in _REPLACEMENT_COLUMNS)]
    rows = [[layer["sae"], layer["kind"], layer["hookpoint"],
             *(fmt.format(layer[key]) for key, _, fmt in _REPLACEMENT_COLUMNS)] for layer in report["layers"]]
    model = _model_text(report)
    footer = (f"replacement model ({len(rows)} transcoders, all spliced in one forward) on {model}: "
              f"ce_clean={report['ce_clean']:.4f} ce_replaced={report['ce_replaced']:.4f} "
              f"delta_ce={report['delta_ce']:+.4f} kl={report['kl']:.4f} over {report['ce_positions']:,} predictions "
              f"({report['data']['dataset']}, {report['data']['held_out']}); fvu_alone: each on the clean LM")
    return "\n".join([*_aligned([header, *rows]), "", footer])


INTERPRETABILITY_KEYS = ("explain", "ablation_sparsity", "probe", "sparse_probe", "absorption", "n2g")
"""Report sections of the interpretability metrics (`--explain`, `--ablation`, `--probe`, `--sparse_probe`,
`--absorption`, `--n2g`)."""


_SPARSE_PROBE_COLUMN = "sparse probe AUC (neurons)"
_ABSORPTION_COLUMN = "absorption (full)"
_INTERPRETABILITY_COLUMNS = ("sae", "kind", "lm", "explain", "detection / fuzzing AUC", "ablation",
                             "probe (prior / neurons)", _SPARSE_PROBE_COLUMN, _ABSORPTION_COLUMN, "n2g P / R (shuffled)")


def _sparse_probe_cell(section: dict) -> str:
    """Mean test AUC of the sparse probes at the smallest and largest k, the neurons' in brackets:
    "k=1 0.912 (0.801) · k=16 0.950 (0.930)"."""
    ks = section["ks"] if len(section["ks"]) == 1 else [section["ks"][0], section["ks"][-1]]
    return " · ".join(f"k={k} {format_or_dash(section['mean'][str(k)]['auc'], '.3f')} "
                      f"({format_or_dash(section['neuron_mean'][str(k)]['auc'], '.3f')})" for k in ks)


def _absorption_cell(section: dict) -> str:
    """Mean absorption fraction (full-absorption rate) over the letters whose probe is usable, and how many
    letters and probe true positives back it: "0.143 (0.209) · 3/20 letters, 723 tokens"."""
    quality = section["probe_quality"]
    scored = len(quality["usable_letters"]) + len(quality["unusable_letters"])
    return (f"{format_or_dash(section['mean_absorption_fraction'], '.3f')} "
            f"({format_or_dash(section['full_absorption_rate'], '.3f')}) · {section['letters_averaged']}/{scored} "
            f"letters, {section['probe_true_positives']:,} tokens")


def _interpretability_cells(report: dict) -> dict[str, str]:
    cells = {"sae": report["sae"], "kind": kind_of(report), "lm": report.get("model_init", "pretrained")}
    if explain := report.get("explain"):
        cells["explain"] = format_or_dash(explain["mean_score_top_and_random"], ".3f")
        if "mean_detection_auc" in explain:
            cells["detection / fuzzing AUC"] = (f"{format_or_dash(explain['mean_detection_auc'], '.3f')} / "
                                                f"{format_or_dash(explain['mean_fuzzing_auc'], '.3f')}")
    if ablation := report.get("ablation_sparsity"):
        cells["ablation"] = format_or_dash(ablation["mean"], ".4g")
    if probe := report.get("probe"):
        cells["probe (prior / neurons)"] = (f"{format_or_dash(probe['mean_loss'], '.4f')} ({format_or_dash(probe['baseline_loss'], '.4f')} / "
                                            f"{format_or_dash(probe['neuron_mean_loss'], '.4f')})")
    if sparse_probe := report.get("sparse_probe"):
        cells[_SPARSE_PROBE_COLUMN] = _sparse_probe_cell(sparse_probe)
    if absorption := report.get("absorption"):
        cells[_ABSORPTION_COLUMN] = _absorption_cell(absorption)
    if n2g := report.get("n2g"):
        cells["n2g P / R (shuffled)"] = (f"{format_or_dash(n2g['precision'], '.3f')} / {format_or_dash(n2g['recall'], '.3f')} "
                                         f"({format_or_dash(n2g['precision_shuffled'], '.3f')} / {format_or_dash(n2g['recall_shuffled'], '.3f')})")
    return cells


HEADLINE_KEYS = ("fvu", "delta_ce", "kl", "l0", "never_fired_frac", "dense_frac")
"""The reconstruction and downstream numbers every report has (dense_frac: not those read from older files)."""


def headline_metrics(report: dict) -> dict[str, float]:
    """One report's scalar metrics, for summaries over many SAEs (`python -m eval.pareto`): HEADLINE_KEYS, and
    one or two numbers per interpretability section the report has (the comparison table's), each missing
    or undefined (None) one left out."""
    metrics = {key: report.get(key) for key in HEADLINE_KEYS}
    if explain := report.get("explain"):
        metrics.update(explain_score=explain.get("mean_score_top_and_random"),
                       detection_auc=explain.get("mean_detection_auc"), fuzzing_auc=explain.get("mean_fuzzing_auc"))
    if ablation := report.get("ablation_sparsity"):
        metrics["ablation_sparsity"] = ablation["mean"]
    if probe := report.get("probe"):
        metrics["probe_loss"] = probe["mean_loss"]
    if sparse_probe := report.get("sparse_probe"):
        metrics.update({f"sparse_probe_auc_k{k}": sparse_probe["mean"][str(k)]["auc"] for k in sparse_probe["ks"]})
    if absorption := report.get("absorption"):
        metrics.update(absorption_fraction=absorption["mean_absorption_fraction"],
                       full_absorption_rate=absorption["full_absorption_rate"])
    if n2g := report.get("n2g"):
        metrics.update(n2g_precision=n2g["precision"], n2g_recall=n2g["recall"])
    return {key: float(value) for key, value in metrics.items() if value is not None}


def interpretability_table(reports: Sequence[dict]) -> str:
    """One row per SAE: its kind, the LM it reads (pretrained or random init), the explain score (top-and-random,
    primary simulator), mean ablation sparsity, probe loss, sparse probe AUC, feature absorption and N2G
    precision / recall; "–" where not run."""
    rows = [_interpretability_cells(report) for report in reports]
    header = [column for column in _INTERPRETABILITY_COLUMNS if any(column in row for row in rows)]
    return "\n".join(_aligned([header, *([row.get(key, "–") for key in header] for row in rows)]))


def report_content(reports: Sequence[dict]) -> dict | list[dict]:
    """What a report file holds: one report as a JSON object, several as a JSON list."""
    return reports[0] if len(reports) == 1 else list(reports)


def write_report(path: str | Path, reports: Sequence[dict]) -> Path:
    """One report: a JSON object; several: a JSON list of them. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(report_json(report_content(reports)) + "\n"))
    return path


def check_report_path(path: str | Path) -> None:
    """Before any work: --out names a file whose folder exists or can be created, and can be written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; name the report's file, e.g. {path / 'report.json'}")
    check_writable_folder(path.parent, f"--out {path.name} in the folder", "choose another --out")


def save_report(path: str | Path, reports: Sequence[dict]) -> Path:
    """`write_report`; when the disk refuses it (read-only, full), the report is printed on stdout instead,
    so the eval is not lost, and an UnwritableError says so in one line."""
    try:
        return write_report(path, reports)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        print(report_json(report_content(reports)))
        raise UnwritableError(f"cannot write the report to {path}: {disk_error_reason(error)}; "
                              "it is printed above on stdout instead") from None


def log_to_wandb(report: dict, sae_metadata: dict, wandb_dir: str | Path, project: str = "", mode: str = "") -> str:
    """Write the report into the training run's wandb summary (keys `eval/...`); returns the run's path.

    The training run is the one whose id the trainer stored in cfg.json (`wandb_run_id`); an SAE
    trained without wandb gets a new run of job type "eval" in `project` (default: the run's project).
    """
    import wandb

    run_id = sae_metadata.get("wandb_run_id")
    run = wandb.init(
        project=project or sae_metadata.get("wandb_project") or "topk-sae",
        id=run_id,
        resume="allow" if run_id else None,
        name=None if run_id else f"eval-{sae_metadata.get('run_name', Path(report['sae']).parent.name)}",
        job_type=None if run_id else "eval",
        dir=str(wandb_dir),
        mode=mode or None,
    )
    run.summary.update({f"eval/{key}": value for key, value in report.items()})
    path = run.path
    run.finish()
    return path
