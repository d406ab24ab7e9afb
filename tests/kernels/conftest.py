"""Shared fixtures of the kernel tests: both backends, poisoned allocations, and float64 references.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the "triton" backend runs
its kernels on CPU tensors in the interpreter. Shapes stay small: the interpreter runs every program
of a launch in Python.
"""

import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import sae_kernels

BACKENDS = ["torch", "triton"]
if sys.platform != "linux" or not sae_kernels.triton_available():  # triton is Linux-only
    BACKENDS = ["torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py should have set TRITON_INTERPRET=1"
    return request.param


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made during a test is filled with NaN (floats) or a huge sentinel
    (integers), so an output element a kernel forgets to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            return tensor.fill_(math.nan)
        if tensor.dtype == torch.bool:
            return tensor.fill_(True)
        return tensor.fill_(torch.iinfo(tensor.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


def assert_close(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max(|expected|, 1), compared in float64; NaN always fails."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{name}: NaN in the result (an element was not written?)"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol:.1g} x {scale:.3g}"


def tolerance(backend, dtype):
    """Expected relative accuracy: the Triton kernels accumulate in float32 whatever the input dtype."""
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float64 and backend == "torch":
        return 1e-10
    return 2e-5


def pre_acts64(x, W_enc, b_enc, b_dec):
    """Reference pre-activations W_enc (x - b_dec) + b_enc in float64, differentiable."""
    xc = x.double() - (b_dec.double() if b_dec is not None else 0)
    pre = xc @ W_enc.double().t()
    return pre + b_enc.double() if b_enc is not None else pre


def assert_valid_topk(pre, indices, k, allowed=None, slack=0.0):
    """indices (N, k) are distinct per row and are a top k of pre (N, n) among the `allowed` latents:
    every selected value >= every unselected allowed value (up to `slack`, for float32 selection)."""
    pre = pre.detach().double()
    assert indices.shape == (pre.shape[0], k) and indices.dtype == torch.int64
    assert (indices.sort(1).values.diff(dim=1) > 0).all(), "repeated latent within a row"
    if allowed is not None:
        assert allowed[indices].all(), "selected a latent outside the allowed set"
        pre = pre.masked_fill(~allowed, -math.inf)
    chosen = pre.gather(1, indices)
    rest = pre.scatter(1, indices, -math.inf)
    assert (chosen.min(1).values >= rest.max(1).values - slack).all(), "not a top-k selection"


def dense_codes64(values, indices, n_latents):
    """The sparse codes as a dense float64 (N, n_latents) matrix (repeated entries add), differentiable."""
    dense = torch.zeros(values.shape[0], n_latents, dtype=torch.float64)
    return dense.scatter_add(1, indices, values.double())


def inputs(n_rows, d_in, n_latents, dtype=torch.float64, hot=3, scale=1.0):
    """Random encoder/decoder parameters and inputs, all requiring grad. `hot` latents get a large
    encoder bias so they are selected in every row: repeated latent indices across rows."""
    x = torch.randn(n_rows, d_in, dtype=dtype) * 2
    W_enc = torch.randn(n_latents, d_in, dtype=dtype) / math.sqrt(d_in) * scale
    b_enc = torch.randn(n_latents, dtype=dtype) * 0.1
    b_enc[torch.randperm(n_latents)[:hot]] += 20
    b_dec = torch.randn(d_in, dtype=dtype) * 0.5
    W_dec = torch.randn(n_latents, d_in, dtype=dtype)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    tensors = SimpleNamespace(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, W_dec=W_dec)
    for t in vars(tensors).values():
        t.requires_grad_(True)
    return tensors


def grads(*tensors):
    """Take and clear the .grad of each tensor."""
    out = []
    for t in tensors:
        out.append(t.grad)
        t.grad = None
    return out


@pytest.fixture
def ref():
    return SimpleNamespace(
        assert_close=assert_close,
        tolerance=tolerance,
        pre_acts64=pre_acts64,
        assert_valid_topk=assert_valid_topk,
        dense_codes64=dense_codes64,
        inputs=inputs,
        grads=grads,
    )
