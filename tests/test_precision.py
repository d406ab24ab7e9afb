"""Mixed precision (TrainConfig.precision): bf16 matmuls and kernel inputs over float32 parameters,
gradients, optimiser state and losses, checked against float64 on CPU (bf16 runs there too)."""

import torch

from sae.config import SaeConfig
from sae.distributed import resolve_precision
from sae.gpu_check import planted_sae_inputs
from sae.model import SparseAutoencoder
from sae.trainer import train
from test_trainer import read_log, tiny_config


def forward_backward(basis, bias, x, dead, cfg, dtype, compute_dtype):
    sae = SparseAutoencoder(cfg, dtype=dtype, compute_dtype=compute_dtype)
    with torch.no_grad():
        sae.W_dec.copy_(basis)
        sae.encoder.weight.copy_(0.9 * basis)
        sae.encoder.bias.copy_(bias)
    out = sae(x.to(dtype), dead)
    out.loss.backward()
    return sae, out


def test_bf16_losses_and_gradients_match_a_float64_reference():
    # Planted inputs (sae/gpu_check.py): the top k is clear by a margin far above bf16's rounding, so
    # both precisions select the same latents and their gradients may be compared.
    d_in, n_latents, k, n_dead = 256, 600, 2, 60
    cfg = SaeConfig(d_in=d_in, n_latents=n_latents, k=k, k_aux=n_dead)
    basis, x, dead = planted_sae_inputs(d_in, n_latents, k, 256, n_dead, seed=1)
    bias = 0.05 * torch.randn(n_latents, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_sae, ref = forward_backward(basis, bias, x, dead, cfg, torch.float64, None)
    sae, out = forward_backward(basis, bias, x, dead, cfg, torch.float32, torch.bfloat16)
    assert torch.equal(out.latent_indices.sort(1).values, ref.latent_indices.sort(1).values)
    # Parameters, gradients and every loss stay float32; only the matmuls and kernel inputs are bf16.
    assert {p.dtype for p in sae.parameters()} == {p.grad.dtype for p in sae.parameters()} == {torch.float32}
    assert out.fvu.dtype == out.auxk_loss.dtype == out.loss.dtype == out.x_hat.dtype == torch.float32
    assert abs(out.fvu.item() - ref.fvu.item()) < 1e-2 * ref.fvu.item()
    assert abs(out.auxk_loss.item() - ref.auxk_loss.item()) < 1e-2 * ref.auxk_loss.item()
    errors = []
    for (name, param), ref_param in zip(sae.named_parameters(), ref_sae.parameters()):
        errors.append((param.grad.double() - ref_param.grad).norm() / ref_param.grad.norm())
        assert errors[-1] < 3e-2, (name, errors[-1].item())  # bf16 has 8 bits of mantissa: ~0.4% per rounding
    assert max(errors) > 1e-4  # and the matmuls really ran in bf16 (float32's error is ~1e-7)
    # and a float32 forward (compute_dtype None) is float32 throughout, within float32 rounding
    sae32, out32 = forward_backward(basis, bias, x, dead, cfg, torch.float32, None)
    for param, ref_param in zip(sae32.parameters(), ref_sae.parameters()):
        assert (param.grad.double() - ref_param.grad).norm() < 1e-5 * ref_param.grad.norm()


def test_auto_precision_is_fp32_on_cpu_and_the_names_are_honoured():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16


def test_a_bf16_run_trains_about_as_well_as_fp32_and_saves_float32(tiny_lm_dir, text_file, tmp_path):
    final = {}
    for precision in ("fp32", "bf16"):
        sae_dir = train(tiny_config(tiny_lm_dir, text_file, tmp_path, precision=precision, run_name=precision,
                                    max_tokens=128 * 60))
        final[precision] = read_log(sae_dir)[-1]["fvu"]
        assert SparseAutoencoder.load(sae_dir).dtype == torch.float32
    assert final["bf16"] < 0.6  # it trains (the first step is ~1)
    assert abs(final["bf16"] - final["fp32"]) < 0.05 * final["fp32"], final
