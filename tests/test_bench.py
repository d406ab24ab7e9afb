"""`python -m sae.bench` runs and reports every implementation (tiny shapes: a smoke test, not timing)."""

import json
import subprocess
import sys


def test_bench_quick_json():
    result = subprocess.run(
        [sys.executable, "-m", "sae.bench", "--quick", "--json", "--repeats", "1", "--only", "sae_kernels[torch]", "dense"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["machine"]["threads"] == 2
    rows = {(r["impl"], r["auxk"]): r for r in report["results"]}
    assert set(rows) == {("sae_kernels[torch]", False), ("sae_kernels[torch]", True), ("dense", False), ("dense", True),
                         ("adam step alone", False)}
    for row in rows.values():
        assert row["step_ms"] > 0 and row["ratio"] == row["step_ms"] / row["matmul_ms"]
