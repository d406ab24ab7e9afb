"""Missing values in eval reports: a metric with nothing to measure (a mean over no units, a probe
whose every task was skipped) is None, written as JSON null, never NaN (strict JSON readers reject
NaN). The one mean of the reports, the one way to print a value that may be missing, and the one way
to write a report as JSON (a ratio with a zero denominator, say ce_recovered when ablation does not change
the loss, is NaN in memory and null in the file)."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable


def mean_or_none(values: Iterable[float]) -> float | None:
    """The mean of `values` (summed exactly, math.fsum), None when there are none."""
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def format_or_dash(value, spec: str) -> str:
    """`value` formatted with `spec`, or "–" for a missing one (None; NaN from older reports)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, spec) if is_number and value == value else "–"


def without_non_finite(value: Any) -> Any:
    """`value` (nested dicts, lists, tuples) with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: without_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_non_finite(item) for item in value]
    return value


def report_json(value: Any, indent: int | None = 2) -> str:
    """Strict JSON of a report: missing values (None, NaN, infinities) are null."""
    return json.dumps(without_non_finite(value), indent=indent, allow_nan=False)
