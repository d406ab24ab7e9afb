"""The neuron baseline beyond GPT-2: the MLP neurons of the hookpoint's block in every family (the input
of the MLP's output projection), a skipped baseline with a note where there are none, a mistyped
--neuron_module refused before the eval pass, and `python -m eval --explain` end to end on a tiny Llama."""

import json

import pytest
import torch
import transformers
from torch import nn

import eval.__main__ as eval_main
from eval.browse import build_site
from eval.explain.records import NeuronSite, capture_neurons, find_mlp_neurons, named_neuron_site
from sae.errors import UsageError

from known_saes import random_sae

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=64)

FAMILIES = {  # family: (its transformers classes' prefix, config options, the block of "...layers.1", its MLP's output projection)
    "gpt_neox": ("GPTNeoX", {}, "gpt_neox.layers.1", "dense_4h_to_h"),
    "llama": ("Llama", {}, "model.layers.1", "down_proj"),
    "mistral": ("Mistral", {}, "model.layers.1", "down_proj"),
    "qwen2": ("Qwen2", {}, "model.layers.1", "down_proj"),
    "gemma": ("Gemma", {"head_dim": 16}, "model.layers.1", "down_proj"),
    "gemma2": ("Gemma2", {"head_dim": 16}, "model.layers.1", "down_proj"),
    "phi": ("Phi", {}, "model.layers.1", "fc2"),
    "phi3": ("Phi3", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "model.layers.1", "down_proj"),
}
"""(Names, not classes: transformers imports a family's modelling code when its class is first touched.)"""


def tiny(family: str) -> nn.Module:
    """A random-init 2-layer, width-32 causal LM of `family` (intermediate size 64), in eval mode."""
    prefix, options, _, _ = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **options)
    torch.manual_seed(0)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_neurons_of_each_family_are_the_input_of_its_mlp_output_projection(family):
    model = tiny(family)
    _, _, block, projection = FAMILIES[family]
    for hookpoint in (block, f"{block}.mlp", f"{block}.input_layernorm"):
        assert find_mlp_neurons(model, hookpoint) == NeuronSite(f"{block}.mlp.{projection}", "input")
    neurons = capture_neurons(model, find_mlp_neurons(model, block), torch.randint(0, 100, (2, 5)))
    assert neurons.shape == (2, 5, 64)  # intermediate_size


def test_gated_neurons_are_the_gate_times_up_product():
    """Llama's neuron j is act(gate_j . x) * (up_j . x): neither mlp.act_fn's output (the gate alone) nor up_proj's."""
    model = tiny("llama")
    mlp = model.model.layers[1].mlp
    inputs = []
    handle = mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    input_ids = torch.randint(0, 100, (2, 5))
    neurons = capture_neurons(model, find_mlp_neurons(model, "model.layers.1"), input_ids)
    handle.remove()
    with torch.no_grad():
        expected = mlp.act_fn(mlp.gate_proj(inputs[0])) * mlp.up_proj(inputs[0])
    torch.testing.assert_close(neurons, expected)


class ToyBlock(nn.Module):
    """A block whose MLP's projections have names no family uses (w_in: 8 -> 24, w_out: 24 -> 8)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.add_module("w_in", nn.Linear(8, 24))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("w_out", nn.Linear(24, 8))
        self.mlp.add_module("probe", nn.Linear(8, 1))  # a later Linear that does not map back to 8


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])
        self.norm = nn.LayerNorm(8)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = hidden + block.mlp.w_out(block.mlp.act(block.mlp.w_in(hidden)))
        return self.norm(hidden)


def test_an_unknown_mlp_reads_its_last_linear_that_maps_back_and_no_block_means_no_neurons():
    model = ToyLM()
    site = find_mlp_neurons(model, "blocks.1")
    assert site == NeuronSite("blocks.1.mlp.w_out", "input")
    assert capture_neurons(model, site, torch.randint(0, 10, (2, 3))).shape == (2, 3, 24)
    assert find_mlp_neurons(model, "norm") is None  # no numbered block
    assert find_mlp_neurons(model, "embed") is None


def test_a_mixture_of_experts_has_no_one_mlp_to_read():
    config = transformers.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4)
    assert find_mlp_neurons(transformers.Qwen2MoeForCausalLM(config), "model.layers.1") is None


def test_a_named_neuron_module_is_checked_and_read_at_its_output():
    model = tiny("llama")
    assert named_neuron_site(model, "model.layers.1.mlp.act_fn") == NeuronSite("model.layers.1.mlp.act_fn", "output")
    with pytest.raises(UsageError, match=r"--neuron_module 'model.layers.1.mlp.act' is not a module of LlamaForCausalLM") as error:
        named_neuron_site(model, "model.layers.1.mlp.act")
    assert "\n" not in str(error.value)


# -- python -m eval --explain on a tiny Llama -------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_lm_dir):
    """A random-init 2-layer Llama (hidden 32) with the tiny GPT-2's tokenizer, saved like a hub model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=64,
                                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_sae(root, llama_dir, text_file, hookpoint="model.layers.1"):
    """A random SAE folder whose cfg.json records the tiny Llama, `hookpoint` and the local text file."""
    metadata = {"model": str(llama_dir), "hookpoint": hookpoint, "ctx_len": 16, "dataset": str(text_file),
                "split": "train", "text_column": "text"}
    return random_sae(32, n_latents=64, k=4).save(root / hookpoint, metadata=metadata)


EXPLAIN = ["--explain", "3", "--simulators", "token-lookup,n2g", "--tokens", "320", "--batch", "10"]


def test_explain_on_llama_scores_its_gated_mlp_neurons_and_browses(llama_dir, text_file, tmp_path):
    sae_dir = llama_sae(tmp_path, llama_dir, text_file)
    report_path = tmp_path / "report.json"
    [report] = eval_main.main([str(sae_dir), *EXPLAIN, "--out", str(report_path)])
    section = report["explain"]
    assert section["neuron_site"] == "the input of model.layers.1.mlp.down_proj"
    for simulator in ("token-lookup", "n2g"):
        assert section["simulators"][simulator]["neurons"]["units"] == 3
    units = [json.loads(line) for line in (sae_dir / "explain.jsonl").read_text().splitlines()]
    neurons = [unit for unit in units if unit["kind"] == "neuron"]
    assert len(neurons) == 3 and all(0 <= unit["unit"] < 64 for unit in neurons)
    index = build_site(sae_dir, tmp_path / "site", report_path)
    assert all((index.parent / f"neuron-{unit['unit']}.html").is_file() for unit in neurons)


def test_a_mistyped_neuron_module_fails_before_the_eval_pass(llama_dir, text_file, tmp_path, monkeypatch):
    sae_dir = llama_sae(tmp_path, llama_dir, text_file)

    def no_eval(*args, **kwargs):
        raise AssertionError("the eval pass ran before the neuron module was checked")

    monkeypatch.setattr(eval_main, "evaluate_many", no_eval)
    with pytest.raises(UsageError, match=r"--neuron_module 'model.layers.1.mlp.act' is not a module") as error:
        eval_main.main([str(sae_dir), *EXPLAIN, "--neuron_module", "model.layers.1.mlp.act"])
    assert "\n" not in str(error.value)


def test_without_mlp_neurons_the_baseline_is_skipped_with_a_note(llama_dir, text_file, tmp_path, capsys):
    sae_dir = llama_sae(tmp_path, llama_dir, text_file, hookpoint="model.norm")
    [report] = eval_main.main([str(sae_dir), *EXPLAIN])
    section = report["explain"]
    assert section["neuron_site"] is None and set(section["simulators"]["token-lookup"]) == {"latents", "latents_shuffled"}
    assert any("no MLP neurons found for hookpoint model.norm" in note for note in section["notes"])
    assert "note: no MLP neurons found for hookpoint model.norm" in capsys.readouterr().err
