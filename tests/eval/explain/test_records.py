"""Records: the running top-k equals a full sort; latent and neuron activations equal dense references."""

import torch

from eval.explain.records import (
    NeuronSite, TokenStrings, collect_records, find_mlp_neurons, latent_fire_counts, neuron_activations, sae_latent_activations,
)
from sae import SaeConfig, SparseAutoencoder


def test_running_top_k_equals_a_full_sort_and_random_windows_are_shared():
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (37, 9), generator=generator)
    table = torch.randn(37, 8, 3, generator=generator)  # activations by window id, so we can check
    row_of = {tuple(window.tolist()): row for row, window in enumerate(windows)}

    def activations(input_ids):
        return torch.stack([table[row_of[tuple(window.tolist())]] for window in input_ids])

    records = collect_records(windows, activations, [5, 7, 9], lambda ids: [str(i) for i in ids.tolist()], "latent",
                              n_top=6, n_random=4, batch_windows=5)
    for column, record in enumerate(records):
        order = table[:, :, column].amax(1).argsort(descending=True)[:6]
        assert [excerpt.tokens for excerpt in record.top] == [[str(i) for i in windows[w, 1:].tolist()] for w in order]
        assert [excerpt.activations for excerpt in record.top] == [table[w, :, column].tolist() for w in order]
        assert len(record.random) == 4 and len(record.scoring_top()) == 3 and len(record.explanation_excerpts()) == 3
    assert records[1].unit == 7 and records[1].explanation_excerpts()[0] is records[1].top[0]
    assert records[1].scoring_top()[0] is records[1].top[1]  # scoring never reuses what the explainer saw


def excerpt_windows(excerpts):
    return {excerpt.window for excerpt in excerpts}


def test_no_scoring_excerpt_comes_from_a_window_the_explainer_saw(window_named_records):
    """400 units that each fire in a few of 60 windows: with 5 explanation windows and 20 random ones of
    60, a shared random draw holds some unit's explanation window for most units."""
    n_windows = 60
    records, table = window_named_records(n_windows, 400, 0.15)
    draw = torch.randperm(n_windows, generator=torch.Generator().manual_seed(3)).tolist()
    shared = sorted(draw[:20])
    changed = 0
    for record in records:
        seen = excerpt_windows(record.explanation_excerpts(len(record.top)))
        assert len(seen) == 5 and not seen & (excerpt_windows(record.scoring_top()) | excerpt_windows(record.random))
        random_windows = [excerpt.window for excerpt in record.random]
        assert random_windows == sorted([window for window in draw if window not in seen][:20])  # the draw's next ones
        for excerpt in record.random:
            assert excerpt.tokens[0] == str(excerpt.window)
            assert excerpt.activations == table[excerpt.window, :, record.unit].tolist()
        changed += random_windows != shared
    assert changed > 100  # the case is not rare here


def test_latent_and_neuron_activations_equal_dense_references(tiny_lm):
    model, tokenizer = tiny_lm
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=32, n_latents=40, k=3))
    windows = torch.randint(0, model.config.vocab_size, (4, 10))
    latents = [1, 3, 4, 20, 39]
    got = sae_latent_activations(model, "transformer.h.1", sae, latents)(windows)
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[2][:, 1:]  # block 1's output
        pre = (hidden - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
        top = pre.topk(3, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(got, dense[..., latents], rtol=1e-5, atol=1e-5)
    counts = latent_fire_counts(model, "transformer.h.1", sae, windows, batch_windows=3)
    assert counts.tolist() == (dense > 0).sum((0, 1)).tolist()

    captured = []
    handle = model.transformer.h[1].mlp.act.register_forward_hook(lambda m, i, out: captured.append(out))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    site = find_mlp_neurons(model, "transformer.h.1")
    assert site == NeuronSite("transformer.h.1.mlp.c_proj", "input")
    neurons = neuron_activations(model, site, [0, 17, 127])(windows)
    # GPT-2's neurons are what they were when read as the output of mlp.act: bit for bit
    assert torch.equal(neurons, captured[0][:, 1:, [0, 17, 127]])
    assert torch.equal(neurons, neuron_activations(model, NeuronSite("transformer.h.1.mlp.act", "output"), [0, 17, 127])(windows))
    assert TokenStrings(tokenizer)([windows[0, 0].item()]) == [tokenizer.decode([windows[0, 0].item()])]
