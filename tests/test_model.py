"""SparseAutoencoder against a plain float64 reference, on fresh random inputs every run."""

import json
import math

import pytest
import torch

from sae import SaeConfig, SparseAutoencoder
from sae.errors import UserError
from sae.folder import read_any_sae_metadata
from sae.model import fire_counts, geometric_median


def random_sae(d_in, n_latents, k, **kwargs) -> SparseAutoencoder:
    """An SAE with every parameter random (not the tied init), so all terms of the math are exercised."""
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, n_latents=n_latents, k=k, **kwargs))
    with torch.no_grad():
        sae.encoder.weight.normal_()
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
        sae.W_dec.normal_()
        sae.set_decoder_norm_to_unit_norm()
    return sae


def reference_pre_acts(sae, x):
    W_enc, b_enc, b_dec = (t.detach().double() for t in (sae.encoder.weight, sae.encoder.bias, sae.b_dec))
    return (x.double() - b_dec) @ W_enc.T + b_enc


def reference_topk_dense(pre, k):
    """Dense (N, n_latents) codes: ReLU of the k largest pre-activations of each row, zero elsewhere."""
    codes = torch.zeros_like(pre)
    top = pre.topk(k, dim=-1)
    return codes.scatter(-1, top.indices, top.values.relu())


def reference_nmse(target, prediction):
    return ((target - prediction) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()


SHAPES = [(100, 1000, 5), (16, 64, 1), (33, 70, 70), (128, 512, 32)]  # (d_in, n_latents, k)


@pytest.mark.parametrize("d_in,n_latents,k", SHAPES)
def test_encode_decode_forward_match_float64_reference(d_in, n_latents, k):
    sae = random_sae(d_in, n_latents, k)
    x = torch.randn(37, d_in) * 3
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (37, k) and indices.dtype == torch.int64

    pre = reference_pre_acts(sae, x)
    codes = reference_topk_dense(pre, k)
    ours = torch.zeros_like(codes).scatter(-1, indices, values.double())
    torch.testing.assert_close(ours, codes, rtol=1e-5, atol=1e-5)

    x_hat_reference = codes @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    torch.testing.assert_close(sae.decode(values, indices).double(), x_hat_reference, rtol=1e-4, atol=1e-4)

    out = sae(x)
    torch.testing.assert_close(out.x_hat.double(), x_hat_reference, rtol=1e-4, atol=1e-4)
    nmse = reference_nmse(x.double(), x_hat_reference)
    torch.testing.assert_close(out.fvu.double(), nmse, rtol=1e-4, atol=1e-6)
    assert out.auxk_loss == 0 and out.multi_topk_fvu == 0
    torch.testing.assert_close(out.loss, out.fvu)


def test_decode_with_repeated_indices_accumulates():
    sae = random_sae(10, 20, 3)
    values = torch.rand(4, 3)
    indices = torch.tensor([[5, 5, 5], [0, 1, 0], [19, 19, 2], [7, 8, 9]])
    expected = torch.stack([
        sum(values[row, j].double() * sae.W_dec[indices[row, j]].detach().double() for j in range(3))
        for row in range(4)
    ]) + sae.b_dec.detach().double()
    torch.testing.assert_close(sae.decode(values, indices).double(), expected, rtol=1e-5, atol=1e-5)


def test_forward_in_float64_matches_reference_exactly():
    sae = random_sae(24, 96, 7).double()
    x = torch.randn(50, 24, dtype=torch.float64)
    codes = reference_topk_dense(reference_pre_acts(sae, x), 7)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, codes @ sae.W_dec.detach() + sae.b_dec.detach())


def test_gradients_match_float64_reference():
    sae = random_sae(12, 40, 4).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    sae(x).fvu.backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    pre = (x - params["b_dec"]) @ params["encoder.weight"].T + params["encoder.bias"]
    x_hat = reference_topk_dense(pre, 4) @ params["W_dec"] + params["b_dec"]
    reference_nmse(x, x_hat).backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=name)


def test_auxk_uses_only_dead_latents_and_matches_reference():
    d_in, n_latents, k, k_aux = 16, 64, 4, 6
    sae = random_sae(d_in, n_latents, k, k_aux=k_aux, auxk_coef=0.5).double()
    x = torch.randn(30, d_in, dtype=torch.float64)
    dead = torch.zeros(n_latents, dtype=torch.bool)
    dead_ids = torch.randperm(n_latents)[:10]
    dead[dead_ids] = True
    out = sae(x, dead_mask=dead)

    pre = reference_pre_acts(sae, x)
    residual = x - out.x_hat.detach()
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    aux_codes = reference_topk_dense(masked, k_aux)
    assert set(aux_codes.nonzero()[:, 1].tolist()) <= set(dead_ids.tolist())
    residual_hat = aux_codes @ sae.W_dec.detach()  # no b_dec: it reconstructs a residual
    expected = reference_nmse(residual, residual_hat)
    torch.testing.assert_close(out.auxk_loss, expected)
    torch.testing.assert_close(out.loss, out.fvu + 0.5 * expected)

    # The AuxK gradient reaches only dead latents' encoder rows (the main loss is off here).
    sae.zero_grad()
    sae(x, dead_mask=dead).auxk_loss.backward()
    live_rows = sae.encoder.weight.grad[~dead]
    assert torch.all(live_rows == 0) and sae.encoder.weight.grad[dead].abs().sum() > 0


def test_auxk_caps_k_aux_at_number_dead_and_is_zero_without_dead():
    sae = random_sae(8, 32, 2, k_aux=512)
    x = torch.randn(20, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    assert sae(x, dead_mask=dead).auxk_loss == 0
    dead[[3, 17]] = True  # k_aux=512 > 2 dead latents: uses both
    pre = reference_pre_acts(sae, x)
    residual = x.double() - sae(x).x_hat.detach().double()
    codes = torch.zeros_like(pre)
    codes[:, [3, 17]] = pre[:, [3, 17]].relu()
    expected = reference_nmse(residual, codes @ sae.W_dec.detach().double())
    torch.testing.assert_close(sae(x, dead_mask=dead).auxk_loss.double(), expected, rtol=1e-4, atol=1e-6)


def test_auxk_nan_becomes_zero():
    sae = random_sae(4, 8, 1)
    dead = torch.ones(8, dtype=torch.bool)
    with torch.no_grad():
        sae.W_dec.zero_()  # x_hat = b_dec = x: a zero residual, reconstructed by zero: 0 / 0
    x = sae.b_dec.detach().expand(5, 4).clone()
    assert sae(x, dead_mask=dead).auxk_loss.item() == 0.0


def test_multi_topk_loss():
    sae = random_sae(20, 100, 3, multi_topk=True)
    x = torch.randn(25, 20)
    out = sae(x)
    pre = reference_pre_acts(sae, x)
    x_hat_4k = reference_topk_dense(pre, 12) @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    expected = reference_nmse(x.double(), x_hat_4k)
    torch.testing.assert_close(out.multi_topk_fvu.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, out.fvu + out.multi_topk_fvu / 8)


def test_init_is_tied_with_unit_norm_decoder():
    sae = SparseAutoencoder(SaeConfig(d_in=30, n_latents=90, k=5))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(90))
    assert torch.equal(sae.encoder.weight, sae.W_dec)
    assert torch.all(sae.encoder.bias == 0) and torch.all(sae.b_dec == 0)


def test_decoder_gradient_projection_and_renormalisation():
    sae = random_sae(16, 48, 4).double()
    sae.set_decoder_norm_to_unit_norm()  # unit norm in float64, as the projection assumes
    sae(torch.randn(20, 16, dtype=torch.float64)).loss.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-6  # there was something to remove
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-12
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1, dtype=torch.float64) + 0.5)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_fire_counts_match_a_loop_and_skip_zero_values(k):
    generator = torch.Generator().manual_seed(k)
    n_latents, rows = 13, 50
    indices = torch.randint(0, n_latents, (rows, k), generator=generator)
    values = torch.rand(rows, k, generator=generator)
    values[values < 0.3] = 0.0  # selected by TopK but cut by ReLU: not a firing
    reference = [0] * n_latents
    for row in range(rows):
        for slot in range(k):
            if values[row, slot] > 0:
                reference[indices[row, slot]] += 1
    counts = fire_counts(values, indices, n_latents)
    assert counts.dtype == torch.int64 and counts.shape == (n_latents,)
    assert counts.tolist() == reference
    assert fire_counts(values[:0], indices[:0], n_latents).tolist() == [0] * n_latents


def test_geometric_median():
    # Four corners of a square plus its centre: the centre is the median, not moved by an outlier-free mean.
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(geometric_median(points), torch.tensor([1.0, 1.0], dtype=torch.float64))
    # Robust to an outlier, unlike the mean; and a stationary point of the summed distances.
    points = torch.randn(200, 5, dtype=torch.float64)
    points[0] = 1e4
    median = geometric_median(points)
    assert median.norm() < 1.0 < points.mean(0).norm()
    median.requires_grad_(True)
    (points - median).norm(dim=1).sum().backward()
    assert median.grad.norm() < 1e-3


def test_save_load_round_trip(tmp_path):
    sae = random_sae(20, 60, 6, multi_topk=True, k_aux=30)
    sae.save(tmp_path / "sae", metadata={"hookpoint": "transformer.h.1", "model": "m"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert {"d_in", "num_latents", "k", "normalize_decoder", "multi_topk"} <= set(cfg)
    assert cfg["num_latents"] == 60 and cfg["hookpoint"] == "transformer.h.1"
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(11, 20)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_scale_folding_saved_sae_takes_raw_inputs(tmp_path):
    sae = random_sae(32, 128, 8)
    scale = 0.037
    sae.save(tmp_path / "sae", input_scale=scale)
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    x_raw = torch.randn(40, 32) * 27 + 5
    live = sae(x_raw * scale)
    folded = loaded(x_raw)
    torch.testing.assert_close(folded.x_hat, live.x_hat / scale, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.latent_acts, live.latent_acts / scale, rtol=1e-4, atol=1e-4)
    assert torch.equal(folded.latent_indices.sort(-1).values, live.latent_indices.sort(-1).values)
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(128))  # still unit norm


def test_load_errors_name_the_problem(tmp_path):
    sae = random_sae(8, 16, 2)
    sae.save(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path / "missing")

    bad = tmp_path / "bad_shape"
    random_sae(8, 16, 2).save(bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 17}))
    with pytest.raises(ValueError, match="encoder.weight.*shape"):
        SparseAutoencoder.load(bad)

    corrupt = tmp_path / "corrupt"
    random_sae(8, 16, 2).save(corrupt)
    data = (corrupt / "sae.safetensors").read_bytes()
    (corrupt / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sae.safetensors"):
        SparseAutoencoder.load(corrupt)

    no_key = tmp_path / "no_key"
    random_sae(8, 16, 2).save(no_key)
    (no_key / "cfg.json").write_text(json.dumps({"d_in": 8, "k": 2}))
    with pytest.raises(ValueError, match="num_latents"):
        SparseAutoencoder.load(no_key)


def test_saved_folder_loads_in_sparsify_with_same_outputs(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    sae = random_sae(48, 200, 8)
    sae.save(tmp_path / "sae", input_scale=0.5, metadata={"hookpoint": "h", "model": "m"})
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sae")
    ours = SparseAutoencoder.load(tmp_path / "sae")
    x = torch.randn(64, 48) * 4
    their_out = theirs(x)
    our_out = ours(x)
    torch.testing.assert_close(their_out.sae_out, our_out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(their_out.fvu, our_out.fvu, rtol=1e-5, atol=1e-6)
    assert theirs.cfg.k == 8 and theirs.num_latents == 200


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k=9 exceeds"):
        SaeConfig(d_in=4, n_latents=8, k=9)
    with pytest.raises(ValueError, match="d_in"):
        SparseAutoencoder(SaeConfig(n_latents=8, k=2))


def test_init_draws_from_the_cpu_generator_and_a_meta_sae_draws_nothing():
    cfg = SaeConfig(d_in=12, n_latents=40, k=3)
    torch.manual_seed(7)
    first = SparseAutoencoder(cfg)
    after_init = torch.get_rng_state()
    SparseAutoencoder(cfg, device="meta")  # shapes only (sae_from_full_state): must not move the RNG
    assert torch.equal(torch.get_rng_state(), after_init)
    torch.manual_seed(7)
    assert torch.equal(SparseAutoencoder(cfg).W_dec, first.W_dec)
    torch.testing.assert_close(first.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(first.encoder.weight, first.W_dec) and not first.encoder.bias.any()


def corrupt_weights(weights_file, tensor: str, n_values: int) -> None:
    """Overwrite the first `n_values` float32 values of `tensor` in a safetensors file with 0xFF bytes (each
    becomes a NaN), leaving the header intact: what a bad disk sector or a broken copy leaves."""
    data = bytearray(weights_file.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    start = 8 + header_length + json.loads(data[8 : 8 + header_length])[tensor]["data_offsets"][0]
    data[start : start + 4 * n_values] = b"\xff" * (4 * n_values)
    weights_file.write_bytes(bytes(data))


def test_weights_with_nan_or_inf_are_refused_in_one_line_naming_the_file_and_tensor(tmp_path):
    random_sae(8, 16, 2).save(tmp_path / "sae")
    corrupt_weights(tmp_path / "sae" / "sae.safetensors", "W_dec", 10)
    with pytest.raises(UserError) as refused:
        SparseAutoencoder.load(tmp_path / "sae")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'sae' / 'sae.safetensors'}: non-finite values")
    assert "'W_dec' 10 of 128" in message and "encoder" not in message


@pytest.mark.parametrize("key,value,expected", [
    ("ctx_len", "64", "'ctx_len' must be an integer or null, found \"64\" (a string)"),
    ("ctx_len", 64.5, "'ctx_len' must be an integer or null, found 64.5 (a number)"),
    ("hookpoint", 3, "'hookpoint' must be a string or null, found 3 (an integer)"),
    ("text_read", [], "'text_read' must be a JSON object or null, found [] (a JSON list)"),
    ("k", True, "'k' must be an integer, found true (true or false)"),
    ("k", "2", "'k' must be an integer, found \"2\" (a string)"),
    ("num_latents", 16.0, "'num_latents' must be an integer, found 16.0 (a number)"),
    ("auxk_coef", "0.1", "'auxk_coef' must be a number or null, found \"0.1\" (a string)"),
    ("multi_topk", 0, "'multi_topk' must be true or false, found 0 (an integer)"),
])
def test_cfg_json_values_of_the_wrong_type_are_one_line_naming_the_key(tmp_path, key, value, expected):
    random_sae(8, 16, 2).save(tmp_path / "sae", metadata={"model": "m", "hookpoint": "h", "ctx_len": 64})
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), key: value}))
    for read in (SparseAutoencoder.load, read_any_sae_metadata):
        with pytest.raises(UserError) as refused:
            read(tmp_path / "sae")
        assert str(refused.value) == f"{cfg_path}: {expected}"


def test_cfg_json_null_provenance_loads_and_not_json_is_one_line(tmp_path):
    random_sae(8, 16, 2).save(tmp_path / "sae", metadata={"model": None, "ctx_len": None, "dataset_config": None})
    assert read_any_sae_metadata(tmp_path / "sae")["ctx_len"] is None  # null: not recorded (eval asks for --ctx_len)
    SparseAutoencoder.load(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    for text in (b'{"d_in": 8, "k": 2,', b"\xff\xfe not text"):
        cfg_path.write_bytes(text)
        with pytest.raises(UserError, match=rf"^{cfg_path}: not valid JSON \(") as refused:
            SparseAutoencoder.load(tmp_path / "sae")
        assert "\n" not in str(refused.value)
