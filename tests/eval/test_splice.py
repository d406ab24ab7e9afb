"""The splice really replaces the hookpoint's output, only at positions >= start, in both modes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.splice import SpliceRunner, stack_variants
from sae.activations import get_module


def noise(acts):
    return acts + torch.randn_like(acts)


def test_stack_variants_keeps_early_positions_and_replaces_the_rest():
    hidden = torch.randn(3, 7, 5)
    stacked = stack_variants(hidden, [None, torch.zeros_like, lambda acts: acts * 2], start=2)
    assert stacked.shape == (9, 7, 5)
    assert torch.equal(stacked[:3], hidden)
    for variant in (1, 2):
        assert torch.equal(stacked[3 * variant : 3 * variant + 3, :2], hidden[:, :2])
    assert torch.equal(stacked[3:6, 2:], torch.zeros(3, 5, 5))
    assert torch.equal(stacked[6:, 2:], hidden[:, 2:] * 2)


def test_wrong_replacement_shape_is_a_clear_error(tiny_lm, windows):
    model, _ = tiny_lm
    runner = SpliceRunner(model, get_module(model, "transformer.h.1"))
    with pytest.raises(ValueError, match="replacement returned shape"):
        runner.logits(windows[:2], [None, lambda acts: acts[:, :1]])


@pytest.mark.parametrize("mode", ["expand_in_hook", "repeat_inputs"])
def test_splice_changes_logits_only_from_the_start_position(tiny_lm, windows, mode):
    model, _ = tiny_lm
    runner = SpliceRunner(model, get_module(model, "transformer.h.1"), start=3, mode=mode)
    torch.manual_seed(0)
    logits = runner.logits(windows, [None, noise, torch.zeros_like])
    plain = model(input_ids=windows).logits
    torch.testing.assert_close(logits[0], plain, rtol=1e-5, atol=1e-5)  # variant 0 is the clean LM
    for variant in (1, 2):
        # causal LM: positions before the splice cannot see it
        torch.testing.assert_close(logits[variant, :, :3], plain[:, :3], rtol=1e-5, atol=1e-5)
        assert (logits[variant, :, 3:] - plain[:, 3:]).abs().amax(-1).min() > 1e-3  # every later position moved
    assert runner.clean_activations.shape == (10, 13, 32)


def test_both_modes_give_the_same_logits(tiny_lm, windows):
    model, _ = tiny_lm
    module = get_module(model, "transformer.h.0")
    replacements = [None, torch.zeros_like, lambda acts: acts.flip(-1)]
    expanded = SpliceRunner(model, module, mode="expand_in_hook").logits(windows, replacements)
    repeated = SpliceRunner(model, module, mode="repeat_inputs").logits(windows, replacements)
    torch.testing.assert_close(expanded, repeated, rtol=1e-5, atol=1e-5)


def test_auto_mode_falls_back_when_the_batch_cannot_grow_mid_forward(tiny_lm_dir, windows):
    """Eager attention builds a (B, 1, T, T) mask before the first layer: the hook cannot grow B."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, attn_implementation="eager").eval()
    runner = SpliceRunner(model, get_module(model, "transformer.h.1"))
    calls = []

    def counted_zero(acts):
        calls.append(1)
        return torch.zeros_like(acts)

    logits = runner.logits(windows, [None, counted_zero])
    assert runner.mode == "repeat_inputs"
    with torch.no_grad():
        torch.testing.assert_close(logits[0], model(input_ids=windows).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # tried once, then ran again: why replacements must not accumulate
