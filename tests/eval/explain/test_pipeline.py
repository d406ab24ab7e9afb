"""explain_and_score: perfect units score 1, shuffled explanations do not; the puzzles' ground truth."""

import json

from eval.explain.explainers import TokenLookupExplainer
from eval.explain.pipeline import derangement, explain_and_score, summarize, write_jsonl
from eval.explain.puzzles import PUZZLES, puzzle_records, run_puzzles
from eval.explain.records import Excerpt, UnitRecords
from eval.explain.simulators import TokenLookupSimulator

WORDS = [" red", " green", " blue", " cat", " dog", " sun", " sea", " sky"]


def one_token_unit(unit: int) -> UnitRecords:
    """A unit that fires (value 3) on exactly one word, WORDS[unit]."""
    def excerpt(seed):
        tokens = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(12)]
        return Excerpt(tokens, [3.0 if token == WORDS[unit] else 0.0 for token in tokens])
    excerpts = sorted((excerpt(seed) for seed in range(40)), key=lambda e: -e.max_activation)
    return UnitRecords(unit, "latent", top=excerpts[:10], random=excerpts[10:30])


def test_token_units_score_one_and_their_shuffled_control_does_not(tmp_path):
    records = [one_token_unit(unit) for unit in range(4)]
    results, summary = explain_and_score(records, TokenLookupExplainer(), {"token-lookup": TokenLookupSimulator()})
    for result in results:
        assert result["scores"]["token-lookup"]["top_and_random"] > 0.999
        assert result["shuffled_scores"]["token-lookup"]["top_and_random"] < 0.5
        assert result["shuffled_explanation_of"] != result["unit"]
    means = summary["token-lookup"]
    assert means["latents"]["mean_score_top_and_random"] > 0.999 and means["latents"]["units"] == 4
    assert means["latents_shuffled"]["mean_score_top_and_random"] < 0.5
    path = write_jsonl(tmp_path / "units.jsonl", results)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["explanation"].startswith("the tokens") and len(lines[0]["excerpts"]["top"]) == 10


def test_derangement_has_no_fixed_points():
    for count in range(2, 9):
        order = derangement(count, seed=count)
        assert sorted(order) == list(range(count)) and all(i != v for i, v in enumerate(order))
    assert summarize([], ["x"]) == {"x": {}}


def test_puzzles_have_true_explanations_and_three_kinds_of_decoys():
    assert len(PUZZLES) >= 12 and len({p.name for p in PUZZLES}) == len(PUZZLES)
    assert all(len(p.decoys) >= 3 and p.explanation not in p.decoys for p in PUZZLES)
    rules = {p.name: p.rule for p in PUZZLES}
    tokens = [" the", " file", " is", " ``", "open", "()", "``", ",", " returns", " None", "\n", " The", " 42", "."]
    assert rules["the"](tokens)[:2] == [1.0, 0.0] and rules["the"](tokens)[11] == 0.0
    assert rules["after-the"](tokens)[:3] == [0.0, 1.0, 0.0]
    assert rules["backquoted"](tokens)[3:7] == [0.0, 1.0, 1.0, 0.0]
    assert rules["after-return"](tokens)[9] == 1.0 and sum(rules["after-return"](tokens)) == 1.0
    assert rules["digits"](tokens)[12] == 1.0 and rules["newline"](tokens)[10] == 1.0
    assert rules["word-length"](tokens)[8] == 7.0 and rules["word-length"](tokens)[0] == 0.0


def test_puzzle_suite_reports_per_simulator(embedded_lm, text_file):
    import torch

    _, tokenizer = embedded_lm
    text = " ".join(json.loads(line)["text"] for line in text_file.read_text().splitlines()[:60])
    ids = tokenizer(text, verbose=False)["input_ids"]
    windows = torch.tensor(ids[: (len(ids) // 16) * 16]).view(-1, 16)
    from eval.explain.records import TokenStrings

    records = puzzle_records(windows, TokenStrings(tokenizer))
    report = run_puzzles(records, {"token-lookup": TokenLookupSimulator()})
    rows = {row["puzzle"]: row for row in report["token-lookup"]["puzzles"]}
    assert len(rows) == len(PUZZLES) and 0 <= report["token-lookup"]["true_is_best"] <= 1
    assert rows["the"]["true"] > 0.99 and rows["the"]["true_is_best"]  # "the" is named exactly; "The" is not it


def test_explain_sae_with_no_live_latent_reports_null_means(tiny_lm, windows):
    import torch

    from eval.explain.choose import SimulatorSet
    from eval.explain.pipeline import explain_sae, explain_table
    from known_saes import random_sae

    model, tokenizer = tiny_lm
    sae = random_sae(model.config.n_embd, n_latents=48, k=4)
    with torch.no_grad():
        sae.encoder.bias.fill_(-1e4)  # no latent ever fires
    section = explain_sae(sae, model, tokenizer, "transformer.h.1", windows, n_units=3,
                          simulators=SimulatorSet("token-lookup,n2g"), neurons=True)
    assert section["mean_score_top_and_random"] is None and section["mean_score_random_only"] is None
    assert section["simulators"]["token-lookup"]["neurons"]["units"] == 3  # the neurons are still explained
    json.dumps(section, allow_nan=False)
    assert explain_table(section).count("\n") >= 2
