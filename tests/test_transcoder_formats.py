"""Transcoder exports: circuit-tracer's transcoder set (sae/formats/circuit_tracer.py), read back by a
re-implementation of circuit-tracer's loader, and SAELens's lack of a TopK transcoder (sae/formats/saelens.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn

from sae.config import SaeConfig
from sae.errors import UsageError
from sae.formats.circuit_tracer import (CONFIG_FILE, LAYER_FILE, LayerTranscoder, feature_hooks,
                                        write_circuit_tracer_set)
from sae.formats.saelens import TRANSCODER_ARCHITECTURES, saelens_transcoder_refusal, write_saelens_folder

D, N_LATENTS, K, N_LAYERS = 8, 16, 4, 3


def random_transcoder(layer: int, skip: bool, seed: int, k: int = K) -> LayerTranscoder:
    """Layer `layer`'s GPT-2 MLP transcoder with random weights; b_enc shifted down so that many rows of a
    random input have fewer than k positive pre-activations (where circuit-tracer's TopK, with no ReLU,
    would keep negative ones)."""
    cfg = SaeConfig(d_in=D, n_latents=N_LATENTS, k=k, transcode=True, skip_connection=skip)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(N_LATENTS, D, generator=gen),
               "encoder.bias": torch.randn(N_LATENTS, generator=gen) - 2.5,
               "W_dec": torch.randn(N_LATENTS, D, generator=gen), "b_dec": torch.randn(D, generator=gen)}
    if skip:
        tensors["W_skip"] = torch.randn(D, D, generator=gen)
    provenance = {"hookpoint": f"transformer.h.{layer}.mlp", "model": "tiny-gpt2"}
    return LayerTranscoder(layer, cfg, tensors, provenance, f"runs/tc/layer{layer}")


def our_prediction(member: LayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """Float64 reference of our transcoder (sae/model.py): pre = W_enc x + b_enc, ReLU of the top k,
    y_hat = values @ W_dec[idx] + b_dec (+ x @ W_skip.T)."""
    t = {name: tensor.double() for name, tensor in member.tensors.items()}
    top = torch.topk(x @ t["encoder.weight"].T + t["encoder.bias"], member.cfg.k, dim=-1)
    values = top.values.relu()
    y = torch.einsum("nk,nkd->nd", values, t["W_dec"][top.indices]) + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


# --- circuit-tracer's loader, re-implemented as read at commit 196e2cecbae69532a5677630f6b7c99c6c275fe3 ---

class CircuitTracerTopK(nn.Module):
    """transcoder/activation_functions.py TopK: the top k kept as they are (no ReLU), zero elsewhere."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        _, indices = torch.topk(x, k=self.k, dim=-1)
        gate = torch.zeros_like(x)
        gate.scatter_(dim=-1, index=indices, value=1)
        return x * gate.to(x.dtype)


class CircuitTracerTranscoder(nn.Module):
    """transcoder/single_layer_transcoder.py SingleLayerTranscoder: its parameters' names and shapes,
    encode (F.linear), decode (acts @ W_dec + b_dec) and skip (x @ W_skip.T)."""

    def __init__(self, d_model: int, d_transcoder: int, activation_function, skip_connection: bool):
        super().__init__()
        self.d_transcoder = d_transcoder
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if skip_connection else None
        self.activation_function = activation_function

    def forward(self, input_acts):
        acts = self.activation_function(F.linear(input_acts.to(self.W_enc.dtype), self.W_enc, self.b_enc))
        reconstruction = acts @ self.W_dec + self.b_dec
        return reconstruction + input_acts @ self.W_skip.T if self.W_skip is not None else reconstruction


def circuit_tracer_load(folder: Path) -> tuple[dict, list[CircuitTracerTranscoder]]:
    """(config, transcoders by layer) as circuit-tracer reads `folder` once it is a hub repository:
    utils/hf_utils.py load_transcoders (model_kind) and resolve_transcoder_paths (no `transcoders` list:
    layer_{i}.safetensors, i < the number of such files); single_layer_transcoder.py load_transcoder_set
    (activation "topk" -> TopK(k), k required) and load_transcoder (every tensor of the file into a strict
    load_state_dict; d_transcoder from b_enc, d_model from b_dec; W_skip present -> skip); TranscoderSet
    (layers 0 .. n-1, one d_transcoder)."""
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert config["model_kind"] == "transcoder_set"
    assert "transcoders" not in config
    n_files = len(list(folder.glob("layer_*.safetensors")))
    paths = {i: folder / f"layer_{i}.safetensors" for i in range(n_files)}
    assert config["activation"] == "topk" and config["k"] is not None
    transcoders = []
    for layer in range(len(paths)):
        with safe_open(str(paths[layer]), framework="pt", device="cpu") as file:
            params = {key: file.get_tensor(key) for key in file.keys()}
        module = CircuitTracerTranscoder(params["b_dec"].shape[0], params["b_enc"].shape[0],
                                         CircuitTracerTopK(config["k"]), params.get("W_skip") is not None)
        module.load_state_dict(params, strict=True, assign=True)
        transcoders.append(module)
    assert len({module.d_transcoder for module in transcoders}) == 1
    return config, transcoders


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_set_loads_and_predicts_as_ours(tmp_path, skip):
    members = [random_transcoder(layer, skip, seed=layer) for layer in reversed(range(N_LAYERS))]
    write_circuit_tracer_set(tmp_path / "set", members, model_type="gpt2", n_layers=N_LAYERS)
    config, transcoders = circuit_tracer_load(tmp_path / "set")

    assert {key: config[key] for key in ("model_kind", "model_name", "feature_input_hook", "feature_output_hook",
                                         "activation", "k")} == {
        "model_kind": "transcoder_set", "model_name": "tiny-gpt2", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out", "activation": "topk", "k": K}
    x = torch.randn(256, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for member, module in zip(sorted(members, key=lambda member: member.layer), transcoders):
        assert module.W_enc.shape == module.W_dec.shape == (N_LATENTS + K, D)
        assert (module.W_skip is not None) == skip
        pre = x @ member.tensors["encoder.weight"].double().T + member.tensors["encoder.bias"].double()
        assert ((pre > 0).sum(dim=1) < K).any()  # rows where a TopK without ReLU would differ
        expected = our_prediction(member, x)
        torch.testing.assert_close(module.double()(x), expected, rtol=0, atol=1e-12)


def test_circuit_tracer_files_hold_our_tensors_and_read_lazily(tmp_path):
    """Tensors cross bit for bit (the appended latents are zero), and the lazy decoder's get_slice reads rows
    (single_layer_transcoder.py _get_decoder_vectors)."""
    members = [random_transcoder(layer, True, seed=layer) for layer in range(2)]
    write_circuit_tracer_set(tmp_path / "set", members, model_type="gpt2")
    with safe_open(str(tmp_path / "set" / LAYER_FILE.format(1)), framework="pt", device="cpu") as file:
        assert set(file.keys()) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
        assert torch.equal(file.get_tensor("W_enc")[:N_LATENTS], members[1].tensors["encoder.weight"])
        assert not file.get_tensor("W_enc")[N_LATENTS:].any() and not file.get_tensor("b_enc")[N_LATENTS:].any()
        assert torch.equal(file.get_tensor("W_skip"), members[1].tensors["W_skip"])
        assert torch.equal(file.get_slice("W_dec")[torch.tensor([3, 5])], members[1].tensors["W_dec"][[3, 5]])


@pytest.mark.parametrize("hookpoint, model_type, layer", [
    ("transformer.h.3.mlp", "gpt2", 3), ("gpt_neox.layers.0.mlp", "gpt_neox", 0),
    ("model.layers.11.mlp", "llama", 11), ("model.layers.2.mlp", "gemma2", 2)])
def test_feature_hooks_of_mlp_hookpoints(hookpoint, model_type, layer):
    assert feature_hooks("src", hookpoint, model_type) == (layer, "mlp.hook_in", "mlp.hook_out")


@pytest.mark.parametrize("hookpoint, model_type, match", [
    ("transformer.h.3.mlp", None, "config.json is not here"),
    ("transformer.h.3.mlp", "bloom", "model_type 'bloom'"),
    ("transformer.h.3", "gpt2", "no MLP known here"),
    (None, "gpt2", "no hookpoint recorded")])
def test_feature_hooks_refuse_what_is_not_known(hookpoint, model_type, match):
    with pytest.raises(UsageError, match=match) as error:
        feature_hooks("runs/tc", hookpoint, model_type)
    assert "\n" not in str(error.value) and "runs/tc" in str(error.value)


def _replaced(member: LayerTranscoder, **changes) -> LayerTranscoder:
    cfg = dataclasses.replace(member.cfg, **{key: value for key, value in changes.items() if key != "provenance"})
    return member._replace(cfg=cfg, provenance=changes.get("provenance", member.provenance))


@pytest.mark.parametrize("change, n_layers, match", [
    (lambda members: members[:1] + members[2:], None, r"got layers \[0, 2\]"),
    (lambda members: members, 4, "all 4 layers of the LM"),
    (lambda members: members[:2] + [_replaced(members[2], k=3)], None, "k 3 but runs/tc/layer0 has 4"),
    (lambda members: members[:2] + [_replaced(members[2], transcode=False)], None, "an SAE"),
    (lambda members: members[:2] + [_replaced(members[2], provenance={"hookpoint": "transformer.h.1.mlp",
                                                                      "model": "tiny-gpt2"})], None,
     "given as layer 2's transcoder, but its hookpoint 'transformer.h.1.mlp' is layer 1's MLP"),
    (lambda members: members[:2] + members[:1], None, r"got layers \[0, 0, 1\]"),
    (lambda members: members[:2] + [_replaced(members[2], provenance={"hookpoint": "transformer.h.2.mlp"})], None,
     "a transcoder set is of one LM")])
def test_circuit_tracer_set_refusals(tmp_path, change, n_layers, match):
    members = change([random_transcoder(layer, False, seed=layer) for layer in range(N_LAYERS)])
    with pytest.raises(UsageError, match=match) as error:
        write_circuit_tracer_set(tmp_path / "set", members, model_type="gpt2", n_layers=n_layers)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "set").exists()


# --- SAELens ---

def test_saelens_refuses_transcoders_in_one_line(tmp_path):
    member = random_transcoder(0, True, seed=0)
    reason = saelens_transcoder_refusal(member.cfg)
    assert "\n" not in reason and "no TopK transcoder" in reason and "skip transcoder" in reason
    with pytest.raises(UsageError, match="no TopK transcoder"):
        write_saelens_folder(tmp_path / "out", member.cfg, member.tensors, "none", member.provenance, {})
    assert not (tmp_path / "out").exists()


def test_installed_saelens_has_no_topk_transcoder():
    """The refusal's claim, on the installed sae_lens: its transcoder architectures are the ones named, none
    has a k, and each keeps every latent whose pre-activation is positive (so none keeps only the top k)."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.registry import SAE_CLASS_REGISTRY
    from sae_lens.saes.transcoder import Transcoder

    transcoders = {name: entry for name, entry in SAE_CLASS_REGISTRY.items()
                   if issubclass(entry[0], Transcoder) or "transcoder" in name}
    assert sorted(transcoders) == sorted(TRANSCODER_ARCHITECTURES), sae_lens.__version__
    for name, (sae_class, config_class) in transcoders.items():
        assert "k" not in {field.name for field in dataclasses.fields(config_class)}, name
        sae = sae_class(config_class(d_in=D, d_sae=N_LATENTS, d_out=D, apply_b_dec_to_input=False))
        with torch.no_grad():
            sae.W_enc.fill_(0.1)
            sae.b_enc.fill_(1.0)
        acts = sae.encode(torch.ones(2, D))
        assert (acts > 0).all(), name  # all 16 latents fire: no top-k selection
