"""The peak-memory estimate (sae/memory.py): its SAE and optimiser terms against the bytes a real step
allocates, and the refusal before anything is allocated."""

from dataclasses import replace

import pytest
import torch

from sae import trainer
from sae.config import SaeConfig, TrainConfig
from sae.memory import MemoryEstimate, OutOfMemoryPlan, check_fits, estimate_memory
from sae.model import SparseAutoencoder
from sae.optim import make_optimizer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("optimizer", ["adam", "schedule_free_adam"])
@pytest.mark.parametrize("transcode", [False, True])
def test_sae_gradient_and_optimizer_terms_are_the_bytes_a_step_holds(optimizer, transcode):
    sae_cfg = SaeConfig(d_in=24, n_latents=96, k=4, k_aux=8, transcode=transcode, skip_connection=transcode)
    sae = SparseAutoencoder(sae_cfg, device="cpu")
    opt = make_optimizer(TrainConfig(optimizer=optimizer), sae.parameters(), 1e-3)
    tokens_since_fired = torch.full((96,), sae_cfg.dead_tokens)  # every latent dead: the step runs AuxK too
    target = torch.randn(32, 24) if transcode else None  # a skip transcoder's W_skip counts too
    trainer.training_step(sae, opt, torch.randn(32, 24), tokens_since_fired, 1e-3, 1.0, target)
    estimate = estimate_memory([(sae_cfg, 96)], 32, [24], 64, 0, torch.device("cpu"))
    assert estimate.parameters == tensor_bytes(sae.parameters())
    assert estimate.gradients == tensor_bytes(p.grad for p in sae.parameters())
    state = [value for p in sae.parameters() for value in opt.state[p].values() if torch.is_tensor(value) and value.dim() > 0]
    assert estimate.optimizer == tensor_bytes(state)


def test_latent_sharding_divides_the_sae_terms_and_the_step_is_the_largest_saes():
    small, wide = SaeConfig(d_in=64, n_latents=1024, k=8), SaeConfig(d_in=64, n_latents=8192, k=8)
    whole = estimate_memory([(wide, 8192)], 4096, [64], 0, 0, torch.device("cpu"))
    half = estimate_memory([(wide, 4096)], 4096, [64], 0, 0, torch.device("cpu"))
    assert half.parameters < whole.parameters / 2 + 64 * 4 and half.optimizer == 2 * half.parameters
    both = estimate_memory([(small, 1024), (wide, 8192)], 4096, [64], 0, 0, torch.device("cpu"))
    assert both.step == whole.step and both.parameters > whole.parameters


def test_each_hookpoint_has_its_own_shuffle_block_even_at_equal_widths():
    sae = SaeConfig(d_in=128, n_latents=1024, k=8)
    one = estimate_memory([(sae, 1024)], 4096, [128], 65536, 0, torch.device("cpu"))
    two = estimate_memory([(sae, 1024), (sae, 1024)], 4096, [128, 128], 65536, 0, torch.device("cpu"))
    assert one.shuffle == 2 * 65536 * 128 * 4 and two.shuffle == 2 * one.shuffle


def test_bf16_counts_its_pre_activations_in_bf16_and_the_cast_weights():
    sae = SaeConfig(d_in=64, n_latents=1024, k=8)
    fp32 = estimate_memory([(sae, 1024)], 512, [64], 0, 0, torch.device("cuda"))
    bf16 = estimate_memory([(sae, 1024)], 512, [64], 0, 0, torch.device("cuda"), torch.bfloat16)
    assert fp32.step - bf16.step == 512 * 1024 * 2 - 1024 * (2 * 64 + 1) * 2
    assert bf16.parameters == fp32.parameters and bf16.optimizer == fp32.optimizer  # float32 either way


def test_a_run_that_cannot_fit_is_refused_with_the_breakdown():
    estimate = MemoryEstimate(parameters=3 * 2**30, gradients=3 * 2**30, optimizer=6 * 2**30, step=2**29, shuffle=0,
                              lm=2**30)
    with pytest.raises(OutOfMemoryPlan, match=r"needs about 12.50 GiB more on cpu but 8.00 GiB is free.*optimizer 6.00 GiB"):
        check_fits(estimate, torch.device("cpu"), 8 * 2**30)
    assert "free" in check_fits(estimate, torch.device("cpu"), 13 * 2**30)  # the loaded LM is not counted again


def test_train_refuses_before_building_any_sae(monkeypatch, tiny_lm_dir, text_file, tmp_path):
    built = []
    monkeypatch.setattr(trainer, "free_bytes", lambda device: 2**20)  # 1 MiB free
    monkeypatch.setattr(trainer, "build_members", lambda *args: built.append(args))
    cfg = TrainConfig(model=str(tiny_lm_dir), hookpoint="transformer.h.1", batch_size=64, max_tokens=128,
                      sae=SaeConfig(n_latents=64, k=4), out_dir=str(tmp_path),
                      data=replace(TrainConfig().data, dataset=str(text_file), ctx_len=16))
    with pytest.raises(OutOfMemoryPlan, match="1.0 MiB is free"):
        trainer.train(cfg)
    assert built == []


def test_batchtopk_counts_its_threshold_and_its_wider_candidates():
    topk, batchtopk = SaeConfig(d_in=64, n_latents=1024, k=8), SaeConfig(d_in=64, n_latents=1024, k=8, activation="batchtopk")
    plain = estimate_memory([(topk, 1024)], 4096, [64], 0, 0, torch.device("cpu"))
    batch = estimate_memory([(batchtopk, 1024)], 4096, [64], 0, 0, torch.device("cpu"))
    assert batch.parameters == plain.parameters + 4
    assert batch.step - plain.step == 4096 * 3 * 8 * 3 * (4 + 8)  # 3k more codes per row: values, ids, grads


def test_each_matryoshka_prefix_adds_a_reconstruction():
    plain, nested = SaeConfig(d_in=64, n_latents=1024, k=8), SaeConfig(d_in=64, n_latents=1024, k=8, matryoshka=(64, 256))
    one = estimate_memory([(plain, 1024)], 4096, [64], 0, 0, torch.device("cpu"))
    two = estimate_memory([(nested, 1024)], 4096, [64], 0, 0, torch.device("cpu"))
    assert two.step - one.step == 2 * 4096 * 64 * 4
