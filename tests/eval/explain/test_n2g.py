"""N2G: synthetic units with known rules recover their patterns and score precision and recall 1; the
trie simulator on hand-made tries; batched rows equal unbatched ones on a real LM; n2g_section end to end."""

import math

import pytest
import torch

from eval.explain.n2g import (
    WILDCARD, N2GExplainer, N2GExplanation, N2GSimulator, PatternTrie, context_and_pad_ids, firing_precision_recall,
    last_token_activations, n2g_report, n2g_section, pattern_text,
)
from eval.explain.pipeline import explain_and_score
from eval.explain.units import latent_records
from eval.explain.records import Excerpt, UnitRecords, collect_records, sae_latent_activations
from tests.eval.known_saes import random_sae

CONTEXT, PAD, X, Y, Z = 0, 1, 2, 3, 4
FILLERS = list(range(5, 9))
NAMES = {CONTEXT: "<s>", PAD: "<pad>", X: " X", Y: " Y", Z: " Z", **{f: f" f{f}" for f in FILLERS}}


def token_strings(ids):
    return [NAMES[int(i)] for i in ids]


def fires_after(first: int, then: int, distance: int, value: float):
    """A rule over (B, T) ids: `value` at `then` when `first` is `distance` tokens before it (0: anywhere)."""
    def rule(ids):
        out = torch.zeros(ids.shape)
        if distance == 0:
            return torch.where(ids == then, value, 0.0)
        out[:, distance:] = torch.where((ids[:, distance:] == then) & (ids[:, :-distance] == first), value, 0.0)
        return out
    return rule


RULES = {"x after y": fires_after(Y, X, 1, 2.0), "x anywhere": fires_after(None, X, 0, 1.5),
         "x two after y": fires_after(Y, X, 2, 3.0), "z anywhere": fires_after(None, Z, 0, 1.0)}


def rule_activations(rules):
    """A UnitActivations from rules over token ids: (B, T) -> (B, T - 1, n_rules), position 0 dropped."""
    return lambda input_ids: torch.stack([rule(input_ids) for rule in rules], -1)[:, 1:]


@pytest.fixture(scope="module")
def synthetic():
    """Windows of random X, Y, Z and fillers (position 0 always a filler) and the rule units' records."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor([X, Y, Z] + FILLERS)
    windows = tokens[torch.randint(0, len(tokens), (60, 20), generator=generator)]
    windows[:, 0] = FILLERS[0]  # the simulator never sees position 0, so no rule may depend on it
    activations = rule_activations(list(RULES.values()))
    units = [10, 11, 12, 13]
    records = collect_records(windows, activations, units, token_strings, "latent", batch_windows=7)
    explainer = N2GExplainer(activations, units, windows, token_strings, CONTEXT, PAD, token_budget=50)
    return windows, records, explainer.explain_many(records)


def test_the_windows_hold_decoys_for_every_rule(synthetic):
    windows, _, _ = synthetic
    after_y = windows[:, 1:] == X
    assert (after_y & (windows[:, :-1] == Y)).sum() >= 10  # the patterns
    assert (after_y & (windows[:, :-1] != Y)).sum() >= 10  # X without Y before it
    assert ((windows[:, :-1] == Y) & (windows[:, 1:] != X)).sum() >= 10  # Y without X after it
    assert ((windows[:, 2:] == X) & (windows[:, :-2] == Y) & (windows[:, 1:-1] != Y)).sum() >= 5


def test_rules_are_recovered_exactly_and_score_one(synthetic):
    windows, records, explanations = synthetic
    expected = [((" Y", " X"), 2.0), ((" X",), 1.5), ((" Y", WILDCARD, " X"), 3.0), ((" Z",), 1.0)]
    for record, explanation, pattern in zip(records, explanations, expected):
        assert explanation.trie.patterns() == [pattern]
        assert explanation.unexplained_excerpts == 0
    assert explanations[0].text == "« Y» « X»" and explanations[2].text == "« Y» * « X»"
    report = n2g_report(records, explanations, seed=0)
    for entry in report["per_unit"]:
        assert entry["precision"] == 1.0 and entry["recall"] == 1.0 and entry["flags"] == []
        assert entry["true_firing"] > 5  # the scoring excerpts really hold firings
    assert report["precision"] == report["recall"] == 1.0 and report["units"] == 4


def test_shuffled_control_scores_lower(synthetic):
    _, records, explanations = synthetic
    pair = [records[1], records[3]]  # X anywhere, Z anywhere: each other's tries never fire right
    report = n2g_report(pair, [explanations[1], explanations[3]], seed=0)
    assert report["precision"] == report["recall"] == 1.0
    assert report["precision_shuffled"] == report["recall_shuffled"] == 0.0
    assert [entry["shuffled"]["trie_of"] for entry in report["per_unit"]] == [13, 11]
    # X after Y scored with X anywhere: every true firing is predicted, far more are predicted than true
    looser = n2g_report([records[0], records[1]], [explanations[0], explanations[1]], seed=0)["per_unit"][0]["shuffled"]
    assert looser["recall"] == 1.0 and looser["precision"] < 0.5


def test_n2g_runs_inside_the_explain_pipeline(synthetic):
    windows, records, _ = synthetic
    activations = rule_activations(list(RULES.values()))
    explainer = N2GExplainer(activations, [10, 11, 12, 13], windows, token_strings, CONTEXT, PAD)
    results, summary = explain_and_score(records, explainer, {"n2g": N2GSimulator()})
    assert [result["explanation"] for result in results][:2] == ["« Y» « X»", "« X»"]
    assert all(result["scores"]["n2g"]["top_and_random"] > 0.999 for result in results)
    assert summary["n2g"]["latents_shuffled"]["mean_score_top_and_random"] < 0.5


def test_trie_predicts_the_max_over_full_matches():
    trie = PatternTrie()
    trie.add(("a", "b"), 2.0)
    trie.add(("b",), 1.0)
    trie.add(("a", WILDCARD, "c"), 3.0)
    trie.add(("a", WILDCARD, "c"), 0.5)  # the node keeps the max
    trie.add((WILDCARD, "d"), 4.0)  # d with any token before it
    assert trie.predict(["a", "b", "x", "c", "a", "x", "c"]) == [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    assert trie.predict(["b", "a", "b", "c"]) == [1.0, 0.0, 2.0, 3.0]  # "b" matches as the wildcard of a * c
    assert trie.predict(["d", "x", "d"]) == [0.0, 0.0, 4.0]  # a pattern longer than the text so far never matches
    assert trie.predict([]) == []
    assert trie.patterns() == [((WILDCARD, "d"), 4.0), (("a", WILDCARD, "c"), 3.0), (("a", "b"), 2.0), (("b",), 1.0)]
    assert pattern_text(("def", WILDCARD, "\n(")) == "«def» * «\\n(»"
    with pytest.raises(ValueError, match="firing token"):
        trie.add(("a", WILDCARD), 1.0)
    explanation = N2GExplanation.from_trie(trie)
    assert N2GSimulator().simulate(explanation, [["x", "d"], ["b"]]) == [[0.0, 4.0], [1.0]]
    assert N2GExplanation.from_trie(PatternTrie()).text == "no pattern"


def test_precision_and_recall_by_hand_and_their_conventions():
    got = firing_precision_recall([[0.0, 1.0, 2.0], [0.0, 3.0]], [[1.0, 1.0, 0.0], [0.0, 0.0]])
    assert (got["precision"], got["recall"], got["predicted_firing"], got["true_firing"]) == (0.5, 1 / 3, 2, 3)
    silent = firing_precision_recall([[1.0, 0.0]], [[0.0, 0.0]])
    assert silent["precision"] == 0.0 and silent["recall"] == 0.0 and silent["flags"] == ["no predicted firing"]
    nothing = firing_precision_recall([[0.0, 0.0]], [[2.0, 0.0]])
    assert nothing["precision"] == 0.0 and nothing["recall"] == 0.0 and nothing["flags"] == ["no true firing"]
    with pytest.raises(ValueError):
        firing_precision_recall([[1.0]], [[1.0, 0.0]])
    top = [Excerpt([" X"], [1.0], window=None)] * 4  # no pattern: both flags counted, no NaN in the means
    report = n2g_report([UnitRecords(5, "latent", top, [])], [N2GExplanation.from_trie(PatternTrie())])
    assert report["precision"] == 0.0 and report["flagged_no_predicted_firing"] == 1 and report["flagged_no_true_firing"] == 0
    assert report["precision_shuffled"] is None and "shuffled" not in report["per_unit"][0]
    assert n2g_report([], [])["precision"] is None


def test_explainer_refuses_excerpts_without_or_with_the_wrong_window(synthetic):
    windows, records, _ = synthetic
    explainer = N2GExplainer(rule_activations([RULES["x anywhere"]]), [11], windows, token_strings, CONTEXT, PAD)
    top = records[1].top
    with pytest.raises(ValueError, match="does not name its window"):
        explainer.explain(UnitRecords(11, "latent", [Excerpt(e.tokens, e.activations) for e in top], []))
    with pytest.raises(ValueError, match="does not hold the excerpt's tokens"):
        explainer.explain(UnitRecords(11, "latent", [Excerpt(e.tokens, e.activations, (e.window + 1) % len(windows)) for e in top], []))
    with pytest.raises(ValueError, match="not among"):
        explainer.explain(records[0])


def test_batched_right_padded_rows_equal_each_row_alone(tiny_lm):
    model, tokenizer = tiny_lm
    sae = random_sae(32, n_latents=64, k=8, seed=3)
    activations = sae_latent_activations(model, "transformer.h.1", sae, [0, 5, 9, 63])
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist() for length in (2, 7, 3, 16, 5, 2, 11)]
    columns = [0, 1, 2, 3, 0, 1, 2]
    context, pad = context_and_pad_ids(tokenizer)
    with torch.no_grad():
        batched = last_token_activations(activations, rows, columns, pad, token_budget=40)
        alone = [activations(torch.tensor([row]))[0, -1, column].item() for row, column in zip(rows, columns)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert context == pad == tokenizer.eos_token_id


def test_n2g_section_end_to_end_on_the_tiny_lm(tiny_lm, windows):
    model, tokenizer = tiny_lm
    sae = random_sae(32, n_latents=64, k=4)
    section = n2g_section(model, tokenizer, sae, "transformer.h.1", windows, n_units=5, seed=0, batch_windows=4)
    chosen = [record.unit for record in latent_records(model, tokenizer, sae, "transformer.h.1", windows, 5, seed=0)]
    assert section["units"] == 5 and [entry["unit"] for entry in section["per_unit"]] == chosen
    for key in ("precision", "recall", "precision_shuffled", "recall_shuffled"):
        assert math.isfinite(section[key]) and 0.0 <= section[key] <= 1.0
    for entry in section["per_unit"]:
        assert entry["n_patterns"] >= 1 and entry["patterns"] != "no pattern" and entry["true_firing"] > 0
        assert 0.0 <= entry["precision"] <= 1.0 and 0.0 <= entry["recall"] <= 1.0
    again = n2g_section(model, tokenizer, sae, "transformer.h.1", windows, n_units=5, latents=chosen, seed=0, batch_windows=4)
    assert again == section  # the same latents given explicitly: the same report
