"""Transcoders and skip transcoders (`SaeConfig.transcode`, `skip_connection`): the forward and its gradients
against a float64 dense reference, the init, the exact folding of two scales, the folder in sparsify's layout
(sparsify loads ours, we load sparsify's, equal outputs), and train.py's `train` reading a module's input and
output from one LM forward, resuming bit for bit."""

from functools import partial
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from sae import SparseAutoencoder
from sae.config import SaeConfig, TrainConfig
from sae.initialization import ENCODER_SCALE_FLOOR, initialize_transcoder_from_batch
from sae.trainer import train
from tiny_runs import tiny_run_config, train_whole_and_resumed


F64 = torch.float64


def random_transcoder(skip: bool, d_in=12, n_latents=40, k=5, seed=0) -> SparseAutoencoder:
    """A transcoder with every parameter random, so every term of the math counts."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, n_latents=n_latents, k=k, transcode=True, skip_connection=skip), dtype=F64)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
    return sae


def dense_reference(sae: SparseAutoencoder, x, y):
    """(prediction, fvu, codes) in float64 from the parameters, with no kernel: pre = W_enc x + b_enc, the
    top k, ReLU, y_hat = codes W_dec + b_dec (+ x W_skip^T)."""
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    top = pre.topk(sae.cfg.k, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    y_hat = codes @ sae.W_dec + sae.b_dec
    if sae.W_skip is not None:
        y_hat = y_hat + x @ sae.W_skip.T
    fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    return y_hat, fvu, codes


@pytest.mark.parametrize("skip", [False, True])
def test_forward_and_gradients_equal_a_float64_dense_reference(skip):
    sae = random_transcoder(skip)
    reference = random_transcoder(skip)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(33, 12, dtype=F64, generator=generator) * 2 + 1
    y = torch.randn(33, 12, dtype=F64, generator=generator) * 3 - 1

    out = sae(x, target=y)
    y_hat, fvu, codes = dense_reference(reference, x, y)
    torch.testing.assert_close(out.x_hat, y_hat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-10, atol=1e-10)
    got_codes = torch.zeros_like(codes).scatter(1, out.latent_indices, out.latent_acts)
    torch.testing.assert_close(got_codes, codes, rtol=1e-10, atol=1e-10)
    # the encoder does not subtract b_dec: shifting b_dec moves the prediction by exactly the shift
    assert torch.equal(sae.encode(x)[1].sort(1).values, codes.topk(5, dim=1).indices.sort(1).values)

    out.fvu.backward()
    fvu.backward()
    for (name, parameter), theirs in zip(sae.named_parameters(), reference.parameters()):
        assert parameter.grad is not None and theirs.grad is not None, name
        torch.testing.assert_close(parameter.grad, theirs.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert (sae.W_skip is not None) == skip


def test_an_sae_and_a_transcoder_refuse_the_wrong_forward():
    x = torch.randn(4, 12, dtype=F64)
    with pytest.raises(ValueError, match="needs the module's output"):
        random_transcoder(True)(x)
    with pytest.raises(ValueError, match="no target"):
        SparseAutoencoder(SaeConfig(d_in=12, n_latents=40, k=5), dtype=F64)(x, target=x)


def test_a_fresh_transcoder_starts_tied_with_unit_rows_and_a_zero_skip():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=12, n_latents=40, k=5, transcode=True, skip_connection=True), dtype=F64)
    assert not sae.W_skip.any() and not sae.b_dec.any()
    torch.testing.assert_close(sae.W_dec, sae.encoder.weight)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=F64))


def test_sparsifys_transcoder_recipe_starts_with_a_zero_decoder():
    """normalize_decoder off: sparsify's transcoder, its decoder at zero and left unconstrained."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=12, n_latents=40, k=5, transcode=True, normalize_decoder=False), dtype=F64)
    assert not sae.W_dec.any()
    torch.testing.assert_close(sae.encoder.weight.norm(dim=1), torch.ones(40, dtype=F64))


def test_auxk_weight_defaults_by_kind_and_survives_the_folder(tmp_path):
    assert SaeConfig(d_in=4, n_latents=8, k=2).auxk_weight == 1 / 32
    assert SaeConfig(d_in=4, n_latents=8, k=2, transcode=True).auxk_weight == 1 / 8
    assert SaeConfig(d_in=4, n_latents=8, k=2, transcode=True, auxk_coef=0.0).auxk_weight == 0.0
    sae = SparseAutoencoder(SaeConfig(d_in=4, n_latents=8, k=2, transcode=True))
    sae.save(tmp_path / "tc")
    assert json.loads((tmp_path / "tc" / "cfg.json").read_text())["auxk_coef"] is None  # the kind's default
    assert SparseAutoencoder.load(tmp_path / "tc").cfg.auxk_weight == 1 / 8


@pytest.mark.parametrize("related", [True, False])
def test_the_first_batch_centres_every_latent_and_scales_the_encoder_to_start_no_worse_than_b_dec(related):
    """b_enc = -W_enc mean(s x): over the first batch each latent's pre-activation has mean 0, whatever the
    input's offset (an MLP's input is far from centred); b_dec is the scaled outputs' centre; the encoder is
    then scaled so that the first prediction is no worse than b_dec alone, both when the outputs follow the
    inputs and when they do not (then by the floor)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=12, n_latents=40, k=5, transcode=True), dtype=F64)
    inputs = torch.randn(500, 12, dtype=F64) * 3 + torch.linspace(-4, 9, 12, dtype=F64)
    targets = (inputs @ torch.randn(12, 12, dtype=F64) if related else torch.randn(500, 12, dtype=F64)) + 2
    input_scale, output_scale = initialize_transcoder_from_batch(sae, inputs, targets, b_dec_init="mean")
    x, y = inputs * input_scale, targets * output_scale
    pre = x @ sae.encoder.weight.T + sae.encoder.bias
    torch.testing.assert_close(pre.mean(0), torch.zeros(40, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.b_dec, y.mean(0))
    scale = sae.encoder.weight.norm(dim=1)  # the rows were unit vectors, and W_dec still is
    torch.testing.assert_close(scale, torch.full((40,), scale[0].item(), dtype=F64))
    assert (0.1 < scale[0] < 1) if related else scale[0] == ENCODER_SCALE_FLOOR
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=F64))
    y_hat = sae.reconstruct(x)[0]
    # unrelated: any factor > 0 is worse than b_dec alone; the floor's latents are small enough to cost little
    assert (y - y_hat).pow(2).sum() <= (1 if related else 1.01) * (y - sae.b_dec).pow(2).sum()


@pytest.mark.parametrize("skip", [False, True])
def test_two_scales_fold_exactly(skip, tmp_path):
    """Trained on s x to predict t y, the saved transcoder predicts y from x: f(s x) / t."""
    sae = random_transcoder(skip)
    s, t = 0.37, 2.9
    x = torch.randn(20, 12, dtype=F64)
    expected = sae.reconstruct(x * s)[0] / t
    torch.testing.assert_close(sae.folded(s, t).reconstruct(x)[0], expected, rtol=1e-10, atol=1e-10)
    loaded = SparseAutoencoder.load(sae.save(tmp_path / "tc", input_scale=s, output_scale=t))
    torch.testing.assert_close(loaded.reconstruct(x)[0], expected, rtol=1e-10, atol=1e-10)
    assert set(load_file(tmp_path / "tc" / "sae.safetensors")) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | (
        {"W_skip"} if skip else set())


@pytest.mark.parametrize("transcode, skip", [(True, False), (True, True), (False, True)])
def test_sparsify_loads_ours_and_we_load_sparsifys_with_equal_outputs(transcode, skip, tmp_path):
    """Transcoders with and without skip, and sparsify's SAE with a skip connection (which it allows)."""
    sparsify = pytest.importorskip("sparsify")
    sae = random_transcoder(skip).float()
    if not transcode:
        sae = SparseAutoencoder.from_state_dict(dataclasses.replace(sae.cfg, transcode=False), sae.state_dict())
    x = torch.randn(25, 12)
    ours_path = sae.save(tmp_path / "ours")
    theirs = sparsify.SparseCoder.load_from_disk(ours_path)
    assert theirs.cfg.transcode == transcode and theirs.cfg.skip_connection == skip
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        predicted = theirs.decode(top_acts, top_indices) + (x @ theirs.W_skip.mT if skip else 0)
    torch.testing.assert_close(sae.reconstruct(x)[0], predicted, rtol=1e-5, atol=1e-5)

    theirs.save_to_disk(tmp_path / "theirs")
    loaded = SparseAutoencoder.load(tmp_path / "theirs")
    assert loaded.cfg.transcode == transcode and loaded.cfg.skip_connection == skip
    torch.testing.assert_close(loaded.reconstruct(x)[0], predicted, rtol=1e-5, atol=1e-5)


def transcoder_run(tiny_lm_dir, text_file, tmp_path, run_name, max_tokens, **overrides) -> TrainConfig:
    sae = SaeConfig(n_latents=64, k=4, k_aux=16, dead_tokens=256, transcode=True, skip_connection=True)
    return tiny_run_config(tiny_lm_dir, text_file, tmp_path, run_name, max_tokens, sae, "transformer.h.1.mlp", **overrides)


def test_train_reads_the_module_input_and_output_and_resumes_bit_for_bit(tiny_lm_dir, text_file, tmp_path):
    whole = train_whole_and_resumed(partial(transcoder_run, tiny_lm_dir, text_file, tmp_path))

    # the saved transcoder predicts the MLP's output from its input, better than its mean does
    from sae.activations import capture_many, get_site, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_lm_dir))
    ids = torch.randint(0, 200, (4, 16))
    x, y = capture_many(model, [get_site(model, "transformer.h.1.mlp:input"), get_site(model, "transformer.h.1.mlp")], ids)
    sae = SparseAutoencoder.load(whole)
    assert sae.cfg.transcode and sae.W_skip is not None
    y_hat = sae.reconstruct(x.flatten(0, 1))[0]
    y = y.flatten(0, 1)
    assert ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item() < 1
    # the input site is the MLP's input: the block's second layer norm's output
    assert torch.equal(x, capture_many(model, [get_site(model, "transformer.h.1.ln_2")], ids)[0])
    # trained with unit-norm decoder rows: saved, each row is input_scale / output_scale long (`fold_scales`)
    scales = json.loads((whole / "cfg.json").read_text())
    expected = scales["input_scale_folded"] / scales["output_scale_folded"]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), expected), rtol=1e-5, atol=0)


def test_the_splice_of_a_perfect_transcoder_changes_nothing(tiny_lm_dir):
    """A skip transcoder that computes a linear module exactly (W_skip its weight, b_dec its bias, the sparse
    part zero) spliced in its place: fvu 0, delta CE 0, KL 0."""
    from eval.evaluate import evaluate
    from sae.activations import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_lm_dir))
    module = model.transformer.h[1].attn.c_proj  # GPT-2's Conv1D: y = x W + b, W (32, 32)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=16, k=2, transcode=True, skip_connection=True))
    with torch.no_grad():
        sae.W_skip.copy_(module.weight.T)
        sae.b_dec.copy_(module.bias)
        sae.W_dec.zero_()
    tokens = torch.randint(0, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    report = evaluate(sae, model, tokens, "transformer.h.1.attn.c_proj")
    assert report["fvu"] < 1e-10 and abs(report["delta_ce"]) < 1e-5 and abs(report["kl"]) < 1e-6, report
    # and a wrong one is seen as wrong
    with torch.no_grad():
        sae.W_skip.mul_(-1)
    report = evaluate(sae, model, tokens, "transformer.h.1.attn.c_proj")
    assert report["fvu"] > 1 and report["kl"] > 1e-4


def test_a_run_folder_of_transcoders_converts_to_a_circuit_tracer_set(tiny_lm_dir, tmp_path):
    import yaml
    from sae.convert import main as convert_main

    run = tmp_path / "run"
    for layer in range(3):  # the tiny LM's three MLPs
        random_transcoder(skip=True, d_in=32, n_latents=48, k=4, seed=layer).float().save(
            run / f"h{layer}", metadata={"model": str(tiny_lm_dir), "hookpoint": f"transformer.h.{layer}.mlp"})
    dst = convert_main([str(run), str(tmp_path / "set"), "--to", "circuit-tracer"])
    config = yaml.safe_load((dst / "config.yaml").read_text())
    assert (config["model_kind"], config["activation"], config["k"]) == ("transcoder_set", "topk", 4)
    assert sorted(path.name for path in dst.glob("layer_*.safetensors")) == [f"layer_{i}.safetensors" for i in range(3)]
    assert set(load_file(dst / "layer_1.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    # SAELens has no TopK transcoder: refused with the reason, nothing written
    from sae.errors import UsageError

    with pytest.raises(UsageError, match="no TopK transcoder"):
        convert_main([str(run / "h1"), str(tmp_path / "saelens"), "--to", "saelens"])
    assert not (tmp_path / "saelens").exists()


def test_training_evals_fold_both_scales(tiny_lm_dir, text_file, tmp_path):
    """The held-out eval during training scores the transcoder in raw units (both scales folded). (The eval's
    latent sections on a transcoder: tests/eval/test_transcoders.py.)"""
    from eval import training_evaluator

    cfg = transcoder_run(tiny_lm_dir, text_file, tmp_path, "evals", 64 * 6, eval_every=6, eval_tokens=512)
    folder = train(cfg, evaluator=training_evaluator)
    logged = [json.loads(line) for line in (folder.parent / "log.jsonl").read_text().splitlines()]
    fvu_during = [line["eval/fvu"] for line in logged if "eval/fvu" in line][-1]
    assert fvu_during < 1.5  # about 0.8; with the output scale left unfolded it is in the thousands


def test_an_sae_with_a_skip_connection_is_not_exported_to_saelens_without_it(tmp_path):
    from sae.convert import convert
    from sae.errors import UsageError

    SparseAutoencoder(SaeConfig(d_in=8, n_latents=16, k=2, skip_connection=True)).save(tmp_path / "skip")
    with pytest.raises(UsageError, match="no skip connection"):
        convert(tmp_path / "skip", tmp_path / "saelens", "saelens")
    assert not (tmp_path / "saelens").exists()


def test_a_run_mixing_an_sae_and_a_transcoder_trains_the_same_from_an_activation_cache(tiny_lm_dir, text_file, tmp_path):
    """The cache stores both ends of the transcoder's module (transformer.h.1.mlp:input and its output) next to
    the SAE's hookpoint; training from it equals streaming, bit for bit, for both members."""
    from sae.cache import build_cache
    from sae.cache.reader import ActivationCache
    from sae.config import SaeVariant

    variants = (SaeVariant(name="sae", hookpoint="transformer.h.1", transcode=False, skip_connection=False),
                SaeVariant(name="tc", hookpoint="transformer.h.1.mlp"))
    cfg = transcoder_run(tiny_lm_dir, text_file, tmp_path, "streamed", 64 * 6, save_every=0, variants=variants)
    assert cfg.hookpoints == ["transformer.h.1", "transformer.h.1.mlp:input", "transformer.h.1.mlp"]
    build_cache(cfg, tmp_path / "cache", progress=False)
    assert ActivationCache(tmp_path / "cache").hookpoints == cfg.hookpoints
    train(cfg)
    cached = dataclasses.replace(cfg, run_name="cached", data=dataclasses.replace(cfg.data, activation_cache=str(tmp_path / "cache")))
    train(cached)
    for name in ("sae", "tc"):
        streamed_weights = load_file(cfg.run_dir / name / "sae.safetensors")
        cached_weights = load_file(cached.run_dir / name / "sae.safetensors")
        assert streamed_weights.keys() == cached_weights.keys()
        for key, tensor in streamed_weights.items():
            assert torch.equal(cached_weights[key], tensor), (name, key)
    assert "W_skip" in load_file(cfg.run_dir / "tc" / "sae.safetensors")
    assert "W_skip" not in load_file(cfg.run_dir / "sae" / "sae.safetensors")
