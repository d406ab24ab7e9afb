"""Sparsity fronts: final SAEs placed at their held-out L0, a tuned peer once at its tuned lr, seeds as one
point with an interval bar, and a standalone SVG with one line per system."""

import xml.etree.ElementTree as ElementTree

import pytest

from eval.fronts import front_points, fronts_svg, write_fronts

SVG = "{http://www.w3.org/2000/svg}"


def row(system, k, l0, fvu, final=True, tuned=False, hookpoint="h", seed=0):
    return {"hookpoint": hookpoint, "system": system, "k": k, "l0": l0, "fvu": fvu, "delta_ce": fvu * 2,
            "final": final, "tuned": tuned, "tokens": 1000 if final else 500, "seed": seed}


def plain(points):
    return {system: [(point.l0.mean, point.value.mean, point.k) for point in line] for system, line in points.items()}


ROWS = [
    row("ours", 8, 8.0, 0.2), row("ours", 8, 8.0, 0.3, final=False), row("ours", 16, 16.0, 0.1),
    row("saelens", 8, 9.0, 0.4, tuned=True), row("saelens --lr_factor=4", 8, 9.5, 0.35),
    row("saelens", 16, 17.0, 0.3), row("saelens --lr_factor=4", 16, 16.5, 0.25, tuned=True),
    row("ours", 8, 8.0, 0.5, hookpoint="other"),
]


def test_points_are_final_saes_at_their_l0_with_a_tuned_peer_once():
    points = plain(front_points(ROWS, "h", "fvu"))
    assert points == {"ours": [(8.0, 0.2, 8), (16.0, 0.1, 16)], "saelens": [(9.0, 0.4, 8), (16.5, 0.25, 16)]}
    assert plain(front_points(ROWS, "h", "delta_ce"))["ours"] == [(8.0, 0.4, 8), (16.0, 0.2, 16)]
    assert all(point.value.half_width is None for line in front_points(ROWS, "h", "fvu").values() for point in line)


def test_the_svg_has_a_line_and_a_dot_per_point_and_a_legend(tmp_path):
    root = ElementTree.fromstring(fronts_svg(ROWS, "h", "fvu"))
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f"{SVG}polyline")) == 2
    legend = [text.text for text in root.findall(f"{SVG}text")]
    assert "ours" in legend and "saelens" in legend
    # 4 points and 2 legend dots
    assert len(root.findall(f"{SVG}circle")) == 6
    written = write_fronts(ROWS, tmp_path)
    assert [path.name for path in written] == ["fronts-h-fvu.svg", "fronts-h-delta_ce.svg"]  # "other" has one k
    ElementTree.parse(written[0])
    assert fronts_svg([{**r, "delta_ce": -1.0} for r in ROWS], "h", "delta_ce") is None  # nothing for a log axis


def test_seeds_are_one_point_at_their_mean_with_a_bar_over_their_interval():
    rows = [row("ours", 8, 8.0 + seed, 0.2 + 0.01 * seed, seed=seed) for seed in range(3)]
    rows += [row("ours", 16, 16.0, 0.1 + 0.02 * seed, seed=seed) for seed in range(3)]
    [low_k, high_k] = front_points(rows, "h", "fvu")["ours"]
    assert (low_k.k, low_k.l0.mean) == (8, 9.0) and low_k.value.values == pytest.approx((0.2, 0.21, 0.22))
    # t(0.975, 2) = 4.3027; s = 0.02 / sqrt(3)
    assert abs(high_k.value.half_width - 4.302653 * 0.02 / 3 ** 0.5) < 1e-6
    root = ElementTree.fromstring(fronts_svg(rows, "h", "fvu"))
    bars = root.findall(f"{SVG}line[@class='interval']")
    assert len(bars) == 2
    assert any("mean of 3 seeds" in (text.text or "") for text in root.findall(f"{SVG}text"))
