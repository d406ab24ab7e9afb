"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 within the hardware limits (kernels/sae_kernels/aot.py).

The check needs compiled (not interpreted) kernel modules, so it runs in a subprocess without
TRITON_INTERPRET (the suite sets it for everything else)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import sae_kernels

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not sae_kernels.triton_available(), reason="triton is Linux-only")


def run_without_interpreter(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    report = tmp_path / "aot.json"
    done = run_without_interpreter(["-m", "sae_kernels.aot", "--json", str(report)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["problems"] == []
    builds = result["builds"]
    kernel_names = {"_gather_rows_kernel", "_row_dots_kernel", "_scatter_rows_kernel", "_aux_residual_kernel"}
    for name in kernel_names:
        for target in ("sm_80", "sm_90"):
            shapes = {b["shape"] for b in builds if b["kernel"] == name and b["target"] == target}
            # Each kernel at both widths and both dtypes (recorded from the launches, not written here).
            assert shapes == {"d768 n12288 k32 float32", "d768 n12288 k32 bfloat16",
                              "d1000 n4000 k50 float32", "d1000 n4000 k50 bfloat16"}, (name, target, shapes)
    assert {b["kernel"] for b in builds} == kernel_names
    for b in builds:
        assert not b["error"] and b["spill_bytes"] == 0 and 0 < b["registers"] <= 255, b
    # The launchers' real types reach the compiler: bf16 tables stay bf16 and the unaligned width is not
    # claimed divisible by 16.
    bf16_gather = next(b for b in builds if b["kernel"] == "_gather_rows_kernel" and b["shape"].endswith("bfloat16"))
    assert "table_ptr: *bf16" in bf16_gather["signature"]
    unaligned = next(b for b in builds if b["kernel"] == "_row_dots_kernel" and b["shape"].startswith("d1000"))
    assert "D: i32," in unaligned["signature"] and "D: i32 %16" not in unaligned["signature"]


def test_the_check_fails_on_spills_too_many_registers_and_unlaunched_kernels(tmp_path):
    script = textwrap.dedent("""
        import json
        from sae_kernels.aot import Build, problems
        ok = Build("_gather_rows_kernel", "sm_90", "s", "", registers=40, spill_bytes=0, shared_bytes=1024)
        spill = Build("_row_dots_kernel", "sm_80", "s", "", registers=255, spill_bytes=8, shared_bytes=0)
        heavy = Build("_aux_residual_kernel", "sm_80", "s", "", registers=256, spill_bytes=0, shared_bytes=0)
        shared = Build("_scatter_rows_kernel", "sm_80", "s", "", registers=64, spill_bytes=0, shared_bytes=200_000)
        broken = Build("_scatter_rows_kernel", "sm_90", "s", "", error="CompilationError: boom")
        launched = {"_gather_rows_kernel", "_row_dots_kernel", "_aux_residual_kernel", "_scatter_rows_kernel"}
        print(json.dumps({
            "clean": problems([ok], launched),
            "bad": problems([spill, heavy, shared, broken], launched),
            "unlaunched": problems([ok], {"_gather_rows_kernel"}),
        }))
    """)
    done = run_without_interpreter(["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["clean"] == []
    bad = "\n".join(found["bad"])
    assert "8 bytes of local memory" in bad and "256 registers" in bad and "200000 bytes of shared memory" in bad
    assert "compile error: CompilationError: boom" in bad
    # gather_segment is a helper the launched gather kernel calls, so only the three others are flagged.
    assert sorted(line.split(":")[0] for line in found["unlaunched"]) == [
        "_aux_residual_kernel", "_row_dots_kernel", "_scatter_rows_kernel"]


def test_the_recorded_step_runs_auxk_as_the_trainer_does(tmp_path):
    """AuxK in the recorded step is the trainer's: a second encode on the dead latents' rows alone, whose
    backward scatters over those n_latents // 10 rows (besides the n_latents of W_enc and W_dec)."""
    script = textwrap.dedent("""
        import json
        from sae_kernels.aot import SHAPES, record_launches
        shape = SHAPES[0]
        widths = {args[6] for kernel, args, _ in record_launches(shape) if kernel.__name__ == "_scatter_rows_kernel"}
        print(json.dumps({"widths": sorted(widths), "n_latents": shape.n_latents}))
    """)
    done = run_without_interpreter(["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["widths"] == [found["n_latents"] // 10, found["n_latents"]]
