"""The benchmark's fronts: final SAEs placed at their held-out L0, a tuned peer once at its tuned lr, and a
standalone SVG with one line per system."""

import xml.etree.ElementTree as ElementTree

from eval.peers.fronts import front_points, fronts_svg, write_fronts

SVG = "{http://www.w3.org/2000/svg}"


def row(system, k, l0, fvu, final=True, tuned=False, hookpoint="h"):
    return {"hookpoint": hookpoint, "system": system, "k": k, "l0": l0, "fvu": fvu, "delta_ce": fvu * 2,
            "final": final, "tuned": tuned, "tokens": 1000 if final else 500}


ROWS = [
    row("ours", 8, 8.0, 0.2), row("ours", 8, 8.0, 0.3, final=False), row("ours", 16, 16.0, 0.1),
    row("saelens", 8, 9.0, 0.4, tuned=True), row("saelens --lr_factor=4", 8, 9.5, 0.35),
    row("saelens", 16, 17.0, 0.3), row("saelens --lr_factor=4", 16, 16.5, 0.25, tuned=True),
    row("ours", 8, 8.0, 0.5, hookpoint="other"),
]


def test_points_are_final_saes_at_their_l0_with_a_tuned_peer_once():
    points = front_points(ROWS, "h", "fvu")
    assert points == {"ours": [(8.0, 0.2, 8), (16.0, 0.1, 16)], "saelens": [(9.0, 0.4, 8), (16.5, 0.25, 16)]}
    assert front_points(ROWS, "h", "delta_ce")["ours"] == [(8.0, 0.4, 8), (16.0, 0.2, 16)]


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
