"""The eval of transcoders: every latent section (explain, N2G, probe, ablation) reads a transcoder's codes of
its module's INPUT (records.encode_windows), the replacement model (`--replace_all`) splices a whole set in
one forward, and the tables and the JSON report say which rows are transcoders."""

import json

import pytest
import torch

from eval.__main__ import main
from eval.ablation import ablation_effects, choose_occurrences, effect_sparsity
from eval.explain.records import encode_windows, find_mlp_neurons, sae_latent_activations
from eval.replacement import replacement_model
from sae import SaeConfig, SparseAutoencoder
from sae.activations import capture_many, get_site
from sae.errors import UserError

from known_saes import random_sae

MLP = "transformer.h.1.mlp"


def random_transcoder(skip: bool = True, seed: int = 0) -> SparseAutoencoder:
    """A transcoder of the tiny LM's MLPs (width 32) with every parameter random."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4, transcode=True, skip_connection=skip))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.3)
    return sae


def mlp_input_and_output(model, windows, hookpoint=MLP):
    """The MLP's input and output at positions 1.., (B, T - 1, 32) each."""
    x, y = capture_many(model, [get_site(model, f"{hookpoint}:input"), get_site(model, hookpoint)], windows)
    return x[:, 1:], y[:, 1:]


def dense_codes(sae, acts):
    """(N, n_latents) codes of acts (B, P, d)."""
    values, indices = sae.encode(acts.flatten(0, 1))
    return torch.zeros(len(values), sae.cfg.n_latents).scatter(1, indices, values)


def test_a_transcoders_codes_are_of_its_module_input_and_an_saes_of_the_output(tiny_lm, windows):
    """The one place every latent section reads codes from: a transcoder encodes the MLP's input."""
    model, _ = tiny_lm
    transcoder = random_transcoder()
    x, y = mlp_input_and_output(model, windows)
    codes = encode_windows(model, MLP, transcoder, windows)
    assert torch.equal(codes.hidden, x)
    got = torch.zeros(len(codes.values), 64).scatter(1, codes.indices, codes.values)
    assert torch.equal(got, dense_codes(transcoder, x)) and not torch.allclose(got, dense_codes(transcoder, y))
    sae = random_sae(32)
    assert torch.equal(encode_windows(model, MLP, sae, windows).hidden, y)


def test_explain_and_n2g_records_show_the_codes_of_the_module_input(tiny_lm, windows):
    model, _ = tiny_lm
    transcoder = random_transcoder()
    latents = [0, 5, 63]
    x, y = mlp_input_and_output(model, windows)
    activations = sae_latent_activations(model, MLP, transcoder, latents)(windows)  # explain's records and N2G's
    expected = dense_codes(transcoder, x)[:, latents].view(*x.shape[:2], 3)
    assert torch.equal(activations, expected)
    assert not torch.allclose(activations, dense_codes(transcoder, y)[:, latents].view(*y.shape[:2], 3))
    # the neuron baseline of a transcoder at an MLP: that MLP's own neurons
    assert str(find_mlp_neurons(model, MLP)) == f"the input of {MLP}.c_proj"


def test_the_probe_reads_the_codes_and_coordinates_of_the_module_input(tiny_lm, windows):
    from eval.probe import _features

    model, _ = tiny_lm
    transcoder = random_transcoder()
    x, _ = mlp_input_and_output(model, windows)
    features = _features(model, MLP, transcoder, [windows[:4], windows[4:]])
    assert torch.equal(features.neurons, x.flatten(0, 1).T)
    got = torch.zeros(len(features.values), 64).scatter(1, features.indices, features.values)
    assert torch.equal(got, dense_codes(transcoder, x))


def ablated_effect_by_hand(model, transcoder, window, occurrence, horizon):
    """effect_sparsity of removing value_j W_dec[j] at one position from the transcoder's prediction, the
    prediction (from the MLP's input) spliced in place of the MLP's output at positions >= 1: one forward of
    two copies of the window, the second one ablated."""
    row, latent = occurrence.position - 1, occurrence.latent

    def splice(_module, args, output):
        prediction, values, indices = transcoder.reconstruct(args[0][:, 1:].flatten(0, 1))
        prediction = prediction.view(2, -1, prediction.shape[-1])
        prediction[1, row] -= values[row][indices[row] == latent].sum() * transcoder.W_dec[latent]
        return torch.cat([output[:, :1], prediction], 1)

    handle = model.get_submodule(MLP).register_forward_hook(splice)
    try:
        logits = model(input_ids=window.expand(2, -1)).logits[:, occurrence.position : occurrence.position + horizon]
    finally:
        handle.remove()
    return effect_sparsity(logits[1] - logits[0])


@torch.no_grad()
def test_ablation_removes_a_latent_from_the_transcoders_prediction_of_the_module_output(tiny_lm, windows):
    model, _ = tiny_lm
    transcoder = random_transcoder()
    horizon = 4
    occurrences = choose_occurrences(model, MLP, transcoder, windows, n_latents=3, per_latent=1, horizon=horizon)
    assert len(occurrences) == 3
    x, _ = mlp_input_and_output(model, windows)
    codes = dense_codes(transcoder, x).view(*x.shape[:2], 64)
    assert all(codes[o.window, o.position - 1, o.latent] > 0 for o in occurrences)  # it fires on the input there
    effects, _ = ablation_effects(model, MLP, transcoder, windows, occurrences, horizon)
    for occurrence, effect in zip(occurrences, effects):
        expected = ablated_effect_by_hand(model, transcoder, windows[occurrence.window], occurrence, horizon)
        assert effect == pytest.approx(expected, rel=1e-3), occurrence


def save_transcoder(sae, folder, tiny_lm_dir, text_file, hookpoint=MLP):
    return sae.save(folder, metadata={"model": str(tiny_lm_dir), "hookpoint": hookpoint, "ctx_len": 16,
                                      "dataset": str(text_file)})


def test_every_latent_section_runs_on_a_transcoder_and_the_report_says_its_kind(tiny_lm_dir, text_file, tmp_path,
                                                                                  capsys):
    folder = save_transcoder(random_transcoder(), tmp_path / "tc", tiny_lm_dir, text_file)
    out = tmp_path / "report.json"
    [report] = main([str(folder), "--tokens", "480", "--explain", "2", "--simulators", "token-lookup", "--n2g", "2",
                     "--probe", "--ablation", "2", "--ablation_horizon", "4", "--out", str(out)])
    assert (report["kind"], report["transcode"], report["skip_connection"]) == ("skip transcoder", True, True)
    assert json.loads(out.read_text())["kind"] == "skip transcoder"
    assert report["explain"]["neuron_site"] == f"the input of {MLP}.c_proj"
    assert report["explain"]["simulators"]["token-lookup"]["latents"]["units"] == 2
    assert report["ablation_sparsity"]["ablations"] > 0 and report["n2g"]["units"] == 2
    assert len(report["probe"]["tasks"]) + len(report["probe"]["skipped"]) > 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(folder))]
    assert len(rows) == 2 and all("skip transcoder" in row for row in rows)  # comparison and interpretability tables
    from eval.browse.index import sae_facts

    assert "skip transcoder" in sae_facts(json.loads((folder / "cfg.json").read_text()))  # the browser's SAE card


def perfect_transcoder(model, layer: int, wrong: bool = False) -> tuple[SparseAutoencoder, str]:
    """A skip transcoder that computes block `layer`'s attention output projection exactly (GPT-2's Conv1D,
    y = x W + b): W_skip = W^T, b_dec = b, its sparse part zero; `wrong` negates W_skip."""
    module = model.transformer.h[layer].attn.c_proj
    sae = random_transcoder(seed=layer)
    with torch.no_grad():
        sae.W_skip.copy_(-module.weight.T if wrong else module.weight.T)
        sae.b_dec.copy_(module.bias)
        sae.W_dec.zero_()
    return sae, f"transformer.h.{layer}.attn.c_proj"


def test_a_replacement_model_of_perfect_transcoders_changes_nothing_and_a_wrong_one_does(tiny_lm, windows):
    model, _ = tiny_lm
    members = {f"h{layer}": perfect_transcoder(model, layer) for layer in (2, 0, 1)}  # run in the LM's order
    report = replacement_model(members, model, windows, batch_windows=4)
    assert [layer["sae"] for layer in report["layers"]] == ["h0", "h1", "h2"]
    assert abs(report["delta_ce"]) < 1e-5 and abs(report["kl"]) < 1e-6, report
    assert all(layer["fvu"] < 1e-10 and layer["fvu_alone"] < 1e-10 for layer in report["layers"])
    assert report["tokens"] == 10 * 15 and report["ce_positions"] == 10 * 14

    members["h1"] = perfect_transcoder(model, 1, wrong=True)
    report = replacement_model(members, model, windows, batch_windows=4)
    assert abs(report["delta_ce"]) > 1e-5 and report["kl"] > 1e-4
    assert [layer["fvu"] > 1 for layer in report["layers"]] == [False, True, False]


def test_later_transcoders_read_what_the_earlier_replacements_made(tiny_lm, windows):
    """With random transcoders: the first layer's fvu inside the replacement model is its fvu alone (nothing
    before it is replaced); a later one's differs; one transcoder alone is the single splice of the eval."""
    from eval.evaluate import evaluate

    model, _ = tiny_lm
    members = {f"h{layer}": (random_transcoder(seed=layer), f"transformer.h.{layer}.mlp") for layer in range(3)}
    layers = replacement_model(members, model, windows, batch_windows=4)["layers"]
    assert layers[0]["fvu"] == pytest.approx(layers[0]["fvu_alone"], rel=1e-6)
    assert all(layer["fvu"] != pytest.approx(layer["fvu_alone"], rel=1e-3) for layer in layers[1:])

    alone = replacement_model({"h1": members["h1"]}, model, windows, batch_windows=4)
    single = evaluate(members["h1"][0], model, windows, "transformer.h.1.mlp", batch_windows=4)
    assert alone["ce_replaced"] == pytest.approx(single["ce_sae"], rel=1e-5)
    assert alone["kl"] == pytest.approx(single["kl"], rel=1e-4, abs=1e-7)
    assert alone["layers"][0]["fvu"] == pytest.approx(single["fvu"], rel=1e-5)


def test_replace_all_from_a_run_folder_and_its_refusals(tiny_lm_dir, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    for layer in range(3):
        save_transcoder(random_transcoder(seed=layer), run / f"h{layer}", tiny_lm_dir, text_file,
                        hookpoint=f"transformer.h.{layer}.mlp")
    out = tmp_path / "set.json"
    [report] = main([str(run), "--replace_all", "--tokens", "480", "--out", str(out)])
    assert report["replacement_model"] == [str(run / f"h{layer}") for layer in range(3)]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["kl"] > 0 and [layer["kind"] for layer in report["layers"]] == ["skip transcoder"] * 3
    printed = capsys.readouterr().out
    assert "delta_ce=" in printed and printed.count("skip transcoder") == 3

    def refused(argv, match):
        with pytest.raises(UserError, match=match) as error:
            main(argv)
        assert "\n" not in str(error.value)

    sae = random_sae(32).save(tmp_path / "sae", metadata={"model": str(tiny_lm_dir), "hookpoint": MLP, "ctx_len": 16,
                                                           "dataset": str(text_file)})
    refused([str(run / "h0"), str(sae), "--replace_all"], "is not a transcoder")
    twin = save_transcoder(random_transcoder(seed=9), tmp_path / "twin", tiny_lm_dir, text_file)
    refused([str(run), str(twin), "--replace_all"], f"both replace {MLP}")
    other_lm = random_transcoder().save(tmp_path / "other", metadata={
        "model": str(tiny_lm_dir), "model_init": "random", "model_init_seed": 3, "hookpoint": "transformer.h.0.mlp",
        "ctx_len": 16, "dataset": str(text_file)})
    refused([str(run / "h1"), str(other_lm), "--replace_all"], "into one LM")
    other_text = random_transcoder().save(tmp_path / "short", metadata={
        "model": str(tiny_lm_dir), "hookpoint": "transformer.h.0.mlp", "ctx_len": 8, "dataset": str(text_file)})
    refused([str(run / "h1"), str(other_text), "--replace_all"], "on one text")
    refused([str(run), "--replace_all", "--probe"], "per-folder options --probe run without it")
