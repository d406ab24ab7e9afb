"""Seed noise: a metric's mean over seeds with its 95% interval, and which differences exceed it.

An SAE retrained from another seed has other latents (only ~30% recur: Paulo & Belrose 2025, arXiv
2501.16615) and other scores; reseeding alone moves many metrics by as much as the differences papers claim
(Chanin 2026, arXiv 2605.18229). So a comparison here is stated as "A is lower than B" only where the 95%
intervals of the two means do not overlap, a conservative test (two means whose intervals overlap a little
can still differ at 5%), and "within seed noise" otherwise. The interval is Student's t over the seeds:
mean ± t(0.975, n−1) · s / √n, with s the sample standard deviation; one seed gives no interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Interval:
    """The mean of one metric over seeds and the half-width of its 95% interval (None with one seed)."""

    mean: float
    half_width: float | None
    values: tuple[float, ...]

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)

    def text(self, spec: str = ".4f") -> str:
        """"0.1055 ± 0.0012", or the one value alone."""
        if self.half_width is None:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} ± {self.half_width:{spec}}"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "half_width": self.half_width, "values": list(self.values)}


def mean_interval(values: list[float]) -> Interval:
    """The mean of `values` (one per seed) and its 95% Student's t half-width; NaN values propagate."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return Interval(mean, None, tuple(values))
    spread = statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, float(student_t.ppf(0.975, len(values) - 1)) * spread, tuple(values))


def separation(a: Interval, b: Interval) -> str | None:
    """"lower" or "higher" when a's 95% interval lies wholly below or above b's, None when they overlap
    or either has a single seed (no interval: nothing can be said to exceed the noise)."""
    if a.half_width is None or b.half_width is None:
        return None
    if a.high < b.low:
        return "lower"
    if a.low > b.high:
        return "higher"
    return None


def summarize(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """One entry per distinct value of `keys` among `rows` (in order of first appearance):
    {key: value ..., "seeds": [seed ...], metric: Interval ...} over the rows of that group, one row per seed
    (a row's "seed", 0 when it has none). A metric missing from a group's rows is left out of its entry."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    summary = []
    for values, members in groups.items():
        entry = {**dict(zip(keys, values)), "seeds": [row.get("seed", 0) for row in members]}
        for metric in metrics:
            if all(row.get(metric) is not None for row in members):
                entry[metric] = mean_interval([float(row[metric]) for row in members])
        summary.append(entry)
    return summary


def comparison(a: dict, b: dict, metric: str, label: str = "system") -> str:
    """One sentence comparing two summary entries on `metric` ("lower is better" is the reader's to judge):
    "ours: lower fvu than sparsify (0.1055 ± 0.0010 vs 0.1203 ± 0.0031)" when the intervals separate,
    else "... within seed noise"."""
    first, second = a[metric], b[metric]
    numbers = f"({first.text()} vs {second.text()}, {len(a['seeds'])} and {len(b['seeds'])} seeds)"
    verdict = separation(first, second)
    if verdict is None:
        return f"{a[label]} vs {b[label]}: {metric} within seed noise {numbers}"
    return f"{a[label]}: {verdict} {metric} than {b[label]} {numbers}"


def interval_table(titles: list[str], leading: list[list[str]], summary: list[dict], metrics: list[str]) -> str:
    """Markdown: per summary entry its `leading` cells (under `titles`), its number of seeds, then each of
    `metrics` as mean ± the half-width of its 95% interval (L0 to 0.1, the rest to 4 decimals; "–" where the
    entry lacks it)."""
    header = "| " + " | ".join([*titles, "seeds", *metrics]) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for cells, entry in zip(leading, summary):
        values = [entry[metric].text(".1f" if metric == "l0" else ".4f") if metric in entry else "–" for metric in metrics]
        lines.append("| " + " | ".join([*cells, str(len(entry["seeds"])), *values]) + " |")
    return "\n".join(lines)


def json_ready(entry: dict) -> dict:
    """A summary entry with its Intervals as dicts, for a JSON report."""
    return {key: value.to_dict() if isinstance(value, Interval) else value for key, value in entry.items()}
