"""The optimiser side of a step: the weights an optimiser evaluates, read without touching the training
weights, and the learning-rate decay with schedule-free Adam (what the config's docstrings say)."""

import pytest
import schedulefree
import torch

from sae import optim
from sae.config import TrainConfig


def schedule_free_after_steps(dtype: torch.dtype, steps: int = 7, beta1: float = 0.9, lrs=None, r: float = 1.0):
    """A schedule-free AdamW over two parameters (a (64, 16) matrix and a (16,) vector) after `steps` steps
    of fixed random gradients at `lrs[t]` (default 0.1 each), and the Adam iterate z after each step."""
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(64, 16, generator=generator, dtype=dtype)),
                  torch.nn.Parameter(torch.randn(16, generator=generator, dtype=dtype))]
    optimizer = schedulefree.AdamWScheduleFree(parameters, lr=0.1, betas=(beta1, 0.999), eps=1e-8, weight_decay=0.0, r=r)
    optimizer.train()
    iterates = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 if lrs is None else lrs[step]
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator, dtype=dtype)
        optimizer.step()
        iterates.append([optimizer.state[parameter]["z"].clone() for parameter in parameters])
    return optimizer, parameters, iterates


def test_schedule_free_average_read_out_of_place_equals_the_librarys_eval():
    """Defazio et al.'s y = (1 - beta1) z + beta1 x solved for x, in float64; and bitwise what the
    library's eval() writes into the parameter, in float32, without changing the parameter."""
    beta1 = 0.8
    optimizer, parameters, _ = schedule_free_after_steps(torch.float64, beta1=beta1)
    for parameter in parameters:
        z = optimizer.state[parameter]["z"]
        expected = (parameter.detach() - (1 - beta1) * z) / beta1
        torch.testing.assert_close(optim.evaluated_rows(optimizer, parameter), expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(optim.evaluated_rows(optimizer, parameter, slice(1, 3)), expected[1:3], rtol=1e-14, atol=1e-14)

    optimizer, parameters, _ = schedule_free_after_steps(torch.float32, beta1=beta1)
    training = [parameter.detach().clone() for parameter in parameters]
    averaged = [optim.evaluated_rows(optimizer, parameter) for parameter in parameters]
    for parameter, before in zip(parameters, training):
        assert torch.equal(parameter.detach(), before)  # read out of place: nothing changed
    optimizer.eval()
    for parameter, average in zip(parameters, averaged):
        assert torch.equal(parameter.detach(), average)
        in_eval_mode = optim.evaluated_rows(optimizer, parameter)  # the parameter itself (a view)
        assert in_eval_mode.data_ptr() == parameter.data_ptr() and torch.equal(in_eval_mode, average)
    optimizer.train()
    # why it matters: the library's swap there and back does not give y back bitwise
    assert any(not torch.equal(parameter.detach(), before) for parameter, before in zip(parameters, training))


def test_adam_evaluates_its_parameters_themselves():
    parameter = torch.nn.Parameter(torch.randn(4, 2))
    optimizer = optim.make_optimizer(TrainConfig(optimizer="adam"), [parameter], 1e-2)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert torch.equal(optim.evaluated_rows(optimizer, parameter, slice(1, 3)), parameter.detach()[1:3])


def test_lr_decay_ends_above_zero():
    """The decay's last step runs at base_lr / decay_steps, not 0 (`lr_at`, TrainConfig.lr_decay_frac)."""
    lrs = [optim.lr_at(step, 1.0, 0, 100, 0.2) for step in range(100)]
    assert lrs[:80] == [1.0] * 80
    assert lrs[80:] == pytest.approx([(20 - i) / 20 for i in range(20)])
    assert lrs[-1] == pytest.approx(1 / 20) and min(lrs) > 0


def test_with_lr_decay_the_schedule_free_average_weights_iterates_by_the_largest_lr_so_far():
    """TrainConfig.schedule_free_r and lr_decay_frac: under warmup and decay (lr_at, as the trainer sets
    it), x after T steps is the average of the iterates z_1..z_T weighted by t^r lr_max_t^2 (lr_max_t: the
    largest lr of steps 1..t), so the decayed steps keep their full weight; weighting by lr_t^2 instead
    would give another x. Float64 throughout."""
    steps, base_lr, r = 12, 0.1, 1.0
    lrs = [optim.lr_at(step, base_lr, 3, steps, 0.5) for step in range(steps)]
    assert lrs[2:6] == [base_lr] * 4 and lrs[-1] == pytest.approx(base_lr / 6)  # warmup 3, decay over 6 steps
    optimizer, parameters, iterates = schedule_free_after_steps(torch.float64, steps=steps, lrs=lrs, r=r)
    assert [group["scheduled_lr"] for group in optimizer.param_groups] == [lrs[-1]]  # the library ran at our lr

    def average(weights: list[float], index: int) -> torch.Tensor:
        return sum(w * z[index] for w, z in zip(weights, iterates)) / sum(weights)

    lr_max = [max(lrs[: t + 1]) for t in range(steps)]
    documented = [(t + 1) ** r * lr_max[t] ** 2 for t in range(steps)]
    by_current_lr = [(t + 1) ** r * lrs[t] ** 2 for t in range(steps)]
    for index, parameter in enumerate(parameters):
        x = optim.evaluated_rows(optimizer, parameter)
        torch.testing.assert_close(x, average(documented, index), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(x, average(by_current_lr, index), rtol=1e-6, atol=1e-6)


def test_a_schedule_free_run_with_lr_decay_runs_at_lr_at_and_keeps_full_weights(tiny_lm_dir, text_file, tmp_path):
    """The trainer's side of the above: each step's lr is `lr_at`'s (the last above 0), and the optimiser's
    average weights add up to sum_t t^r lr_max_t^2 with lr_max = the base lr (no warmup), decay or not."""
    from test_trainer import read_log, tiny_config

    from sae import checkpoint
    from sae.trainer import train

    steps, base_lr = 40, 3e-2
    cfg = tiny_config(tiny_lm_dir, text_file, tmp_path, lr=base_lr, lr_warmup_steps=0, lr_decay_frac=0.25, log_every=1)
    sae_dir = train(cfg)
    assert [line["lr"] for line in read_log(sae_dir)] == [optim.lr_at(step, base_lr, 0, steps, 0.25) for step in range(steps)]
    assert read_log(sae_dir)[-1]["lr"] == pytest.approx(base_lr / 10)
    _, state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(sae_dir.parent)[-1])
    (group,) = state["members"][""]["optimizer"]["param_groups"]
    assert group["lr_max"] == base_lr and group["r"] == 1.0 and group["weight_lr_power"] == 2.0
    assert group["weight_sum"] == pytest.approx(sum(t * base_lr**2 for t in range(1, steps + 1)), rel=1e-12)


def test_the_lr_rule_notes_shapes_outside_those_it_was_measured_at():
    from sae.config import SaeConfig, TrainConfig
    from sae.optim import lr_rule_note

    measured = TrainConfig(sae=SaeConfig(n_latents=8192, k=16), batch_size=16384)
    assert lr_rule_note(measured.sae, measured) is None
    wide = TrainConfig(sae=SaeConfig(n_latents=32768, k=32), batch_size=32768)
    note = lr_rule_note(wide.sae, wide)
    assert note.startswith("note: the default lr 0.032 ") and "32,768 latents at batch 32,768" in note and "--lr" in note
    big_batch = TrainConfig(sae=SaeConfig(n_latents=2048, k=16), batch_size=65536)
    assert "batch 65,536" in lr_rule_note(big_batch.sae, big_batch)
    assert lr_rule_note(wide.sae, TrainConfig(sae=wide.sae, batch_size=32768, optimizer="adam")) is None
