"""sae_kernels.topk_encode, both backends, against float64 references: values, indices and every gradient."""

import math

import pytest
import torch

import sae_kernels
from sae import SaeConfig, SparseAutoencoder

# (rows, d_in, n_latents, k): the odd shape, k = 1, and k = n_latents (everything selected).
SHAPES = [(29, 100, 1000, 5), (20, 100, 1000, 1), (12, 33, 70, 70)]
GRAD_KINDS = ["random", "sum", "transposed"]


def backward_with(output, kind, seed_grad):
    """Backpropagate into `output` an incoming gradient that is contiguous ("random"), stride 0
    (from .sum(): "sum") or a transposed view ("transposed")."""
    if kind == "random":
        (output * seed_grad.to(output.dtype)).sum().backward()
    elif kind == "sum":
        output.sum().backward()
    else:
        (output.t() * seed_grad.t().to(output.dtype)).sum().backward()


def reference_loss(values, kind, seed_grad):
    return values.sum() if kind == "sum" else (values * seed_grad).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", GRAD_KINDS)
def test_values_and_all_gradients_match_float64(backend, dtype, shape, kind, ref):
    n_rows, d_in, n_latents, k = shape
    t = ref.inputs(n_rows, d_in, n_latents, dtype)
    values, indices = sae_kernels.topk_encode(t.x, t.W_enc, t.b_enc, k, b_dec=t.b_dec, backend=backend)
    assert values.dtype == dtype and indices.dtype == torch.int64

    leaves = [p.detach().double().requires_grad_(True) for p in (t.x, t.W_enc, t.b_enc, t.b_dec)]
    pre = ref.pre_acts64(*leaves)
    slack = 0.0 if dtype == torch.float64 else 1e-4 * pre.abs().max().item()
    ref.assert_valid_topk(pre, indices, k, slack=slack)
    expected = pre.gather(1, indices).relu()  # ReLU after the selection
    tol = ref.tolerance(backend, dtype)
    ref.assert_close(values, expected, tol, "values")

    seed_grad = torch.randn(n_rows, k, dtype=torch.float64)
    backward_with(values, kind, seed_grad)
    reference_loss(expected, kind, seed_grad).backward()
    ours = ref.grads(t.x, t.W_enc, t.b_enc, t.b_dec)
    for name, got, leaf in zip(["x", "W_enc", "b_enc", "b_dec"], ours, leaves):
        ref.assert_close(got, leaf.grad, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selects_what_sae_model_selects(backend, dtype, ref):
    sae = SparseAutoencoder(SaeConfig(d_in=100, n_latents=1000, k=5), dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(31, 100, dtype=dtype)
    values, indices = sae_kernels.topk_encode(
        x, sae.encoder.weight, sae.encoder.bias, 5, b_dec=sae.b_dec, backend=backend
    )
    expected_values, expected_indices = sae.encode(x)
    order, expected_order = indices.argsort(1), expected_indices.argsort(1)
    if dtype == torch.float64:  # same matmul in float64: the same latents, ties are impossible in practice
        assert torch.equal(indices.gather(1, order), expected_indices.gather(1, expected_order))
        ref.assert_close(values.gather(1, order), expected_values.gather(1, expected_order), 1e-12, "values")
    else:
        pre_acts = (x.double() - sae.b_dec.double()) @ sae.encoder.weight.double().T + sae.encoder.bias.double()
        ref.assert_valid_topk(pre_acts, indices, 5, slack=1e-3)


def test_optional_biases_and_partial_gradients(backend, ref):
    t = ref.inputs(15, 100, 1000, torch.float32)
    x = t.x.detach()  # no input gradient wanted
    values, indices = sae_kernels.topk_encode(x, t.W_enc, None, 5, backend=backend)
    pre = x.double() @ t.W_enc.detach().double().t()
    ref.assert_valid_topk(pre, indices, 5, slack=1e-4 * pre.abs().max().item())
    values.pow(2).sum().backward()
    selected = pre.gather(1, indices).relu()
    dense = torch.zeros_like(pre).scatter(1, indices, 2 * selected)
    ref.assert_close(t.W_enc.grad, dense.t() @ x.double(), 2e-5, "grad W_enc")


def test_sorted_gives_descending_values(backend, ref):
    t = ref.inputs(9, 100, 1000, hot=0)
    values, indices = sae_kernels.topk_encode(t.x, t.W_enc, t.b_enc, 12, b_dec=t.b_dec, sorted=True, backend=backend)
    assert (values.diff(dim=1) <= 0).all()
    pre = ref.pre_acts64(t.x, t.W_enc, t.b_enc, t.b_dec).detach()
    assert torch.equal(indices[:, :5], pre.topk(5).indices)


def test_bfloat16(backend, ref):
    """bfloat16 inputs. On the triton backend this checks bf16 loads and stores only: the kernels
    convert to float32 before any arithmetic (the interpreter's own bf16 arithmetic is not reliable)."""
    t = ref.inputs(17, 100, 1000, torch.bfloat16)
    values, indices = sae_kernels.topk_encode(t.x, t.W_enc, t.b_enc, 5, b_dec=t.b_dec, backend=backend)
    assert values.dtype == torch.bfloat16
    leaves = [p.detach().double().requires_grad_(True) for p in (t.x, t.W_enc, t.b_enc, t.b_dec)]
    pre = ref.pre_acts64(*leaves)
    ref.assert_valid_topk(pre, indices, 5, slack=0.05 * pre.abs().max().item())
    expected = pre.gather(1, indices).relu()
    ref.assert_close(values, expected, 3e-2, "values")
    g = torch.randn(17, 5, dtype=torch.float64)
    (values * g.bfloat16()).sum().backward()
    (expected * g.bfloat16().double()).sum().backward()
    for name, got, leaf in zip(["x", "W_enc", "b_enc", "b_dec"], ref.grads(t.x, t.W_enc, t.b_enc, t.b_dec), leaves):
        assert got.dtype == torch.bfloat16
        ref.assert_close(got, leaf.grad, 3e-2, f"grad {name}")


def test_nothing_of_size_batch_by_latents_is_saved_or_allocated(backend, ref):
    """The forward saves no (N, n_latents) tensor for the backward, and no op of the backward allocates
    one (per-op allocations from the profiler). d_in is small so that every legitimate tensor, the
    (n_latents, d_in) gradients included, is smaller than N x n_latents."""
    n_rows, n_latents = 40, 1000
    dense_elements = n_rows * n_latents
    t = ref.inputs(n_rows, 20, n_latents, torch.float32)
    dead = (torch.rand(n_latents) < 0.2).nonzero().squeeze(1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor.shape) or tensor, lambda tensor: tensor):
        values, indices = sae_kernels.topk_encode(t.x, t.W_enc, t.b_enc, 5, b_dec=t.b_dec, backend=backend)
        x_hat = sae_kernels.sparse_decode(values, indices, t.W_dec, backend=backend) + t.b_dec
        # AuxK as the trainer runs it: the encoder on the dead latents' rows alone
        aux_values, local = sae_kernels.topk_encode(t.x, t.W_enc[dead], t.b_enc[dead], 64, b_dec=t.b_dec, backend=backend)
        aux = sae_kernels.auxk_loss(aux_values, dead[local], t.W_dec, t.x - x_hat, backend=backend)
        loss = (t.x - x_hat).pow(2).sum() + aux
    assert saved and all(math.prod(shape) < dense_elements for shape in saved), saved
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        loss.backward()
    allocations = [(event.name, event.self_cpu_memory_usage) for event in prof.events()]
    assert max(size for _, size in allocations) > 0, "the profiler recorded no allocation"
    assert all(size < 4 * dense_elements for _, size in allocations), max(allocations, key=lambda a: a[1])
    assert t.W_enc.grad is not None and t.W_dec.grad is not None


@pytest.mark.parametrize("n", [1000, 1003, 4096])  # with and without leftover columns
def test_grouped_cpu_topk_selects_the_same_values_as_torch_topk(n):
    """select.topk_rows searches only the columns of the k groups with the largest maxima; its values
    must equal torch.topk's, ties (integer data), NaN and -inf included."""
    from sae_kernels.select import topk_rows

    pre = torch.randint(-4, 5, (50, n)).float()
    pre[:25] = torch.randn(25, n)
    pre[3, 17] = math.nan
    pre[4, :200] = -math.inf
    for k in [1, 5, 31]:
        values, indices = topk_rows(pre, k, sorted=True)
        expected = pre.topk(k, dim=1).values
        assert torch.equal(values.nan_to_num(99.0), expected.nan_to_num(99.0))
        assert torch.equal(pre.gather(1, indices).nan_to_num(99.0), values.nan_to_num(99.0))
        assert (indices.sort(1).values.diff(dim=1) > 0).all()


def test_cpu_row_chunks_give_the_same_selection(monkeypatch, ref):
    """On CPU the pre-activations go through a reused buffer in row chunks; with chunks of 4 rows (and
    a ragged last chunk) the outputs must be those of a single chunk (up to the matmul's rounding,
    which may depend on the number of rows)."""
    from sae_kernels import select

    t = ref.inputs(18, 100, 1000)
    args = (t.x, t.W_enc, t.b_enc, 5)
    kwargs = dict(b_dec=t.b_dec, sorted=True, backend="torch")
    values, indices = sae_kernels.topk_encode(*args, **kwargs)
    monkeypatch.setitem(select.PRE_ACTIVATION_BUDGET, "cpu", 4 * 1000 * t.W_enc.element_size())
    select.clear_workspace()
    values_chunked, indices_chunked = sae_kernels.topk_encode(*args, **kwargs)
    order, order_chunked = indices.argsort(1), indices_chunked.argsort(1)
    assert torch.equal(indices.gather(1, order), indices_chunked.gather(1, order_chunked))
    ref.assert_close(values_chunked.gather(1, order_chunked), values.gather(1, order), 1e-12, "values")


def test_encoder_chunks_are_bounded_on_every_device():
    """The pre-activation chunk fits the device's budget at any batch and width (CUDA included: a whole
    32768 x 1M bf16 batch would be 64 GiB), keeps at least one row, and is the whole batch when it fits."""
    from sae_kernels.select import PRE_ACTIVATION_BUDGET, chunk_rows

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rows = chunk_rows(32768, 2**20, cuda, 2)
    assert rows == PRE_ACTIVATION_BUDGET["cuda"] // (2**20 * 2) == 1024
    assert chunk_rows(4096, 12288, cpu, 4) * 12288 * 4 <= PRE_ACTIVATION_BUDGET["cpu"]
    assert chunk_rows(4096, 2048, cuda, 4) == 4096
    assert chunk_rows(10, 2**40, cpu, 4) == 1
