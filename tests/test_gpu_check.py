"""python -m sae.gpu_check --dry: every step of the GPU check runs (at tiny sizes, on the CPU), so the
command a GPU session runs once cannot rot."""

import json

from sae import gpu_check


def test_the_dry_gpu_check_runs_every_step_and_writes_its_report(tmp_path):
    assert gpu_check.main(["--dry", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] and report["device"] == "cpu"
    assert {r["compute_dtype"] for r in report["step"]} == {"float32", "bfloat16"}
    assert all(r["ok"] and r["same_selection"] for r in report["step"])
    assert {r["impl"] for r in report["bench"]} >= {"sae_kernels[torch]"}
    assert 0 < report["train"]["final_fvu"] < 1 and report["train"]["tokens"] > 0
    assert "GPU check on cpu (dry run)" in (tmp_path / "gpu_check.md").read_text()


def test_the_step_check_catches_a_wrong_gradient(monkeypatch):
    """A device step whose decoder gradient is off by 1% fails the fp32 tolerance."""
    original = gpu_check.SparseAutoencoder.forward

    def skewed(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dtype == gpu_check.torch.float32:
            self.W_dec.register_hook(lambda grad: grad * 1.01)
        return out

    monkeypatch.setattr(gpu_check.SparseAutoencoder, "forward", skewed)
    results = gpu_check.step_check(gpu_check.torch.device("cpu"), 256, 600, 2, 64)
    assert not any(r["ok"] for r in results if r["compute_dtype"] == "float32")
