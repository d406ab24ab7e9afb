"""Matryoshka prefixes (`SaeConfig.matryoshka`): the loss and its gradients against a float64 dense reference,
with TopK and BatchTopK selections, the config's checks, and a run from the CLI's config that resumes bit for
bit. Sharded and data-parallel runs equal one process in tests/test_sharded.py (the `matryoshka` case)."""

from functools import partial

import pytest
import torch

from sae import SparseAutoencoder
from sae.config import SaeConfig, parse_args
from tiny_runs import tiny_run_config, train_whole_and_resumed

F64 = torch.float64
PREFIXES = (5, 17)


def random_sae(activation: str, n_latents=40, k=4) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=12, n_latents=n_latents, k=k, activation=activation, matryoshka=PREFIXES),
                            dtype=F64)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name != "threshold":
                parameter.normal_()
    return sae


def dense_loss(sae: SparseAutoencoder, x):
    """(fvu, mean prefix fvu, reconstruction loss) in float64 with no kernel: the codes of the whole
    dictionary (TopK per row, or BatchTopK over the batch), then each prefix decoded from its own latents."""
    values = ((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias).relu()
    if sae.cfg.activation == "topk":
        top = values.topk(sae.cfg.k, dim=1)
        codes = torch.zeros_like(values).scatter(1, top.indices, top.values)
    else:
        threshold = values.flatten().topk(sae.cfg.k * len(x)).values.min()
        codes = torch.where(values >= threshold, values, 0)
    variance = (x - x.mean(0)).pow(2).sum()

    def fvu(size):
        return (x - codes[:, :size] @ sae.W_dec[:size] - sae.b_dec).pow(2).sum() / variance

    prefixes = [fvu(size) for size in PREFIXES]
    whole = fvu(sae.cfg.n_latents)
    return whole, torch.stack(prefixes).mean(), (whole + sum(prefixes)) / (len(prefixes) + 1)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_loss_and_gradients_equal_a_float64_dense_reference(activation):
    sae = random_sae(activation)
    x = torch.randn(29, 12, dtype=F64)
    out = sae(x)
    whole, prefix, reconstruction = dense_loss(sae, x)
    torch.testing.assert_close(out.fvu, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.prefix_fvu, prefix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, reconstruction, rtol=1e-12, atol=1e-12)  # AuxK off: no dead mask

    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    reconstruction.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, sae.get_parameter(name).grad, rtol=1e-10, atol=1e-12, msg=name)
    # the last latents get gradient only from the whole dictionary's term; the first from every term
    assert ours["W_dec"][PREFIXES[-1]:].abs().sum() > 0


@pytest.mark.parametrize("prefixes", [(0,), (8, 4), (4, 4), (40,), (True,)])
def test_bad_prefixes_are_refused(prefixes):
    with pytest.raises(ValueError, match="matryoshka"):
        SaeConfig(d_in=4, n_latents=40, k=2, matryoshka=prefixes)


def test_multi_topk_and_matryoshka_are_refused_together():
    with pytest.raises(ValueError, match="choose one"):
        SaeConfig(d_in=4, n_latents=40, k=2, matryoshka=(8,), multi_topk=True)


def test_the_cli_and_a_variant_set_the_prefixes():
    cfg = parse_args(["--sae.matryoshka", "[256, 1024]", "--variants", "[{name: m, matryoshka: [64]}, {name: plain}]"])
    assert cfg.sae.matryoshka == (256, 1024)
    assert [member.matryoshka for _, member in cfg.member_configs()] == [(64,), (256, 1024)]


def test_a_run_resumes_bit_for_bit_and_logs_the_prefix_fvu(tiny_lm_dir, text_file, tmp_path):
    sae = SaeConfig(n_latents=64, k=4, k_aux=16, dead_tokens=256, matryoshka=(8, 32))
    whole = train_whole_and_resumed(partial(tiny_run_config, tiny_lm_dir, text_file, tmp_path, sae=sae))
    import json

    saved = json.loads((whole / "cfg.json").read_text())
    assert saved["matryoshka"] == [8, 32] and saved["final_metrics"]["last_train_batch"]["prefix_fvu"] > 0
    assert SparseAutoencoder.load(whole).cfg.matryoshka == (8, 32)
