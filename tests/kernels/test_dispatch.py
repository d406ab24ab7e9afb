"""Backend choice (device, SAE_KERNELS, backend=), and that `import sae_kernels` stays light."""

import json
import os
import subprocess
import sys

import pytest
import torch

import sae_kernels
from sae_kernels import eager


def test_cpu_tensors_default_to_the_eager_path(monkeypatch):
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    assert sae_kernels.resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("SAE_KERNELS", "auto")
    assert sae_kernels.resolve_backend(torch.device("cpu")) == "torch"


def test_cuda_tensors_default_to_triton_when_installed(monkeypatch):
    monkeypatch.delenv("SAE_KERNELS", raising=False)
    expected = "triton" if sae_kernels.triton_available() else "torch"
    assert sae_kernels.resolve_backend(torch.device("cuda")) == expected


def test_environment_and_argument_force_a_backend(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", "torch")
    assert sae_kernels.resolve_backend(torch.device("cuda")) == "torch"
    assert sae_kernels.resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv("SAE_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        sae_kernels.resolve_backend(torch.device("cpu"))


@pytest.mark.skipif(not sae_kernels.triton_available(), reason="triton is not installed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", "triton")
    assert sae_kernels.resolve_backend(torch.device("cpu")) == "triton"  # TRITON_INTERPRET=1 in tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sae_kernels.resolve_backend(torch.device("cpu"))


@pytest.mark.skipif(not sae_kernels.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("forced", ["triton", "torch"])
def test_sae_kernels_routes_every_op(monkeypatch, forced):
    """With SAE_KERNELS set, every primitive of forward and backward runs on that backend only."""
    from sae_kernels import auxk, decode, encode

    calls = []

    def spy(module, name, tag):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append((tag, name))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ["gather_rows", "row_dots", "scatter_rows", "aux_residual"]:
        spy(eager, name, "torch")
    spy(decode, "gather_rows", "triton")
    spy(decode, "row_dots", "triton")
    spy(encode, "scatter_rows", "triton")
    spy(auxk, "aux_residual", "triton")
    monkeypatch.setattr(sae_kernels.ops, "_triton_backend", None)  # rebuild it from the spied functions
    monkeypatch.setenv("SAE_KERNELS", forced)

    x = torch.randn(6, 12, requires_grad=True)
    W_enc, W_dec = torch.randn(40, 12, requires_grad=True), torch.randn(40, 12, requires_grad=True)
    dead = torch.arange(10)
    values, indices = sae_kernels.topk_encode(x, W_enc, None, 3)
    x_hat = sae_kernels.sparse_decode(values, indices, W_dec)
    aux_values, local = sae_kernels.topk_encode(x, W_enc[dead], None, 4)  # AuxK: the dead latents' rows
    (x_hat.sum() + sae_kernels.auxk_loss(aux_values, dead[local], W_dec, x - x_hat)).backward()

    assert {tag for tag, _ in calls} == {forced}
    assert {name for _, name in calls} == {"gather_rows", "row_dots", "scatter_rows", "aux_residual"}


def _run_python(code: str, **env) -> str:
    environment = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_is_light_and_works_without_triton():
    """`import sae_kernels` must not import triton (a CPU user should not pay for it), and the eager
    ops must work where triton cannot be imported at all."""
    code = """
import sys, json
light = {}
import sae_kernels
light["triton_imported"] = "triton" in sys.modules
sys.modules["triton"] = None  # from here on, `import triton` fails as on a machine without it
import torch
v, i = sae_kernels.topk_encode(torch.randn(4, 8), torch.randn(20, 8), None, 2)
light["decoded"] = list(sae_kernels.sparse_decode(v, i, torch.randn(20, 8)).shape)
light["available"] = sae_kernels.triton_available()
try:
    sae_kernels.sparse_decode(v, i, torch.randn(20, 8), backend="triton")
except RuntimeError as error:
    light["error"] = str(error)
print(json.dumps(light))
"""
    out = json.loads(_run_python(code, SAE_KERNELS=""))
    assert out["triton_imported"] is False
    assert out["decoded"] == [4, 8]
    assert out["available"] is False
    assert "not installed" in out["error"]
