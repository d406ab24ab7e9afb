"""BatchTopK (`SaeConfig.activation = "batchtopk"`, sae/batchtopk.py): the selection and its gradients against
a float64 dense reference (also where a row needs more than the first candidates), the running threshold,
inference by threshold against the training selection, the folder (folding, refusals), SAELens's JumpReLU
(the export loads there with our outputs and comes back bit for bit; SAELens's own BatchTopK SAEs load here),
and a run that resumes bit for bit. Sharded and data-parallel runs equal one process in tests/test_sharded.py."""

from functools import partial
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import SparseAutoencoder
from sae.batchtopk import THRESHOLD_DECAY, update_running_threshold
from sae.config import SaeConfig
from sae.convert import convert
from sae.errors import UsageError
from tiny_runs import tiny_run_config, train_whole_and_resumed

F64 = torch.float64


def random_coder(transcode=False, d_in=12, n_latents=40, k=3, seed=0, dtype=F64) -> SparseAutoencoder:
    """A BatchTopK coder with every parameter random, so every term of the math counts."""
    torch.manual_seed(seed)
    cfg = SaeConfig(d_in=d_in, n_latents=n_latents, k=k, activation="batchtopk", transcode=transcode)
    sae = SparseAutoencoder(cfg, dtype=dtype)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name != "threshold":
                parameter.normal_()
    return sae


def dense_reference(sae: SparseAutoencoder, x, y):
    """(prediction, fvu, codes (N, n_latents), threshold) in float64 from the parameters, with no kernel:
    pre = W_enc (x - b_dec) + b_enc (a transcoder: W_enc x + b_enc), ReLU, the k N largest values of the
    whole batch kept, y_hat = codes W_dec + b_dec."""
    shift = 0 if sae.cfg.transcode else sae.b_dec
    values = ((x - shift) @ sae.encoder.weight.T + sae.encoder.bias).relu()
    threshold = values.flatten().topk(sae.cfg.k * len(x)).values.min()
    codes = torch.where((values >= threshold) & (values > 0), values, 0)
    y_hat = codes @ sae.W_dec + sae.b_dec
    return y_hat, (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum(), codes, threshold


def dense_codes(values, indices, n_latents):
    return torch.zeros(len(values), n_latents, dtype=values.dtype).scatter_add(1, indices, values)


@pytest.mark.parametrize("transcode", [False, True])
@pytest.mark.parametrize("hungry_row", [False, True])
def test_selection_and_gradients_equal_a_float64_dense_reference(transcode, hungry_row):
    """hungry_row: one token 30x larger than the rest wins most of the batch's k N values, far more than
    the first 4k candidates of its row: the candidates must widen for the selection to stay exact."""
    sae = random_coder(transcode)
    x = torch.randn(23, 12, dtype=F64)
    if hungry_row:
        x[5] *= 30
    y = torch.randn(23, 12, dtype=F64) if transcode else x
    out = sae(x, target=y if transcode else None)
    y_hat, fvu, codes, threshold = dense_reference(sae, x, y)
    if hungry_row:
        assert (codes[5] > 0).sum() > 4 * sae.cfg.k
    torch.testing.assert_close(out.batch_threshold, threshold, rtol=1e-12, atol=0)
    torch.testing.assert_close(dense_codes(out.latent_acts.detach(), out.latent_indices, 40), codes, rtol=1e-12, atol=1e-12)
    assert (out.latent_acts > 0).sum() == sae.cfg.k * len(x)  # exactly k N, no ties in random floats
    torch.testing.assert_close(out.x_hat, y_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.fvu, fvu, rtol=1e-12, atol=1e-12)

    out.fvu.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    dense_reference(sae, x, y)[1].backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, sae.get_parameter(name).grad, rtol=1e-10, atol=1e-12, msg=name)
    assert sae.threshold.grad is None


def test_encode_by_the_threshold_equals_the_training_selection_at_that_threshold():
    """At inference each token is encoded alone, by the running threshold; set to this batch's theta_b it
    keeps exactly what training kept on the batch."""
    sae = random_coder()
    x = torch.randn(31, 12, dtype=F64)
    x[2] *= 20  # a row that needs more than the first candidates at inference too
    out = sae(x)
    with torch.no_grad():
        sae.threshold.copy_(out.batch_threshold)
    values, indices = sae.encode(x)
    torch.testing.assert_close(dense_codes(values, indices, 40), dense_codes(out.latent_acts.detach(), out.latent_indices, 40),
                               rtol=0, atol=0)
    torch.testing.assert_close(sae.reconstruct(x)[0], out.x_hat.detach(), rtol=1e-12, atol=1e-12)
    # and row by row: a token's code does not depend on the others in its batch
    one_by_one = torch.cat([dense_codes(*sae.encode(x[i : i + 1]), 40) for i in range(len(x))])
    batched = dense_codes(values, indices, 40)
    assert torch.equal(one_by_one > 0, batched > 0)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-12, atol=1e-12)


def test_the_running_threshold_starts_at_the_first_batch_and_then_averages():
    running = torch.zeros((), dtype=F64)
    update_running_threshold(running, torch.tensor(2.0, dtype=F64))
    assert running.item() == 2.0
    update_running_threshold(running, torch.tensor(4.0, dtype=F64))
    assert running.item() == pytest.approx(THRESHOLD_DECAY * 2 + (1 - THRESHOLD_DECAY) * 4, rel=1e-15)


def test_the_folder_folds_the_threshold_with_the_input_scale(tmp_path):
    """Trained on inputs times s, saved for raw ones: the loaded SAE encodes raw x as the trained one
    encodes s x, values divided by s; the threshold is folded like b_enc."""
    sae = random_coder()
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    scale = 0.37
    sae.save(tmp_path / "btk", input_scale=scale)
    assert set(load_file(tmp_path / "btk" / "sae.safetensors")) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec",
                                                                      "threshold"}
    loaded = SparseAutoencoder.load(tmp_path / "btk")
    assert loaded.cfg == sae.cfg and loaded.threshold.item() == pytest.approx(0.7 / scale)
    x = torch.randn(17, 12, dtype=F64)
    torch.testing.assert_close(dense_codes(*loaded.encode(x), 40), dense_codes(*sae.encode(x * scale), 40) / scale)
    torch.testing.assert_close(loaded.reconstruct(x)[0] * scale, sae.reconstruct(x * scale)[0])


@pytest.mark.parametrize("to", ["sparsify"])
def test_conversions_that_would_compute_topk_are_refused(to, tmp_path):
    random_coder().save(tmp_path / "btk")
    with pytest.raises(UsageError, match="BatchTopK") as refused:
        convert(tmp_path / "btk", tmp_path / "out", to)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()
    assert SparseAutoencoder.load(convert(tmp_path / "btk", tmp_path / "ours", "ours")).threshold is not None


def test_a_batchtopk_transcoder_is_not_written_for_saelens(tmp_path):
    random_coder(transcode=True).save(tmp_path / "btk")
    with pytest.raises(UsageError, match="BatchTopK transcoder") as refused:
        convert(tmp_path / "btk", tmp_path / "out", "saelens")
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


# ---- SAELens: its JumpReLU SAE with our one threshold ---------------------------------------------------


def saelens_export(tmp_path, dtype=F64):
    """(our BatchTopK SAE saved with an input scale and provenance, loaded; its SAELens folder). Threshold 2 in
    the training scale: rows fire from none to half of the 40 latents (`saelens_inputs`)."""
    sae = random_coder(dtype=dtype)
    with torch.no_grad():
        sae.threshold.fill_(6.0)
    sae.save(tmp_path / "btk", input_scale=0.37, metadata={"model": "gpt2", "hookpoint": "transformer.h.3"})
    return SparseAutoencoder.load(tmp_path / "btk"), convert(tmp_path / "btk", tmp_path / "saelens", "saelens")


def saelens_inputs(dtype):
    """Raw activations (64, 12) (the SAE above reads x * 0.37), three rows 30x larger: those fire most latents,
    far more than the first 4k candidates."""
    x = torch.randn(64, 12, dtype=dtype, generator=torch.Generator().manual_seed(1)) / 0.37
    x[[3, 17, 40]] *= 30
    return x


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_saelens_loads_the_export_as_its_jumprelu_with_our_outputs(tmp_path, dtype):
    """SAELens's JumpReLU keeps h > threshold, ours pre >= threshold: they differ only where a pre-activation
    equals the threshold exactly, which random inputs never hit (sae/formats/saelens.py)."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE

    ours, folder = saelens_export(tmp_path, dtype)
    theirs = sae_lens.SAE.load_from_disk(folder)  # the plain call, no converter
    assert type(theirs) is JumpReLUSAE and theirs.cfg.metadata.model_name == "gpt2"
    assert theirs.threshold.shape == (40,) and torch.equal(theirs.threshold, ours.threshold.expand(40))
    assert ours.threshold.item() == pytest.approx(6.0 / 0.37)  # folded with the input scale
    x = saelens_inputs(dtype)
    tight = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        values, indices = ours.encode(x)
        codes = dense_codes(values, indices, 40)
        their_codes = theirs.encode(x)
        assert torch.equal(codes > 0, their_codes > 0)  # the same latents fire
        torch.testing.assert_close(codes, their_codes, **tight)
        torch.testing.assert_close(ours.decode(values, indices), theirs.decode(their_codes), **tight)
        torch.testing.assert_close(ours.reconstruct(x)[0], theirs(x), **tight)
    fired = (codes > 0).sum(dim=1)
    assert fired.min() < ours.cfg.k and fired.max() > 4 * ours.cfg.k  # fewer than k, and more than the first candidates


def test_saelens_differs_only_at_a_pre_activation_equal_to_the_threshold(tmp_path):
    """Integer weights and inputs make every pre-activation exact in both tools: where one equals the
    threshold, ours keeps it (pre >= threshold) and SAELens's JumpReLU drops it (h > threshold)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = random_coder(d_in=4, n_latents=6, k=1)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.arange(24, dtype=F64).reshape(6, 4) % 5 - 2)
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(2.0)
    sae.save(tmp_path / "btk")
    theirs = sae_lens.SAE.load_from_disk(convert(tmp_path / "btk", tmp_path / "saelens", "saelens"))
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]], dtype=F64)
    pre = x @ sae.encoder.weight.T
    at = pre == 2.0
    assert at.any() and (pre > 2.0).any()
    with torch.no_grad():
        codes, their_codes = dense_codes(*sae.encode(x), 6), theirs.encode(x)
    assert torch.equal(codes[at], pre[at]) and (their_codes[at] == 0).all()
    assert torch.equal(codes[~at], their_codes[~at])


def test_ours_to_saelens_and_back_is_bit_for_bit(tmp_path):
    pytest.importorskip("sae_lens")
    ours, folder = saelens_export(tmp_path)
    for back in (SparseAutoencoder.load(folder), SparseAutoencoder.load(convert(folder, tmp_path / "back", "ours"))):
        assert back.cfg == ours.cfg and back.cfg.activation == "batchtopk"
        assert back.state_dict().keys() == ours.state_dict().keys()
        for name, tensor in ours.state_dict().items():
            assert tensor.dtype == back.state_dict()[name].dtype and torch.equal(tensor, back.state_dict()[name]), name
    written = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert written == json.loads((tmp_path / "btk" / "cfg.json").read_text()) and written["activation"] == "batchtopk"


@pytest.mark.parametrize("edit,message", [
    ("thresholds", r"'threshold' has 2 different values over its 40 latents .*one threshold for all latents"),
    ("k", r"cannot load 'architecture': \"jumprelu\" with no k recorded"),
])
def test_a_saelens_jumprelu_that_is_not_ours_is_refused_in_one_line(tmp_path, edit, message):
    """Per-latent thresholds that differ: our SAE has one. One threshold but no k: our config needs one."""
    pytest.importorskip("sae_lens")
    _, folder = saelens_export(tmp_path)
    if edit == "thresholds":
        weights = load_file(folder / "sae_weights.safetensors")
        weights["threshold"][7] += 0.5
        save_file(weights, folder / "sae_weights.safetensors")
    else:
        config = json.loads((folder / "cfg.json").read_text())
        del config["metadata"]["topk_sae"]["k"]
        (folder / "cfg.json").write_text(json.dumps(config))
    culprit = folder / ("sae_weights.safetensors" if edit == "thresholds" else "cfg.json")
    with pytest.raises(UsageError, match=rf"^{culprit}: .*{message}") as refused:
        convert(folder, tmp_path / "back", "ours")
    assert "\n" not in str(refused.value) and not (tmp_path / "back").exists()


def test_saelens_own_batchtopk_sae_loads_here_with_its_outputs(tmp_path):
    """SAELens saves a BatchTopK SAE for inference as its JumpReLU with one threshold (decoder norms folded
    in) and the k it was trained to in its metadata: it loads here as a BatchTopK SAE with that k."""
    pytest.importorskip("sae_lens")
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(3)
    trained = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=12, d_sae=40, k=3, dtype="float64"))
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.normal_()
    trained.topk_threshold = torch.tensor(1.5, dtype=F64)
    trained.save_inference_model(tmp_path / "theirs")
    theirs, ours = SAE.load_from_disk(tmp_path / "theirs"), SparseAutoencoder.load(tmp_path / "theirs")
    assert ours.cfg.activation == "batchtopk" and ours.cfg.k == 3 and ours.threshold.item() == 1.5
    x = saelens_inputs(F64)
    with torch.no_grad():
        codes = dense_codes(*ours.encode(x), 40)
        torch.testing.assert_close(codes, theirs.encode(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.reconstruct(x)[0], theirs(x), rtol=1e-12, atol=1e-12)
    assert (codes > 0).sum(dim=1).max() > 4 * ours.cfg.k


def test_multi_topk_with_batchtopk_is_refused():
    with pytest.raises(ValueError, match="multi_topk"):
        SaeConfig(d_in=4, n_latents=8, k=2, activation="batchtopk", multi_topk=True)


def test_a_run_trains_at_mean_l0_k_and_resumes_bit_for_bit(tiny_lm_dir, text_file, tmp_path):
    sae = SaeConfig(n_latents=64, k=4, k_aux=16, dead_tokens=256, activation="batchtopk")
    whole = train_whole_and_resumed(partial(tiny_run_config, tiny_lm_dir, text_file, tmp_path, sae=sae))
    metrics = json.loads((whole / "cfg.json").read_text())
    assert metrics["activation"] == "batchtopk"
    assert metrics["final_metrics"]["last_train_batch"]["l0"] == pytest.approx(4.0)
    sae = SparseAutoencoder.load(whole)
    assert sae.threshold > 0
