"""Ablation sparsity (eval/ablation.py): the metric by hand, batched ablations against one-at-a-time
forwards, and the report section."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import eval.ablation as ablation
from eval.ablation import Occurrence, ablation_effects, ablation_section, choose_occurrences, effect_sparsity
from sae.errors import UsageError

from known_saes import identity_sae, random_sae


class LinearLM(nn.Module):
    """Embedding -> `body` (identity, the hookpoint) -> unembedding [I_d; 0]: hidden coordinate i moves
    logit i alone, and no position sees another."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Identity()
        self.unembed = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            self.unembed.weight.zero_()
            self.unembed.weight[:d] = torch.eye(d)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.unembed(self.body(self.embed(input_ids))))


def _reference_sparsity(delta: torch.Tensor) -> float:
    """The metric in plain Python on float64 numbers (lower median of each row, as torch.median)."""
    rows = delta.double().tolist()
    centred = []
    for row in rows:
        median = sorted(row)[(len(row) - 1) // 2]
        centred += [value - median for value in row]
    l1 = sum(abs(value) for value in centred)
    l2 = math.sqrt(sum(value * value for value in centred))
    return (l1 / l2) ** 2 / len(centred)


def test_effect_sparsity_by_hand():
    one_logit = torch.zeros(3, 7)
    one_logit[1, 4] = -2.5
    assert effect_sparsity(one_logit) == pytest.approx(1 / 21)
    assert effect_sparsity(torch.tensor([[1.0, -1.0, 0.0, 0.0]])) == pytest.approx(0.5)  # median 0: L1 2, L2 sqrt 2
    assert effect_sparsity(torch.full((2, 5), 3.0)) is None  # a constant shift changes no probability
    shifted = torch.tensor([[5.0, 5.0, 5.0, 6.0, 5.0]])  # median 5 removed: one logit left
    assert effect_sparsity(shifted) == pytest.approx(1 / 5)


def test_effect_sparsity_matches_reference_on_random_inputs():
    generator = torch.Generator().manual_seed(3)
    for shape in [(1, 2), (1, 9), (4, 10), (16, 33)]:
        delta = torch.randn(shape, generator=generator)
        assert effect_sparsity(delta) == pytest.approx(_reference_sparsity(delta), rel=1e-12)


@pytest.mark.parametrize("horizon", [1, 4])
def test_a_latent_that_moves_one_logit_scores_one_over_vocab_times_horizon(horizon):
    vocab, d = 11, 3
    torch.manual_seed(0)
    model, sae = LinearLM(vocab, d), identity_sae(d)
    windows = torch.randint(0, vocab, (5, 9))
    occurrences = choose_occurrences(model, "body", sae, windows, n_latents=2 * d, per_latent=3, horizon=horizon)
    assert len(occurrences) > 2 * d  # several per latent, several per window
    effects, measured_vocab = ablation_effects(model, "body", sae, windows, occurrences, horizon)
    assert measured_vocab == vocab
    assert effects == pytest.approx([1 / (vocab * horizon)] * len(occurrences))


def test_occurrences_are_firing_positions_within_the_horizon():
    model, sae = LinearLM(11, 3), identity_sae(3)
    torch.manual_seed(1)
    windows = torch.randint(0, 11, (4, 8))
    occurrences = choose_occurrences(model, "body", sae, windows, n_latents=6, per_latent=100, horizon=3)
    hidden = model.embed(windows)
    for occurrence in occurrences:
        assert 1 <= occurrence.position <= 8 - 3
        values, indices = sae.encode(hidden[occurrence.window, occurrence.position][None])
        assert occurrence.latent in indices[values > 0].tolist()
    # every firing (window, position, latent) in range is found when per_latent is large
    expected = sum(int((sae.encode(hidden[w, 1:6])[0] > 0).sum()) for w in range(4))
    assert len(occurrences) == expected
    with pytest.raises(UsageError, match="horizon 8"):
        choose_occurrences(model, "body", sae, windows, n_latents=6, per_latent=1, horizon=8)


def _one_at_a_time(model, hookpoint, sae, windows, occurrence, horizon):
    """The ablation's effect from two plain forwards with a hook (no batching, no variant stacking)."""
    module = dict(model.named_modules())[hookpoint]

    def run(ablate: bool):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            values, indices = sae.encode(hidden[:, 1:].flatten(0, 1))
            x_hat = sae.decode(values, indices).view_as(hidden[:, 1:]).clone()
            if ablate:
                at = occurrence.position - 1
                flat = at  # one window: row `at` of the flattened batch
                value = values[flat][indices[flat] == occurrence.latent].sum()
                x_hat[0, at] -= value * sae.W_dec[occurrence.latent]
            new = torch.cat([hidden[:, :1], x_hat], dim=1)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
        try:
            return model(input_ids=windows[occurrence.window : occurrence.window + 1]).logits[0]
        finally:
            handle.remove()

    with torch.no_grad():
        span = slice(occurrence.position, occurrence.position + horizon)
        return effect_sparsity(run(True)[span] - run(False)[span])


def test_batched_ablations_equal_one_at_a_time_forwards(tiny_lm, windows, monkeypatch):
    model, _ = tiny_lm
    hookpoint = "transformer.h.1"
    sae = random_sae(model.config.n_embd, n_latents=48, k=4, seed=2).eval()
    occurrences = choose_occurrences(model, hookpoint, sae, windows, n_latents=10, per_latent=3, horizon=5, seed=1)
    occurrences.append(Occurrence(occurrences[0].window, occurrences[0].position, occurrences[0].latent))  # repeated
    monkeypatch.setattr(ablation, "ROWS_PER_FORWARD", 7)  # several forwards, windows of different depths
    effects, _ = ablation_effects(model, hookpoint, sae, windows, occurrences, horizon=5)
    expected = [_one_at_a_time(model, hookpoint, sae, windows, occurrence, 5) for occurrence in occurrences]
    assert effects == pytest.approx(expected, rel=1e-4)
    assert all(0 < effect <= 1 for effect in effects)


def test_batches_respect_the_row_budget(monkeypatch):
    monkeypatch.setattr(ablation, "ROWS_PER_FORWARD", 8)
    by_window = {0: [0], 1: [1, 2, 3], 2: [4], 3: [5], 4: list(range(6, 16))}
    batches = ablation._batches(by_window)
    assert sorted(window for batch in batches for window in batch) == [0, 1, 2, 3, 4]
    for batch in batches:
        depth = max(len(by_window[window]) for window in batch)
        assert len(batch) == 1 or (1 + depth) * len(batch) <= 8


def test_ablation_section_on_the_tiny_lm(tiny_lm, windows):
    model, _ = tiny_lm
    sae = random_sae(model.config.n_embd, n_latents=48, k=4, seed=0)
    section = ablation_section(model, "transformer.h.1", sae, windows, n_latents=6, per_latent=2, horizon=4, seed=0)
    assert section["latents"] == 6 and section["horizon"] == 4 and section["vocab"] == model.config.vocab_size
    assert section["ablations"] + section["no_effect"] <= 12
    values = list(section["per_latent"].values())
    assert section["mean"] == pytest.approx(sum(values) / len(values))
    assert 1 / (4 * model.config.vocab_size) <= section["mean"] <= 1
    assert section["quantiles"]["0.1"] <= section["median"] <= section["quantiles"]["0.9"]
    again = ablation_section(model, "transformer.h.1", sae, windows, n_latents=6, per_latent=2, horizon=4, seed=0)
    assert again == section  # seeded
    chosen = ablation_section(model, "transformer.h.1", sae, windows, n_latents=0, per_latent=2, horizon=4,
                              latents=[int(next(iter(section["per_latent"])))])
    assert list(chosen["per_latent"]) == [next(iter(section["per_latent"]))]


def test_ablation_section_with_no_live_latent_is_strict_json(tiny_lm, windows):
    model, _ = tiny_lm
    sae = random_sae(model.config.n_embd, n_latents=48, k=4, seed=0)
    with torch.no_grad():
        sae.encoder.bias.fill_(-1e4)  # every pre-activation below 0: no latent ever fires
    section = ablation_section(model, "transformer.h.1", sae, windows, n_latents=6, per_latent=2, horizon=4)
    assert section["latents"] == 0 and section["ablations"] == 0 and section["per_latent"] == {}
    assert section["mean"] is None and section["median"] is None and section["mean_over_ablations"] is None
    assert set(section["quantiles"].values()) == {None}
    json.dumps(section, allow_nan=False)  # a missing value is null, never NaN


def test_ablation_of_a_layer_norm_sae_removes_the_latent_in_raw_units(tiny_lm, windows):
    """For an SAE with OpenAI's LayerNorm input transform, the ablated reconstruction is the dense
    reference (codes with latent j zeroed at t, decoded, times the token's std, plus its mean)."""
    from sae.model import SparseAutoencoder, layer_norm_input

    model, _ = tiny_lm
    hookpoint, horizon = "transformer.h.1", 4
    plain = random_sae(model.config.n_embd, n_latents=48, k=4, seed=5)
    sae = SparseAutoencoder.from_state_dict(plain.cfg, plain.state_dict(), input_norm="layer_norm")
    occurrences = choose_occurrences(model, hookpoint, sae, windows, n_latents=4, per_latent=2, horizon=horizon)
    effects, _ = ablation_effects(model, hookpoint, sae, windows, occurrences, horizon)
    module = dict(model.named_modules())[hookpoint]
    W_dec, b_dec = sae.W_dec.double(), sae.b_dec.double()

    def logits(window, ablate=None):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            x = hidden[0, 1:].double()
            values, indices = sae.encode(hidden[0, 1:])
            codes = torch.zeros(x.shape[0], sae.cfg.n_latents, dtype=torch.float64)
            codes.scatter_(1, indices, values.double())
            if ablate is not None:
                codes[ablate.position - 1, ablate.latent] = 0
            _, mean, std = layer_norm_input(x)
            x_hat = (codes @ W_dec + b_dec) * std + mean
            new = torch.cat([hidden[:, :1], x_hat[None].to(hidden.dtype)], dim=1)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(input_ids=windows[window : window + 1]).logits[0]
        finally:
            handle.remove()

    for occurrence, effect in zip(occurrences, effects):
        span = slice(occurrence.position, occurrence.position + horizon)
        expected = effect_sparsity(logits(occurrence.window, occurrence)[span] - logits(occurrence.window)[span])
        assert effect == pytest.approx(expected, rel=1e-3)
