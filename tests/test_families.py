"""Real use beyond GPT-2: for nine model families (tiny, random-init, from transformers' own config classes,
with the embedded tokenizer), one SAE goes the whole way a user takes it: train.py's `train` ->
`python -m eval` with explanations (offline) -> `python -m eval.browse` -> `python -m sae.convert` to
SAELens and back. Each stage runs in-process through the entry point's own `main`."""

import json
import math

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from sae import SparseAutoencoder
from sae.config import DataConfig, SaeConfig, TrainConfig
from sae.embedded import EMBEDDED_MODEL_DIR
from sae.trainer import train

WIDTH, LAYERS, HEADS = 32, 2, 2
_SHARED = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
               intermediate_size=2 * WIDTH, max_position_embeddings=64)
# family: (config class, model class, config arguments, hookpoint: the residual stream after block 1)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=64),
             "transformer.h.1"),
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _SHARED, "gpt_neox.layers.1"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _SHARED, "model.layers.1"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SHARED, num_key_value_heads=1), "model.layers.1"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _SHARED, "model.layers.1"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_SHARED, head_dim=16), "model.layers.1"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SHARED, head_dim=16), "model.layers.1"),
    "phi": ("PhiConfig", "PhiForCausalLM", _SHARED, "model.layers.1"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SHARED, pad_token_id=0), "model.layers.1"),
}


def save_family_model(family: str, path) -> str:
    """A random-init `family` LM with the embedded tokenizer, saved as `save_pretrained` writes it."""
    config_class, model_class, arguments, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **arguments)
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One copy of the embedded corpus for every family (it is written on first use)."""
    return tmp_path_factory.mktemp("corpus")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_eval_explain_browse_convert(family, corpus_dir, tmp_path):
    from eval.__main__ import main as eval_main
    from eval.browse.__main__ import main as browse_main
    from sae.convert import main as convert_main

    hookpoint = FAMILIES[family][3]
    model_dir = save_family_model(family, tmp_path / "model")
    cfg = TrainConfig(model=model_dir, hookpoint=hookpoint, sae=SaeConfig(n_latents=64, k=4),
                      data=DataConfig(data_dir=str(corpus_dir), ctx_len=32, shuffle_buffer_tokens=1024),
                      batch_size=256, max_tokens=256 * 8, save_every=0, out_dir=str(tmp_path / "runs"), run_name=family)
    sae_dir = train(cfg)
    assert sae_dir.name == hookpoint

    report_path = tmp_path / "report.json"
    [report] = eval_main([str(sae_dir), "--tokens", "1024", "--batch", "8", "--explain", "2", "--simulators",
                          "token-lookup", "--cache_dir", str(tmp_path / "cache"), "--data_dir", str(corpus_dir),
                          "--out", str(report_path)])
    assert json.loads(report_path.read_text())["hookpoint"] == hookpoint
    for name in ("fvu", "delta_ce"):
        assert math.isfinite(report[name]), (family, name, report[name])
    explained = [json.loads(line) for line in (sae_dir / "explain.jsonl").read_text().splitlines()]
    kinds = {record["kind"] for record in explained}
    assert {"latent", "neuron"} <= kinds, (family, kinds)  # the MLP neuron baseline is found in every family

    site = browse_main([str(sae_dir), "--out", str(tmp_path / "site"), "--report", str(report_path)])
    assert site.is_file()

    exported = convert_main([str(sae_dir), str(tmp_path / "saelens"), "--to", "saelens"])
    # the block's output is TransformerLens's resid_post in every family here
    assert json.loads((exported / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    original, reloaded = SparseAutoencoder.load(sae_dir), SparseAutoencoder.load(exported)
    x = torch.randn(16, original.cfg.d_in)
    torch.testing.assert_close(reloaded(x).x_hat, original(x).x_hat, rtol=1e-5, atol=1e-5)
