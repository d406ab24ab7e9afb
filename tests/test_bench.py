"""`python -m sae.bench` runs and reports every implementation (tiny shapes: a smoke test, not timing)."""

import json
import subprocess
import sys

import torch

from sae import bench


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


def test_the_kernels_auxk_step_is_the_trainers(monkeypatch):
    """The `sae_kernels` rows time AuxK as the trainer runs it: after the TopK selection, a second encode
    on the dead latents' rows alone; and their loss is SparseAutoencoder.forward's (the `sae.model` row)."""
    size = bench.Size(d_in=24, n_latents=200, k=4, batch=40, dtype="float64")
    p = bench.Params(size, torch.device("cpu"))
    x = torch.randn(size.batch, size.d_in, dtype=torch.float64)
    dead = torch.zeros(size.n_latents, dtype=torch.bool)
    dead[torch.randperm(size.n_latents)[:20]] = True
    encoder_rows = []
    topk_encode = bench.ops.topk_encode
    monkeypatch.setattr(bench.ops, "topk_encode", lambda x, W_enc, *args, **kwargs: (
        encoder_rows.append(W_enc.shape[0]) or topk_encode(x, W_enc, *args, **kwargs)))

    loss = bench.kernels_forward("torch")(p, x, dead, size.k)
    assert encoder_rows == [size.n_latents, 20]
    bench._attach_model("sae.model", p, size)
    expected = bench.model_forward(p, x, dead, size.k)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
