"""`SparseAutoencoder.load` on folders written by sparsify's own `SparseCoder.save_to_disk`.

Each folder either loads and gives sparsify's outputs (codes, reconstruction, fvu) on fresh random
inputs, or is refused with a ValueError naming the cfg.json key whose math this SAE does not implement.
"""

import json

import pytest
import torch

sparsify = pytest.importorskip("sparsify")

from sae import SparseAutoencoder  # noqa: E402
from sae.formats.sparsify import SPARSIFY_KEY_RULES  # noqa: E402

D_IN = 16


def sparsify_folder(path, **cfg_kwargs):
    """Save a sparsify SparseCoder (d_in 16) with every parameter random, so all terms of the math count."""
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(**cfg_kwargs))
    with torch.no_grad():
        for parameter in coder.parameters():
            parameter.normal_()
        coder.set_decoder_norm_to_unit_norm()
        if not coder.cfg.normalize_decoder:  # rows of other norms, still O(1) so float32 agrees to 1e-5
            coder.W_dec.mul_(torch.empty(coder.num_latents, 1).uniform_(0.5, 1.5))
    coder.save_to_disk(path)
    return coder


def dense_codes(values, indices, n_latents):
    """(N, n_latents) codes: each row's top-k values scattered to their latents, zero elsewhere."""
    return torch.zeros(values.shape[0], n_latents, dtype=torch.float32).scatter(-1, indices, values.float())


@pytest.mark.parametrize(
    "cfg_kwargs,n_latents",
    [
        (dict(num_latents=0, expansion_factor=4, k=5), D_IN * 4),  # sparsify's default form
        (dict(num_latents=0, expansion_factor=4, k=5, normalize_decoder=False, multi_topk=True), D_IN * 4),
        (dict(num_latents=48, expansion_factor=32, k=3), 48),  # num_latents wins over expansion_factor
    ],
)
def test_sparsify_folder_loads_with_sparsify_outputs(tmp_path, cfg_kwargs, n_latents):
    theirs = sparsify_folder(tmp_path / "coder", **cfg_kwargs)
    assert json.loads((tmp_path / "coder" / "cfg.json").read_text())["num_latents"] == cfg_kwargs["num_latents"]
    ours = SparseAutoencoder.load(tmp_path / "coder")
    assert (ours.cfg.d_in, ours.cfg.n_latents, ours.cfg.k) == (D_IN, n_latents, cfg_kwargs["k"])
    assert ours.cfg.normalize_decoder == theirs.cfg.normalize_decoder
    assert ours.cfg.multi_topk == theirs.cfg.multi_topk

    x = torch.randn(64, D_IN) * 3
    with torch.no_grad():
        their_values, their_indices, _ = theirs.encode(x)
        our_values, our_indices = ours.encode(x)
        # sparsify takes ReLU before its top-k, we after; the codes agree either way.
        their_codes = dense_codes(their_values, their_indices, n_latents)
        torch.testing.assert_close(dense_codes(our_values, our_indices, n_latents), their_codes, rtol=0, atol=1e-5)
        assert (their_codes > 0).sum() > x.shape[0]  # not a vacuous comparison of zeros

        their_x_hat = theirs.decode(their_values, their_indices)
        torch.testing.assert_close(ours.decode(their_values, their_indices), their_x_hat, rtol=0, atol=1e-5)
        # Compared with decode, not sparsify's forward: with multi_topk its sae_out is the top-4k one.
        our_out = ours(x)
        torch.testing.assert_close(our_out.x_hat, their_x_hat, rtol=0, atol=1e-5)
        torch.testing.assert_close(our_out.fvu, theirs(x).fvu, rtol=1e-5, atol=1e-6)

    # Saved again by us (explicit num_latents), it still loads in sparsify with the same outputs.
    ours.save(tmp_path / "resaved")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "resaved")
    assert again.num_latents == n_latents
    with torch.no_grad():
        torch.testing.assert_close(again.decode(*again.encode(x)[:2]), their_x_hat, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "key,cfg_kwargs",
    [
        ("activation", dict(num_latents=64, k=4, activation="groupmax")),
    ],
)
def test_sparsify_coder_with_other_math_is_refused_naming_the_key(tmp_path, key, cfg_kwargs):
    sparsify_folder(tmp_path / "coder", **cfg_kwargs)
    sparsify.SparseCoder.load_from_disk(tmp_path / "coder")  # a valid sparsify folder
    with pytest.raises(ValueError, match=rf"cfg\.json: cannot load '{key}'"):
        SparseAutoencoder.load(tmp_path / "coder")


@pytest.mark.parametrize("key", [key for key, (allowed, _) in SPARSIFY_KEY_RULES.items() if allowed is not None])
@pytest.mark.parametrize("bad_value", ["other", 1, 0, True, None])
def test_every_restricted_key_refuses_every_other_value(tmp_path, key, bad_value):
    """Keys newer sparsify versions write (embed_skip, gram_lookup) too; JSON 0 must not pass for false."""
    allowed = SPARSIFY_KEY_RULES[key][0]
    if any(type(value) is type(bad_value) and value == bad_value for value in allowed):
        pytest.skip("an allowed value")
    sparsify_folder(tmp_path / "coder", num_latents=32, k=2)
    cfg_path = tmp_path / "coder" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    SparseAutoencoder.load(tmp_path / "coder")  # loads before the edit
    cfg_path.write_text(json.dumps({**cfg, key: bad_value}))
    with pytest.raises(ValueError, match=rf"cannot load '{key}'"):
        SparseAutoencoder.load(tmp_path / "coder")


@pytest.mark.parametrize(
    "edit,message",
    [
        (dict(expansion_factor=None), "missing key 'num_latents'"),  # None: drop the key
        (dict(expansion_factor=0), "'expansion_factor' must be a positive integer"),
        (dict(expansion_factor=2.5), "'expansion_factor' must be a positive integer"),
        (dict(expansion_factor=8), "'encoder.weight' has shape"),  # 16 * 8 latents, the file has 64
    ],
)
def test_num_latents_zero_needs_a_valid_expansion_factor(tmp_path, edit, message):
    sparsify_folder(tmp_path / "coder", num_latents=0, expansion_factor=4, k=5)
    cfg_path = tmp_path / "coder" / "cfg.json"
    cfg = {**json.loads(cfg_path.read_text()), **edit}
    cfg_path.write_text(json.dumps({key: value for key, value in cfg.items() if value is not None}))
    with pytest.raises(ValueError, match=message):
        SparseAutoencoder.load(tmp_path / "coder")
