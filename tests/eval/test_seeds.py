"""Seed noise: Student's t intervals checked against hand values, and a difference stated only where the
intervals separate."""

import math

import pytest

from eval.seeds import comparison, mean_interval, separation, summarize


def test_the_interval_is_students_t_over_the_seeds():
    values = [0.10, 0.12, 0.11, 0.13]
    interval = mean_interval(values)
    mean = sum(values) / 4
    s = math.sqrt(sum((value - mean) ** 2 for value in values) / 3)
    assert interval.mean == pytest.approx(0.115)
    assert interval.half_width == pytest.approx(3.182446 * s / 2, rel=1e-6)  # t(0.975, 3) = 3.182446
    assert mean_interval([0.5]).half_width is None and mean_interval([0.5]).text() == "0.5000"
    assert mean_interval([1.0, 1.0]).half_width == 0.0
    with pytest.raises(ValueError):
        mean_interval([])


def test_separation_needs_intervals_that_do_not_overlap():
    low, high = mean_interval([1.0, 1.1, 0.9]), mean_interval([2.0, 2.1, 1.9])
    assert separation(low, high) == "lower" and separation(high, low) == "higher"
    wide = mean_interval([1.0, 2.0, 3.0])
    assert separation(low, wide) is None
    assert separation(mean_interval([1.0]), mean_interval([2.0])) is None  # one seed: no interval, no claim


def test_summarize_groups_seeds_and_compares():
    rows = [{"system": system, "k": 8, "seed": seed, "fvu": base + 0.001 * seed, "kl": None}
            for system, base in (("ours", 0.10), ("peer", 0.20)) for seed in range(3)]
    ours, peer = summarize(rows, ("system", "k"), ("fvu", "kl"))
    assert ours["seeds"] == [0, 1, 2] and "kl" not in ours
    assert ours["fvu"].values == pytest.approx((0.10, 0.101, 0.102))
    assert comparison(ours, peer, "fvu").startswith("ours: lower fvu than peer (0.1010 ± 0.0025 vs 0.2010 ± 0.0025")
    same = summarize([{**row, "fvu": 0.1 + 0.05 * row["seed"]} for row in rows], ("system", "k"), ("fvu",))
    assert "within seed noise" in comparison(*same, "fvu")
