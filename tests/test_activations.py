"""LM activations: the hook equals output_hidden_states, the stream shuffles and resumes exactly."""

import json

import pytest
import torch

from sae.activations import (ActivationStream, LMWindowSource, capture_activations, capture_many, get_module,
                             load_model_and_tokenizer, module_name_summary)
from sae.errors import UsageError
from sae.config import DataConfig
from sae.data import TokenWindows, load_text_dataset


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_model_and_tokenizer(str(tiny_lm_dir))


H = "transformer.h.1"


def make_stream(lm, text_file, **kwargs):
    model, tokenizer = lm
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, ctx_len=16)
    options = dict(batch_size=50, shuffle_buffer_tokens=300, lm_batch_windows=7, seed=3)
    options.update({key: value for key, value in kwargs.items() if key != "hookpoints"})
    hookpoints = kwargs.pop("hookpoints", H)
    source = LMWindowSource(model, [hookpoints] if isinstance(hookpoints, str) else hookpoints, windows, options.pop("lm_batch_windows"))
    return ActivationStream(source, **options)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_equals_output_hidden_states(lm, layer):
    model, _ = lm
    input_ids = torch.randint(0, model.config.vocab_size, (3, 16))
    captured = capture_activations(model, get_module(model, f"transformer.h.{layer}"), input_ids)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i (for the last block, only before ln_f).
    if layer < model.config.n_layer - 1:
        torch.testing.assert_close(captured, hidden[layer + 1], rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_hooked_block(lm):
    model, _ = lm
    ran = []
    handle = model.transformer.h[2].register_forward_hook(lambda *args: ran.append(True))
    try:
        capture_activations(model, get_module(model, "transformer.h.0"), torch.zeros(1, 4, dtype=torch.long))
    finally:
        handle.remove()
    assert not ran


def test_unknown_hookpoint_lists_module_names_with_each_layer_stack_once(lm):
    with pytest.raises(UsageError, match=r"hookpoint 'transformer.h.9' is not a module.*transformer\.h\.\{0\.\.2\} "
                                         r"\(each with transformer\.h\.0\.ln_1, transformer\.h\.0\.attn"):
        get_module(lm[0], "transformer.h.9")
    # a Pythia-like tree: the 36 layers and their 8 children each are one entry, not 300 names
    names = ["gpt_neox", "gpt_neox.embed_in", "gpt_neox.layers"]
    names += [f"gpt_neox.layers.{i}{part}" for i in range(36) for part in ("", ".attention", ".attention.dense", ".mlp")]
    names += ["gpt_neox.final_layer_norm", "embed_out"]
    assert module_name_summary(names) == ("gpt_neox, gpt_neox.embed_in, gpt_neox.layers, gpt_neox.layers.{0..35} (each with "
                                          "gpt_neox.layers.0.attention, gpt_neox.layers.0.mlp), gpt_neox.final_layer_norm, embed_out")


def test_stream_batches_are_the_hooked_activations_without_first_positions(lm, text_file):
    model, tokenizer = lm
    stream = make_stream(lm, text_file)
    batches = torch.cat([next(stream)[H] for _ in range(stream.batches_per_block)])
    assert batches.shape == (stream.batches_per_block * 50, model.config.n_embd)

    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, ctx_len=16)
    input_ids = torch.stack([next(windows) for _ in range(stream.windows_per_block)])
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[2]
    without_first = hidden[:, 1:].reshape(-1, hidden.shape[-1])
    # Every streamed row is one of the block's activations (position 0 of each window never is).
    distances = torch.cdist(batches, without_first, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-4
    first_positions = hidden[:, 0]
    assert torch.cdist(batches, first_positions).min() > 1e-3
    # Shuffled: consecutive rows of a batch come from many different windows.
    source_window = distances.argmin(dim=1) // 15
    assert len(set(source_window[:50].tolist())) > 10


def test_stream_resumes_exactly(lm, text_file):
    reference = make_stream(lm, text_file)
    expected = [next(reference)[H] for _ in range(3 * reference.batches_per_block + 2)]
    for stop in (0, 1, reference.batches_per_block, reference.batches_per_block + 2):
        stream = make_stream(lm, text_file)
        for _ in range(stop):
            next(stream)[H]
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = make_stream(lm, text_file)
        resumed.load_state_dict(state)
        for index in range(stop, len(expected)):
            assert torch.equal(next(resumed)[H], expected[index]), (stop, index)


def test_different_seeds_shuffle_differently(lm, text_file):
    a, b = make_stream(lm, text_file, seed=1), make_stream(lm, text_file, seed=2)
    assert not torch.equal(next(a)[H], next(b)[H])


def test_several_hookpoints_share_one_forward_and_one_shuffle(lm, text_file):
    model, _ = lm
    both = make_stream(lm, text_file, hookpoints=["transformer.h.0", H])
    first, second = make_stream(lm, text_file, hookpoints=["transformer.h.0"]), make_stream(lm, text_file)
    for _ in range(both.batches_per_block + 1):
        batch = next(both)
        assert torch.equal(batch["transformer.h.0"], next(first)["transformer.h.0"])
        assert torch.equal(batch[H], next(second)[H])
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    outputs = capture_many(model, [get_module(model, H), get_module(model, "transformer.h.0")], input_ids)
    assert torch.equal(outputs[0], capture_activations(model, get_module(model, H), input_ids))
    assert torch.equal(outputs[1], capture_activations(model, get_module(model, "transformer.h.0"), input_ids))


def test_windows_longer_than_the_model_positions_are_a_clear_error():
    """They used to end in a 73-line traceback with `IndexError: index out of range`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae.activations import check_context_length

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    check_context_length(model, 16)
    with pytest.raises(ValueError, match=r"data.ctx_len is 17, but .* has only 16 positions; use data.ctx_len <= 16"):
        check_context_length(model, 17)


def test_random_init_rebuilds_the_same_lm_from_its_seed(tiny_lm_dir):
    pretrained, _ = load_model_and_tokenizer(str(tiny_lm_dir))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, tokenizer = load_model_and_tokenizer(str(tiny_lm_dir), init="random", init_seed=3)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    again, _ = load_model_and_tokenizer(str(tiny_lm_dir), init="random", init_seed=3)
    other, _ = load_model_and_tokenizer(str(tiny_lm_dir), init="random", init_seed=4)
    state, pretrained_state = first.state_dict(), pretrained.state_dict()
    assert state.keys() == pretrained_state.keys() and tokenizer.vocab_size == pretrained.config.vocab_size
    assert all(torch.equal(state[name], tensor) for name, tensor in again.state_dict().items())
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"], other.state_dict()["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(state["transformer.wte.weight"], pretrained_state["transformer.wte.weight"])
    with pytest.raises(ValueError, match="'pretrained' or 'random'"):
        load_model_and_tokenizer(str(tiny_lm_dir), init="scrambled")
