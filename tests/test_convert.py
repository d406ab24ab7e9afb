"""sae/convert.py and sae/formats/: SAEs crossing to SAELens and sparsify and back bit for bit, and the
SAEs of SAELens, OpenAI and dictionary_learning, each written in its tool's exact layout here, loading
with the source tool's outputs (the tool itself where installed, else a float64 reference of its
published forward) or refused with the reason."""

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch


from sae import SaeConfig, SparseAutoencoder  # noqa: E402
from sae.convert import TARGETS, convert, main  # noqa: E402
from sae.errors import UsageError, UserError  # noqa: E402
from sae.formats.hook_names import saelens_hook  # noqa: E402
from sae.folder import read_any_sae_metadata  # noqa: E402
from test_model import corrupt_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(16, 64, 4), (13, 40, 7)]  # (d_in, n_latents, k); the second odd-sized


def random_sae(d_in: int, n_latents: int, k: int, input_norm: str = "none", seed: int = 0) -> SparseAutoencoder:
    """Every parameter random (decoder rows of norms 0.5 to 1.5), so every term of the math counts."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, n_latents=n_latents, k=k), input_norm=input_norm)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
        sae.W_dec.mul_(torch.empty(n_latents, 1).uniform_(0.5, 1.5) / sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def activations(n: int, d_in: int, seed: int = 1) -> torch.Tensor:
    """Raw activations with a per-token offset and scale, so a LayerNorm of the input changes them."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=generator) * 3 + torch.randn(n, 1, generator=generator) * 2
            + 1).float()


def dense(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """(N, n_latents) codes from top-k (values, indices), both (N, k)."""
    return torch.zeros(len(values), n_latents, dtype=torch.float64).scatter(1, indices, values.double())


def assert_same_tensors(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert tensor.dtype == b.state_dict()[name].dtype and torch.equal(tensor, b.state_dict()[name]), name


def cfg_json(folder: Path) -> dict:
    return json.loads((folder / "cfg.json").read_text())


# ---- ours -> SAELens / sparsify -> ours ---------------------------------------------------------------


@pytest.mark.parametrize("input_norm", ["none", "layer_norm"])
@pytest.mark.parametrize("d_in,n_latents,k", SHAPES)
def test_ours_to_saelens_loads_there_with_our_outputs_and_back_bit_for_bit(tmp_path, d_in, n_latents, k, input_norm):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.topk_sae import TopKSAE

    original = random_sae(d_in, n_latents, k, input_norm)
    original.save(tmp_path / "ours", metadata={"model": "gpt2", "hookpoint": "transformer.h.3", "tokens_trained": 7})
    ours = SparseAutoencoder.load(tmp_path / "ours")
    assert ours.input_norm == input_norm and ("input_norm" in cfg_json(tmp_path / "ours")) == (input_norm != "none")

    convert(tmp_path / "ours", tmp_path / "saelens", "saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "saelens")  # the plain call, no converter
    assert type(theirs) is TopKSAE and theirs.cfg.normalize_activations == input_norm
    assert theirs.cfg.metadata.model_name == "gpt2"
    x = activations(80, d_in)
    with torch.no_grad():
        x_hat, values, indices = ours.reconstruct(x)
        codes = dense(values, indices, n_latents)
        their_codes = theirs.encode(x).double()  # in SAELens encode keeps the LayerNorm statistics for decode
        their_x_hat = theirs.decode(theirs.encode(x))
        torch.testing.assert_close(codes, their_codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_hat, their_x_hat, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x_hat, theirs(x), rtol=1e-5, atol=1e-4)
    assert (codes > 0).sum() > len(x)  # not a comparison of zeros

    assert_same_tensors(SparseAutoencoder.load(tmp_path / "saelens"), ours)  # load reads SAELens folders directly
    convert(tmp_path / "saelens", tmp_path / "back", "ours")
    assert_same_tensors(SparseAutoencoder.load(tmp_path / "back"), ours)
    assert SparseAutoencoder.load(tmp_path / "back").input_norm == input_norm
    assert cfg_json(tmp_path / "back") == cfg_json(tmp_path / "ours")  # provenance and training fields too


def test_ours_to_sparsify_loads_there_and_back_bit_for_bit(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    random_sae(16, 64, 4).save(tmp_path / "ours", input_scale=2.5, metadata={"model": "gpt2"})
    ours = SparseAutoencoder.load(tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "sparsify", "sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sparsify")
    x = activations(64, 16)
    with torch.no_grad():
        their_values, their_indices, _ = theirs.encode(x)
        x_hat, values, indices = ours.reconstruct(x)
        torch.testing.assert_close(dense(values, indices, 64), dense(their_values, their_indices, 64),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(x_hat, theirs.decode(their_values, their_indices), rtol=1e-5, atol=1e-4)
    convert(tmp_path / "sparsify", tmp_path / "back", "ours")
    assert_same_tensors(SparseAutoencoder.load(tmp_path / "back"), ours)
    assert cfg_json(tmp_path / "back") == cfg_json(tmp_path / "ours")


def test_sparsify_target_refuses_an_input_transform_and_writes_nothing(tmp_path):
    random_sae(16, 64, 4, "layer_norm").save(tmp_path / "ours")
    with pytest.raises(UsageError, match="sparsify has no input transform"):
        convert(tmp_path / "ours", tmp_path / "out" / "sparsify", "sparsify")
    assert list((tmp_path / "out").iterdir()) == []  # no DST, no half-written temporary folder


def test_an_input_transform_is_for_evaluation_only():
    sae = random_sae(16, 64, 4, "layer_norm")
    x = activations(8, 16)
    values, indices = sae.encode(x)
    with pytest.raises(ValueError, match="use reconstruct"):
        sae.decode(values, indices)
    with pytest.raises(ValueError, match="training it is not supported"):
        sae(x)
    with pytest.raises(ValueError, match="cannot fold an input scale"):
        sae.folded(2.0)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        SparseAutoencoder(SaeConfig(d_in=4, n_latents=8, k=2), input_norm="rms")


# ---- SAELens folders ------------------------------------------------------------------------------------


def saelens_folder(path: Path, d_in: int, d_sae: int, k: int, **cfg_kwargs) -> "torch.nn.Module":
    """SAELens's own TopKSAE with every parameter random (decoder rows of various norms), saved by its save_model."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(2)
    theirs = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg_kwargs))
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_()
        theirs.W_dec.mul_(torch.empty(d_sae, 1).uniform_(0.3, 2.0))
    theirs.save_model(path)
    return theirs


@pytest.mark.parametrize("cfg_kwargs", [
    {},
    dict(rescale_acts_by_decoder_norm=True),
    dict(apply_b_dec_to_input=False),
    dict(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False, normalize_activations="layer_norm"),
])
def test_saelens_topk_folder_loads_with_saelens_outputs(tmp_path, cfg_kwargs):
    pytest.importorskip("sae_lens")
    theirs = saelens_folder(tmp_path / "theirs", 13, 40, 6, **cfg_kwargs)
    ours = SparseAutoencoder.load(tmp_path / "theirs")
    assert ours.input_norm == cfg_kwargs.get("normalize_activations", "none")
    x = activations(96, 13)
    with torch.no_grad():
        their_codes = theirs.encode(x).double()
        their_x_hat = theirs.decode(theirs.encode(x))
        x_hat, values, indices = ours.reconstruct(x)
    torch.testing.assert_close(dense(values, indices, 40), their_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, their_x_hat, rtol=1e-5, atol=1e-4)
    assert (their_codes > 0).sum() > len(x)


@pytest.mark.parametrize("edit,message", [
    (dict(architecture="standard"), "cannot load 'architecture': \"standard\""),
    (dict(architecture=None), "no 'architecture' key, so a SAELens < 6 config"),  # None: drop the key
    (dict(normalize_activations="expected_average_only_in"), "cannot load 'normalize_activations'"),
    (dict(normalize_activations="constant_norm_rescale"), "cannot load 'normalize_activations'"),
    (dict(reshape_activations="hook_z"), "cannot load 'reshape_activations'"),
    (dict(dtype="int8"), "'dtype' must be one of"),
    (dict(d_sae=41), "'W_enc' has shape"),
    (dict(k=41), "k=41 exceeds n_latents=40"),
    (dict(apply_b_dec_to_input=1), "'apply_b_dec_to_input' must be true or false"),
])
def test_saelens_folder_other_math_is_refused_naming_the_key(tmp_path, edit, message):
    pytest.importorskip("sae_lens")
    saelens_folder(tmp_path / "theirs", 13, 40, 6)
    cfg = {**cfg_json(tmp_path / "theirs"), **edit}
    (tmp_path / "theirs" / "cfg.json").write_text(json.dumps({key: value for key, value in cfg.items() if value is not None}))
    with pytest.raises(UsageError, match=message):
        SparseAutoencoder.load(tmp_path / "theirs")


def test_saelens_other_architecture_and_missing_tensors_are_refused(tmp_path):
    pytest.importorskip("sae_lens")
    from safetensors.torch import load_file, save_file
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=16)).save_model(tmp_path / "jumprelu")
    with pytest.raises(UsageError, match="cannot load 'architecture': \"jumprelu\""):
        SparseAutoencoder.load(tmp_path / "jumprelu")
    saelens_folder(tmp_path / "topk", 8, 16, 2)
    weights = load_file(tmp_path / "topk" / "sae_weights.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if name != "b_enc"}, tmp_path / "topk" / "sae_weights.safetensors")
    with pytest.raises(UsageError, match=r"missing keys \['b_enc'\]"):
        SparseAutoencoder.load(tmp_path / "topk")


# ---- OpenAI state dicts -------------------------------------------------------------------------------


def openai_state_dict(d_in: int, n_latents: int, k: int, tied: bool = False, postact_fn: str = "ReLU",
                      own_activation_keys: bool = True) -> OrderedDict:
    """What OpenAI's `Autoencoder(n_latents, d_in, TopK(k), tied, normalize=True).state_dict()` holds
    (sparse_autoencoder/model.py), every parameter random: its parameters, then buffers, then the
    submodules' entries (TopK's state_dict adds activation.k and activation.postact_fn), then the two
    entries its own state_dict adds."""
    generator = torch.Generator().manual_seed(3)
    encoder = torch.randn(n_latents, d_in, generator=generator)
    state = OrderedDict(
        pre_bias=torch.randn(d_in, generator=generator) * 0.3,
        latent_bias=torch.randn(n_latents, generator=generator) * 0.3,
        stats_last_nonzero=torch.randint(0, 100, (n_latents,), generator=generator),
        latents_activation_frequency=torch.rand(n_latents, generator=generator),
        latents_mean_square=torch.rand(n_latents, generator=generator),
    )
    state["encoder.weight"] = encoder
    if own_activation_keys:
        state["activation.k"], state["activation.postact_fn"] = k, postact_fn
    if tied:
        state["decoder.linear.weight"] = encoder
    else:
        decoder = torch.randn(d_in, n_latents, generator=generator)
        state["decoder.weight"] = decoder / decoder.norm(dim=0)  # unit-norm columns, as OpenAI trains them
    state["activation"] = "TopK"
    state["activation_state_dict"] = OrderedDict(k=k, postact_fn=postact_fn)
    return state


def openai_reference(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's forward in float64, from their model.py: LN, pre = encoder(x_n - pre_bias) + latent_bias,
    TopK (ReLU of the top k), recons = decoder(latents) + pre_bias, times std plus mu. (latents, recons)."""
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    x_n = (x - mu) / (std + 1e-5)
    W_enc = state["encoder.weight"].double()
    W_dec_t = W_enc.T if "decoder.linear.weight" in state else state["decoder.weight"].double()  # (d_in, n)
    pre = (x_n - state["pre_bias"].double()) @ W_enc.T + state["latent_bias"].double()
    top = pre.topk(state["activation_state_dict"]["k"], dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recons = latents @ W_dec_t.T + state["pre_bias"].double()
    return latents, recons * std + mu


@pytest.mark.parametrize("tied,own_activation_keys", [(False, True), (False, False), (True, True)])
def test_openai_state_dict_loads_with_openai_outputs(tmp_path, tied, own_activation_keys):
    state = openai_state_dict(24, 96, 5, tied=tied, own_activation_keys=own_activation_keys)
    torch.save(state, tmp_path / "v5_32k_layer_6.pt")
    ours = SparseAutoencoder.load(tmp_path / "v5_32k_layer_6.pt")
    assert (ours.cfg.d_in, ours.cfg.n_latents, ours.cfg.k, ours.input_norm) == (24, 96, 5, "layer_norm")
    x = activations(128, 24)
    x[:16] *= 1e-4  # tokens of std ~3e-4, where LN's eps of 1e-5 counts
    latents, recons = openai_reference(state, x)
    with torch.no_grad():
        x_hat, values, indices = ours.reconstruct(x)
        assert torch.equal(ours.encode(x)[0], values)
    torch.testing.assert_close(dense(values, indices, 96), latents, rtol=1e-5, atol=1e-5)
    # Compared in each token's normalised units: the small tokens' errors count as much as the others'.
    std = x.double().std(-1, keepdim=True)
    torch.testing.assert_close((x_hat.double() - recons) / std, torch.zeros_like(recons), rtol=0, atol=1e-4)
    # The LayerNorm matters here: without it the latents are others.
    raw_values, raw_indices = ours._encode_normalized(x)
    assert (dense(raw_values, raw_indices, 96) - latents).abs().max() > 0.1


def test_openai_sae_converted_to_saelens_keeps_its_layer_norm(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    state = openai_state_dict(24, 96, 5)
    torch.save(state, tmp_path / "openai.pt")
    main([str(tmp_path / "openai.pt"), str(tmp_path / "saelens"), "--to", "saelens", "--model", "gpt2",
          "--hookpoint", "transformer.h.6"])
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "saelens")
    x = activations(128, 24)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).double(), openai_reference(state, x)[1], rtol=1e-5, atol=1e-4)
    main([str(tmp_path / "saelens"), str(tmp_path / "ours"), "--to", "ours"])
    metadata = cfg_json(tmp_path / "ours")
    assert (metadata["input_norm"], metadata["model"], metadata["hookpoint"]) == ("layer_norm", "gpt2", "transformer.h.6")
    assert metadata["converted_from"] == {"format": "openai", "path": str(tmp_path / "openai.pt")}


class NotATensor:
    """A Python object inside a torch file: weights_only loading must refuse it, never unpickle it."""


@pytest.mark.parametrize("edit,message", [
    (dict(activation=None, activation_state_dict=None), "cannot load activation 'ReLU'"),  # a ReLU autoencoder
    (dict(postact_fn="Identity"), "cannot load postact_fn 'Identity'"),
    (dict(extra=torch.zeros(3)), r"unexpected keys \['extra'\]"),
    (dict(latent_bias=torch.zeros(95)), r"'latent_bias' has shape \(95,\), expected \(96,\)"),
    (dict(**{"decoder.weight": torch.zeros(96, 24)}), r"'decoder.weight' has shape \(96, 24\), expected \(24, 96\)"),
    (dict(pre_bias=torch.zeros(24, dtype=torch.float64)), "several dtypes"),
    (dict(**{"activation.k": 6}), "'activation.k' is 6, 'activation_state_dict' says 5"),
    (dict(extra=NotATensor()), "holds Python objects other than tensors.*NotATensor.*never a full unpickle"),
])
def test_openai_state_dict_other_math_or_layout_is_refused(tmp_path, edit, message):
    state = openai_state_dict(24, 96, 5, postact_fn=edit.pop("postact_fn", "ReLU"))
    for key, value in edit.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    torch.save(state, tmp_path / "sae.pt")
    with pytest.raises(UsageError, match=message):
        SparseAutoencoder.load(tmp_path / "sae.pt")


# ---- dictionary_learning ae.pt ------------------------------------------------------------------------


def dictionary_learning_folder(path: Path, d_in: int, dict_size: int, k: int, dict_class: str = "AutoEncoderTopK",
                               config_k: int | None = None) -> OrderedDict:
    """What dictionary_learning's trainSAE saves for an AutoEncoderTopK: ae.pt (its state_dict: b_dec,
    the k and threshold buffers, decoder.weight (d_in, dict_size), encoder.weight, encoder.bias), every
    parameter random, and config.json."""
    generator = torch.Generator().manual_seed(4)
    decoder = torch.randn(d_in, dict_size, generator=generator)
    state = OrderedDict(b_dec=torch.randn(d_in, generator=generator) * 0.3, k=torch.tensor(k, dtype=torch.int),
                        threshold=torch.tensor(0.7))
    state["decoder.weight"] = decoder / decoder.norm(dim=0)
    state["encoder.weight"] = torch.randn(dict_size, d_in, generator=generator)
    state["encoder.bias"] = torch.randn(dict_size, generator=generator) * 0.3
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    trainer = {"trainer_class": "TopKTrainer", "dict_class": dict_class, "activation_dim": d_in, "dict_size": dict_size,
               "k": k if config_k is None else config_k, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3,
               "submodule_name": "resid_post_layer_3"}
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": d_in}}, indent=4))
    return state


def dictionary_learning_reference(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoEncoderTopK's forward in float64 (trainers/top_k.py, encode without the threshold): the top k
    of ReLU(encoder(x - b_dec)), decoder(f) + b_dec. (codes, x_hat)."""
    x = x.double()
    pre = ((x - state["b_dec"].double()) @ state["encoder.weight"].double().T + state["encoder.bias"].double()).relu()
    top = pre.topk(int(state["k"]), dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return codes, codes @ state["decoder.weight"].double().T + state["b_dec"].double()


@pytest.mark.parametrize("as_file", [False, True])
def test_dictionary_learning_topk_loads_with_its_outputs(tmp_path, as_file):
    state = dictionary_learning_folder(tmp_path / "trainer_0", 13, 52, 6)
    ours = SparseAutoencoder.load(tmp_path / "trainer_0" / "ae.pt" if as_file else tmp_path / "trainer_0")
    assert (ours.cfg.d_in, ours.cfg.n_latents, ours.cfg.k, ours.input_norm) == (13, 52, 6, "none")
    x = activations(96, 13)
    codes, x_hat_reference = dictionary_learning_reference(state, x)
    with torch.no_grad():
        x_hat, values, indices = ours.reconstruct(x)
    torch.testing.assert_close(dense(values, indices, 52), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_reference, rtol=1e-5, atol=1e-4)
    assert (codes > 0).sum() > len(x)

    convert(tmp_path / "trainer_0", tmp_path / "ours", "ours")
    assert cfg_json(tmp_path / "ours")["converted_from"] == {
        "format": "dictionary_learning", "path": str(tmp_path / "trainer_0" / "ae.pt"),
        "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, "submodule_name": "resid_post_layer_3"}


def test_dictionary_learning_other_dictionaries_are_refused(tmp_path):
    dictionary_learning_folder(tmp_path / "batch", 8, 32, 4, dict_class="BatchTopKSAE")
    with pytest.raises(UsageError, match="cannot load dict_class 'BatchTopKSAE'"):
        SparseAutoencoder.load(tmp_path / "batch")
    dictionary_learning_folder(tmp_path / "k", 8, 32, 4, config_k=5)
    with pytest.raises(UsageError, match="the buffer k is 4, .*config.json says k=5"):
        SparseAutoencoder.load(tmp_path / "k")
    state = dictionary_learning_folder(tmp_path / "alone", 8, 32, 4)
    (tmp_path / "alone" / "config.json").unlink()
    with pytest.raises(UsageError, match="config.json not found: without it an AutoEncoderTopK cannot be told"):
        SparseAutoencoder.load(tmp_path / "alone")
    backup = tmp_path / "backup"
    dictionary_learning_folder(backup, 8, 32, 4)
    torch.save({"step": 10, "ae": state, "optimizer": {"state": {}}, "config": {}, "norm_factor": 1.5}, backup / "ae.pt")
    with pytest.raises(UsageError, match="a training backup"):
        SparseAutoencoder.load(backup)


# ---- hook_name of a SAELens export -------------------------------------------------------------------


def lm_folder(path: Path, model_type: str) -> Path:
    """An LM folder as far as the export reads it: its config.json's model_type (the LM's family)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


@pytest.mark.parametrize("model_type,hookpoint,hook_name", [
    ("gpt2", "transformer.h.3", "blocks.3.hook_resid_post"),
    ("gpt2", "transformer.h.3.mlp", "blocks.3.hook_mlp_out"),
    ("gpt2", "transformer.h.3.attn", "blocks.3.hook_attn_out"),
    ("gpt_neox", "gpt_neox.layers.1", "blocks.1.hook_resid_post"),
    ("gpt_neox", "gpt_neox.layers.1.attention", "blocks.1.hook_attn_out"),
    ("llama", "model.layers.10", "blocks.10.hook_resid_post"),
    ("qwen2", "model.layers.2.mlp", "blocks.2.hook_mlp_out"),
    ("phi3", "model.layers.2.self_attn", "blocks.2.hook_attn_out"),
    ("gemma2", "model.layers.2", "blocks.2.hook_resid_post"),
    # no TransformerLens hook holds these: Gemma 2 norms the MLP's output before adding it; an activation inside
    ("gemma2", "model.layers.2.mlp", None),
    ("llama", "model.layers.2.mlp.act_fn", None),
    ("bloom", "transformer.h.3.mlp", None),
])
def test_saelens_hook_name_is_the_transformer_lens_hook_where_known(tmp_path, model_type, hookpoint, hook_name):
    # (the known ones checked against TransformerLens itself: HookedTransformer with converted GPT-2, Pythia
    # and Llama weights and center_writing_weights=False gives the same activations to 1e-7)
    hook, note = saelens_hook({"model": str(lm_folder(tmp_path / "lm", model_type)), "hookpoint": hookpoint})
    if hook_name:
        assert note is None and hook == {"hook_name": hook_name, "model_class_name": "HookedTransformer",
                                         "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    else:
        assert hook == {"hook_name": hookpoint, "model_class_name": "AutoModelForCausalLM"}
        assert f"'{hookpoint}' is our hookpoint, a Hugging Face module name" in note and model_type in note


def test_saelens_export_records_the_hook_name_and_loads_there(tmp_path, capsys):
    sae_lens = pytest.importorskip("sae_lens")
    lm = lm_folder(tmp_path / "lm", "llama")
    random_sae(16, 64, 4).save(tmp_path / "ours", metadata={"model": str(lm), "hookpoint": "model.layers.2"})
    main([str(tmp_path / "ours"), str(tmp_path / "resid"), "--to", "saelens"])
    assert "note:" not in capsys.readouterr().out
    metadata = sae_lens.SAE.load_from_disk(tmp_path / "resid").cfg.metadata  # (it warns: load the LM unprocessed)
    assert (metadata.hook_name, metadata.model_class_name) == ("blocks.2.hook_resid_post", "HookedTransformer")
    assert metadata.model_from_pretrained_kwargs == {"center_writing_weights": False}
    convert(tmp_path / "resid", tmp_path / "back", "ours")
    assert cfg_json(tmp_path / "back") == cfg_json(tmp_path / "ours")

    # the hub name of an LM not in the local cache: its family is unknown, and so is a sublayer's hook
    main([str(tmp_path / "ours"), str(tmp_path / "mlp"), "--to", "saelens", "--model", "org/not-here",
          "--hookpoint", "model.layers.2.mlp"])
    note, wrote = capsys.readouterr().out.strip().splitlines()
    assert note == ("note: SAELens hook_name 'model.layers.2.mlp' is our hookpoint, a Hugging Face module name: no "
                    "TransformerLens hook is known to hold its activations (the LM's config.json is not here to tell "
                    "its family); SAELens reads it with model_class_name AutoModelForCausalLM")
    metadata = sae_lens.SAE.load_from_disk(tmp_path / "mlp").cfg.metadata
    assert (metadata.hook_name, metadata.model_class_name) == ("model.layers.2.mlp", "AutoModelForCausalLM")


def test_our_record_in_a_saelens_export_is_type_checked_too(tmp_path):
    random_sae(16, 64, 4).save(tmp_path / "ours", metadata={"model": "gpt2", "hookpoint": "transformer.h.1", "ctx_len": 64})
    convert(tmp_path / "ours", tmp_path / "saelens", "saelens")
    cfg_path = tmp_path / "saelens" / "cfg.json"
    config = json.loads(cfg_path.read_text())
    config["metadata"]["topk_sae"]["ctx_len"] = "64"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=rf"^{cfg_path}: metadata.topk_sae: 'ctx_len' must be an integer or null, "
                                         r'found "64" \(a string\)$'):
        read_any_sae_metadata(tmp_path / "saelens")


def test_convert_refuses_nan_weights_in_one_line_and_writes_nothing(tmp_path):
    random_sae(16, 64, 4).save(tmp_path / "ours")
    corrupt_weights(tmp_path / "ours" / "sae.safetensors", "encoder.bias", 3)
    for to in TARGETS:
        with pytest.raises(UserError, match=r"sae.safetensors: non-finite values \(NaN or inf\) in the SAE's weights: "
                                            r"'encoder.bias' 3 of 64;"):
            main([str(tmp_path / "ours"), str(tmp_path / f"as-{to}"), "--to", to])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]

    # another tool's file: the same check, in this SAE's parameter names
    torch.save({**openai_state_dict(8, 32, 4), "latent_bias": torch.full((32,), float("inf"))}, tmp_path / "openai.pt")
    with pytest.raises(UserError, match=r"openai.pt: non-finite .* 'encoder.bias' 32 of 32 \(named as this SAE's"):
        SparseAutoencoder.load(tmp_path / "openai.pt")


# ---- unknown layouts and the command line -------------------------------------------------------------


def test_unknown_layouts_are_named_with_the_known_ones(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UsageError, match=r"no SAE layout known here \(found: weights.bin\); known layouts: ours/sparsify"):
        SparseAutoencoder.load(tmp_path / "folder")
    torch.save({"W": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match=r"a state dict with keys \['W'\], in no known layout; known layouts: .*SAELens"):
        SparseAutoencoder.load(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="not a torch file"):
        SparseAutoencoder.load(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError, match="does not exist.*cfg.json"):
        SparseAutoencoder.load(tmp_path / "missing")
    random_sae(4, 8, 2).save(tmp_path / "ours")
    cfg = cfg_json(tmp_path / "ours")
    (tmp_path / "ours" / "cfg.json").write_text(json.dumps({**cfg, "input_norm": "rms"}))
    with pytest.raises(UsageError, match="'input_norm' must be one of"):
        SparseAutoencoder.load(tmp_path / "ours")


def run_convert(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae.convert", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_command_line_converts_and_refuses_in_one_line_without_overwriting(tmp_path):
    random_sae(16, 64, 4).save(tmp_path / "ours")
    done = run_convert(tmp_path / "ours", tmp_path / "saelens", "--to", "saelens")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [
        "note: no hookpoint recorded, so SAELens's hook_name is left unset (pass --hookpoint to record one)",
        f"wrote {tmp_path / 'saelens'} from {tmp_path / 'ours'}; load it with "
        f"sae_lens.SAE.load_from_disk('{tmp_path / 'saelens'}')"]
    assert sorted(p.name for p in (tmp_path / "saelens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]

    before = {p.name: p.read_bytes() for p in (tmp_path / "saelens").iterdir()}
    refused = run_convert(tmp_path / "ours", tmp_path / "saelens", "--to", "sparsify")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [f"error: {tmp_path / 'saelens'} already exists; converting never "
                                                   "overwrites: remove it or choose another DST"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "saelens").iterdir()} == before

    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--to", "ours"])
    with pytest.raises(SystemExit) as stop:  # argparse: usage line and status 2
        main([str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "neuronpedia"])
    assert stop.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "saelens"]
