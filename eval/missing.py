"""Missing values in eval reports: a metric with nothing to measure (a mean over no units, a probe
whose every task was skipped) is None, written as JSON null, never NaN (strict JSON readers reject
NaN). The one mean of the reports and the one way to print a value that may be missing."""

from __future__ import annotations

import math
from typing import Iterable


def mean_or_none(values: Iterable[float]) -> float | None:
    """The mean of `values` (summed exactly, math.fsum), None when there are none."""
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def format_or_dash(value, spec: str) -> str:
    """`value` formatted with `spec`, or "–" for a missing one (None; NaN from older reports)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, spec) if is_number and value == value else "–"
