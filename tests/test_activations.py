"""LM activations: the hook equals output_hidden_states, the stream shuffles and resumes exactly; a model
that does not load, a hookpoint whose output is not (batch, tokens, d) and activations that are not finite
are one-line errors."""

import copy
import json
import shutil

import pytest
import torch

from sae.activations import (ActivationStream, LMWindowSource, capture_activations, capture_many, get_module,
                             hookpoint_widths, load_model_and_tokenizer, model_load_error, module_name_summary)
from sae.errors import UsageError, UserError
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


# ---------------------------------------------------------------- a model that does not load


@pytest.fixture()
def model_without_weights(tiny_lm_dir, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_lm_dir, folder)
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("name, message", [
    ("{tmp}/nope", r"model folder not found: .*/nope \(no such folder\)$"),
    ("./gpt2-typo", r"model folder not found: \./gpt2-typo"),
    ("{tmp}", r"model folder .* has no config\.json: not a model folder"),
    ("{tmp}/file.txt", r"model .*file\.txt is a file; a model is a folder"),
    ("{no_weights}", r"model folder .*no-weights cannot be loaded: .*no file named model\.safetensors"),
    # the tests run with HF_HUB_OFFLINE=1 and an empty cache
    ("gpt2", r"model 'gpt2' is neither a folder here nor in the local Hugging Face cache \(.*\), and the hub is "
             r"offline \(HF_HUB_OFFLINE=1\); download it"),
    ("not a name", r"model 'not a name' is neither a folder here nor a valid hub name"),
])
def test_a_model_that_does_not_load_is_one_line(name, message, tmp_path, model_without_weights, monkeypatch):
    """They were 88-108-line tracebacks of 4 chained exceptions (OSError from HFValidationError, ...)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a model")
    with pytest.raises(UserError, match=message) as error:
        load_model_and_tokenizer(name.format(tmp=tmp_path, no_weights=model_without_weights))
    assert "\n" not in str(error.value)


def test_a_hub_name_the_hub_does_not_have_is_one_line():
    """What transformers raises online (not reachable from the tests): an OSError from the hub's error."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/someone/missing"))
    for hub_error, words in [(RepositoryNotFoundError, "the hub has no model repository of that name"),
                             (GatedRepoError, "on the hub it is gated")]:
        try:
            try:
                raise hub_error("404 Client Error", response=response)
            except OSError as cause:
                raise OSError("someone/missing is not a local folder and is not a valid model identifier") from cause
        except OSError as error:
            assert f"model 'someone/missing' is not a folder here, and {words}" in str(model_load_error("someone/missing", error))


# ---------------------------------------------------------------- hookpoints whose output is not (batch, tokens, d)


@pytest.fixture(scope="module")
def tiny_llama(tiny_lm_dir):
    """A random-init 2-layer Llama (width 32, 2 heads of 16) with the tiny GPT-2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(AutoTokenizer.from_pretrained(tiny_lm_dir)))
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("hookpoint, message", [
    ("", r"the hookpoint is empty; modules are: model, model\.embed_tokens, model\.layers, model\.layers\.\{0\.\.1\}"),
    ("model", r"hookpoint 'model' outputs a BaseModelOutputWithPast, not a float tensor \(or a tuple whose first "
              r"element is one\) of shape \(batch, tokens, d\) = \(3, 5, d\) for input ids of shape \(3, 5\); the "
              r"residual stream is the output of a block of model\.layers\.\{0\.\.1\}"),
    ("model.layers", r"hookpoint 'model\.layers' did not run in the forward pass of LlamaForCausalLM"),
    ("model.rotary_emb", r"hookpoint 'model\.rotary_emb' outputs a tuple whose first element is a float32 tensor of "
                         r"shape \(1, 5, 16\), not a float tensor"),
])
def test_a_hookpoint_that_is_not_batch_tokens_d_is_one_line(tiny_llama, hookpoint, message):
    """They were AttributeError / RuntimeError tracebacks, or (rotary_emb) not refused at all."""
    with pytest.raises(UsageError, match=message) as error:
        capture_activations(tiny_llama, get_module(tiny_llama, hookpoint), torch.randint(0, 100, (3, 5)))
    assert "\n" not in str(error.value)


def test_position_tables_are_refused_up_front_by_a_two_window_probe(tiny_llama, lm):
    """A table that follows positions, not the batch, passes a one-window probe: (1, T, d) looks right."""
    assert hookpoint_widths(tiny_llama, ["model.layers.0", "model.embed_tokens"]) == {"model.layers.0": 32, "model.embed_tokens": 32}
    for model, hookpoint in [(tiny_llama, "model.rotary_emb"), (lm[0], "transformer.wpe")]:
        assert capture_activations(model, get_module(model, hookpoint), torch.zeros(1, 2, dtype=torch.long)).shape[0] == 1
        with pytest.raises(UsageError, match=rf"hookpoint '{hookpoint}' outputs .*shape \(1, 2, \d+\), not a float tensor"):
            hookpoint_widths(model, [hookpoint])


# ---------------------------------------------------------------- activations that are not finite


@pytest.fixture(scope="module")
def overflowing_llama(tiny_llama):
    """The tiny Llama in float16, its second block's MLP input scaled up so that its residual overflows 65504."""
    model = copy.deepcopy(tiny_llama).to(torch.float16)
    model.model.layers[1].post_attention_layernorm.weight.fill_(1e4)
    return model


def test_activations_of_an_overflowing_float16_model_are_one_line(overflowing_llama):
    """They gave an eval of nan with exit 0, and training said only `loss is nan at step 0`."""
    input_ids = torch.randint(0, 100, (3, 5))
    assert torch.isfinite(capture_activations(overflowing_llama, get_module(overflowing_llama, "model.layers.0"), input_ids)).all()
    modules = [get_module(overflowing_llama, name) for name in ("model.layers.0", "model.layers.1")]
    with pytest.raises(UsageError, match=r"^activations at model\.layers\.1 are not finite \(\d+ inf / [\d,]+ nan of 480 "
                                         r"values; max \|finite x\| \S+\): the model in float16 overflows; use "
                                         r"--model_dtype bfloat16 or float32$"):
        capture_many(overflowing_llama, modules, input_ids)


def test_nan_activations_of_a_float32_model_are_one_line_without_the_dtype_hint(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UsageError, match=r"^activations at model\.layers\.0 are not finite \(0 inf / [\d,]+ nan of 480 "
                                         r"values; max \|finite x\| [^)]+\): the model's own forward produces them in "
                                         r"float32 \(check its weights\)$"):
        capture_activations(model, get_module(model, "model.layers.0"), torch.randint(0, 100, (3, 5)))


def test_every_reader_of_activations_checks_them(overflowing_llama, text_file, tiny_lm_dir):
    """Training's stream and eval refuse through capture_many; the activation cache computes through the same
    function (its own tests own its LM wrapper)."""
    from transformers import AutoTokenizer

    import sae.cache.compute
    from eval.evaluate import activation_mean

    hookpoint = "model.layers.1"
    tokens = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), AutoTokenizer.from_pretrained(tiny_lm_dir), 16)
    with pytest.raises(UsageError, match="activations at model.layers.1 are not finite"):
        LMWindowSource(overflowing_llama, [hookpoint], tokens).next_activations(4)
    with pytest.raises(UsageError, match="activations at model.layers.1 are not finite"):
        activation_mean(overflowing_llama, hookpoint, torch.randint(0, 100, (4, 16)))
    assert sae.cache.compute.capture_many is capture_many
