"""The benchmark's fronts: each system's final SAEs over the k values, as (held-out L0, metric) points.

An SAE family is judged by its front: at equal L0, which reconstructs better (fvu) and hurts the LM less
(delta CE). BatchTopK's held-out L0 is not exactly k (its threshold is estimated), so points are placed
at their measured L0, not at k. One SVG per hookpoint and metric, log-log, one line per system.
"""

from __future__ import annotations

from pathlib import Path

from sae.files import atomic_write

from ..browse.svg import scaling_chart

FRONT_METRICS = {"fvu": "held-out fvu", "delta_ce": "delta CE (nats)"}


def lr_family(system: str) -> str:
    """A peer's system spec without its learning-rate factor: what the factors tuned on validation vary."""
    return " ".join(part for part in system.split() if not part.startswith("--lr_factor="))


def front_points(rows: list[dict], hookpoint: str, metric: str) -> dict[str, list[tuple[float, float, int]]]:
    """{system: [(held-out L0, metric, k), ...] sorted by L0} of the final SAEs at `hookpoint`, systems in
    the rows' order. A peer tuned on validation (`--peer_lr_factors`) appears once, as its family (the
    spec without --lr_factor), at the lr tuned at each k; its other lrs are left out."""
    finals = [row for row in rows if row["hookpoint"] == hookpoint and row["final"]]
    tuned = {(row["k"], lr_family(row["system"])) for row in finals if row.get("tuned")}
    points: dict[str, list[tuple[float, float, int]]] = {}
    for row in finals:
        family = lr_family(row["system"])
        if (row["k"], family) in tuned and not row.get("tuned"):
            continue
        name = family if (row["k"], family) in tuned else row["system"]
        points.setdefault(name, []).append((row["l0"], row[metric], row["k"]))
    return {system: sorted(line) for system, line in points.items()}


def fronts_svg(rows: list[dict], hookpoint: str, metric: str) -> str | None:
    """The standalone SVG of `metric` against held-out L0 at `hookpoint`, one line per system; the axes are
    logarithmic, so values <= 0 (a delta CE below the clean LM's) are left out, and None when none is left."""
    points = front_points(rows, hookpoint, metric)
    dots = [(l0, value, system, f"{system}, k={k}: L0 {l0:.1f}, {metric} {value:.4g}")
            for system, line in points.items() for l0, value, k in line if value > 0]
    if not dots:
        return None
    curves = [(system, False, [(l0, value) for l0, value, _ in line if value > 0]) for system, line in points.items()]
    tokens = min(row["tokens"] for row in rows if row["hookpoint"] == hookpoint and row["final"])
    finetuned = " (+finetune: then its fine-tune's)" if any(system.endswith("+finetune") for system in points) else ""
    return scaling_chart(f"{FRONT_METRICS[metric]} vs L0 at {hookpoint}", dots, curves, list(points), "held-out L0",
                         FRONT_METRICS[metric], f"{tokens:,} training tokens each{finetuned}; test split")


def write_fronts(rows: list[dict], out: Path) -> list[Path]:
    """OUT/fronts-HOOKPOINT-METRIC.svg for each hookpoint with more than one k and each FRONT_METRICS with a
    positive value to draw; the paths written."""
    written = []
    for hookpoint in dict.fromkeys(row["hookpoint"] for row in rows):
        if len({row["k"] for row in rows if row["hookpoint"] == hookpoint}) < 2:
            continue
        for metric in FRONT_METRICS:
            path = out / f"fronts-{hookpoint}-{metric}.svg"
            svg = fronts_svg(rows, hookpoint, metric)
            if svg is None:
                continue
            atomic_write(path, lambda tmp: Path(tmp).write_text(svg + "\n"))
            written.append(path)
    return written
