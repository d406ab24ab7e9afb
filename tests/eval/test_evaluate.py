"""`evaluate` end to end on the tiny LM: known SAEs give known answers; the numbers match a float64
reference computed without the splice machinery."""

import math

import pytest
import torch
import torch.nn.functional as F

from eval import activation_mean, evaluate, evaluate_many
from sae.activations import get_module

from known_saes import constant_sae, identity_sae, random_sae

HOOKPOINT = "transformer.h.1"
D = 128  # the embedded model's width
FLOAT_KEYS = {"nmse", "fvu", "mse", "l0", "never_fired_frac", "dense_frac", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
              "ce_recovered", "ce_recovered_mean", "delta_ce", "kl"}


def test_report_keys_and_types_are_stable(embedded_lm, embedded_windows):
    model, _ = embedded_lm
    report = evaluate(random_sae(D), model, embedded_windows, HOOKPOINT, batch_windows=4)
    assert set(report) == FLOAT_KEYS | {"tokens", "never_fired_tokens", "ce_positions", "density_histogram"}
    assert all(type(report[key]) is float for key in FLOAT_KEYS)
    assert report["tokens"] == report["never_fired_tokens"] == 10 * 15 and report["ce_positions"] == 10 * 14
    assert set(report["density_histogram"]) == {"log10_bin_edges", "counts", "never_fired"}
    assert all(type(count) is int for count in report["density_histogram"]["counts"])


@pytest.mark.parametrize("splice_mode", ["expand_in_hook", "repeat_inputs"])
def test_identity_sae_recovers_everything(embedded_lm, embedded_windows, splice_mode):
    model, _ = embedded_lm
    report = evaluate(identity_sae(D), model, embedded_windows, HOOKPOINT, batch_windows=3, splice_mode=splice_mode)
    assert report["fvu"] == 0 and report["nmse"] == 0
    assert abs(report["ce_sae"] - report["ce_clean"]) < 1e-6
    assert abs(report["kl"]) < 1e-7
    assert abs(report["ce_recovered"] - 1) < 1e-6 and abs(report["ce_recovered_mean"] - 1) < 1e-5
    assert report["ce_zero"] > report["ce_clean"] + 0.01  # the ablations do hurt this LM


def test_zero_and_mean_reconstructions_recover_nothing(embedded_lm, embedded_windows):
    model, _ = embedded_lm
    mean = activation_mean(model, HOOKPOINT, embedded_windows).float()
    reports = evaluate_many(
        {"zero": constant_sae(D, torch.zeros(D)), "mean": constant_sae(D, mean)}, model, embedded_windows, HOOKPOINT
    )
    assert abs(reports["zero"]["ce_recovered"]) < 1e-6
    assert abs(reports["zero"]["ce_sae"] - reports["zero"]["ce_zero"]) < 1e-6
    assert abs(reports["mean"]["ce_recovered_mean"]) < 1e-5
    assert abs(reports["mean"]["fvu"] - 1) < 1e-5  # predicting the mean explains no variance
    assert reports["mean"]["l0"] > 0 and reports["zero"]["never_fired_frac"] < 1


@pytest.mark.parametrize("hygiene", ["none", "token", "token+norm"])
def test_numbers_match_a_float64_reference_without_the_splice_runner(embedded_lm, embedded_windows, hygiene):
    """With token hygiene the positions of the excluded token (here the text's most frequent one) and,
    with a ratio, those of norm above ratio x the median keep their clean activations and leave the
    reconstruction metrics."""
    model, _ = embedded_lm
    model64 = type(model)(model.config)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    sae = random_sae(D, n_latents=96, k=6, seed=3)
    excluded = [] if hygiene == "none" else [int(embedded_windows[:, 1:].flatten().mode().values)]
    ratio = 1.2 if hygiene == "token+norm" else 0.0
    report = evaluate(sae.double(), model64, embedded_windows, HOOKPOINT, batch_windows=4, excluded_token_ids=excluded,
                      outlier_norm_ratio=ratio)

    module = get_module(model64, HOOKPOINT)
    with torch.no_grad():
        clean_logits = model64(input_ids=embedded_windows).logits
        captured = []
        handle = module.register_forward_hook(lambda m, i, out: captured.append(out))
        model64(input_ids=embedded_windows)
        handle.remove()
        all_acts = captured[0][:, 1:].reshape(-1, D)
        keep = ~torch.isin(embedded_windows[:, 1:].reshape(-1), torch.tensor(excluded, dtype=torch.long))
        if ratio:
            keep &= all_acts.norm(dim=-1) <= ratio * all_acts[keep].norm(dim=-1).median()
        assert 0 < keep.sum() < len(keep) or hygiene == "none"
        acts = all_acts[keep]
        pre = (acts - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
        top = pre.topk(6, dim=-1)
        dense = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = dense @ sae.W_dec + sae.b_dec

        def splice(m, i, out):
            out = out.clone()
            spliced = all_acts.clone()
            spliced[keep] = x_hat
            out[:, 1:] = spliced.view(10, 15, D)
            return out

        handle = module.register_forward_hook(splice)
        sae_logits = model64(input_ids=embedded_windows).logits
        handle.remove()
    targets = embedded_windows[:, 2:].reshape(-1)
    ce_clean = F.cross_entropy(clean_logits[:, 1:-1].reshape(-1, clean_logits.shape[-1]), targets).item()
    ce_sae = F.cross_entropy(sae_logits[:, 1:-1].reshape(-1, sae_logits.shape[-1]), targets).item()
    kl = F.kl_div(sae_logits[:, 1:-1].log_softmax(-1), clean_logits[:, 1:-1].log_softmax(-1),
                  log_target=True, reduction="none").sum(-1).mean().item()
    error = (acts - x_hat).pow(2).sum()
    assert math.isclose(report["ce_clean"], ce_clean, rel_tol=1e-6)
    assert math.isclose(report["ce_sae"], ce_sae, rel_tol=1e-6)
    assert math.isclose(report["kl"], kl, rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(report["fvu"], (error / (acts - acts.mean(0)).pow(2).sum()).item(), rel_tol=1e-6)
    assert math.isclose(report["nmse"], (error / acts.pow(2).sum()).item(), rel_tol=1e-6)
    assert report["l0"] == (top.values > 0).sum().item() / len(acts)
    assert report["tokens"] == len(acts) and report["ce_positions"] == 10 * 14


def test_several_saes_in_one_pass_equal_one_at_a_time(embedded_lm, embedded_windows):
    model, _ = embedded_lm
    saes = {"a": random_sae(D, seed=1), "b": random_sae(D, n_latents=40, k=2, seed=2)}
    together = evaluate_many(saes, model, embedded_windows, HOOKPOINT, batch_windows=4)
    for name, sae in saes.items():
        alone = evaluate(sae, model, embedded_windows, HOOKPOINT, batch_windows=4)
        for key in FLOAT_KEYS:
            assert math.isclose(together[name][key], alone[key], rel_tol=1e-5, abs_tol=1e-6), key


def test_bad_inputs_are_clear_errors(embedded_lm, embedded_windows):
    model, _ = embedded_lm
    with pytest.raises(ValueError, match="d_in=16, but transformer.h.1 outputs 128"):
        evaluate(random_sae(16), model, embedded_windows, HOOKPOINT)
    with pytest.raises(ValueError, match=r"tokens must be \(n_windows, ctx_len\)"):
        evaluate(random_sae(D), model, embedded_windows[0], HOOKPOINT)
    with pytest.raises(ValueError, match="hookpoint 'transformer.h.9'"):
        evaluate(random_sae(D), model, embedded_windows, "transformer.h.9")
