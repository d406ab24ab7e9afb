"""The LLM scorer of detection and fuzzing against the fake OpenAI-compatible server of test_http.py: one
echo request per batch of excerpts, P(" yes") renormalised over " yes" and " no" read at each answer's
slot, a rerun answered by the cache; and on a local transformers LM, the same as a manual softmax."""

import math
import re

import pytest
import torch
from test_http import COMPLETIONS, Reply, local_only, make_backend, server  # noqa: F401 (fixtures)

from eval.explain.backends import TransformersBackend
from eval.explain.classifiers import LLMScorer
from eval.explain.detection import detection_scores, fuzzing_questions
from eval.explain.explainers import Explanation
from eval.explain.prompts import ANSWERS, MARK_CLOSE, MARK_OPEN, UNKNOWN, marked_text, yes_no_prompt
from eval.explain.records import Excerpt, UnitRecords


def toy_tokens(text: str) -> list[re.Match]:
    """A toy tokenizer: tabs, newlines, and words with their leading space."""
    return list(re.finditer(r"\t|\n| ?[^\t\n ]+| ", text))


def yes_logprob(line: str) -> float:
    """The toy model's log P(" yes") after a "Text N: ..." line: sure when it holds " the", else not."""
    return -0.1 if " the" in line else -3.0


NO_LOGPROB = -1.0


def toy_echo(request: dict) -> dict:
    """An echo reply to a yes/no prompt: at each " unknown" answer, logprobs of " yes" and " no" from the
    text line before it; elsewhere entries that hold neither."""
    prompt = request["prompt"]
    pieces = toy_tokens(prompt)
    top = [None]
    for piece in pieces[1:]:
        if piece.group() == " " + UNKNOWN:
            line = prompt[: piece.start()].rsplit("Text ", 1)[1]
            top.append({" yes": yes_logprob(line), " no": NO_LOGPROB, " maybe": -0.5})
        else:
            top.append({piece.group(): -0.05, " no": -6.0})
    logprobs = {"tokens": [p.group() for p in pieces], "top_logprobs": top, "text_offset": [p.start() for p in pieces]}
    return {"choices": [{"index": 0, "text": prompt, "logprobs": logprobs}]}


def p_yes(line: str) -> float:
    yes, no = math.exp(yes_logprob(line)), math.exp(NO_LOGPROB)
    return yes / (yes + no)


def unit_on_the() -> UnitRecords:
    """Fires on " the": top excerpts hold it; of the 12 random ones, the odd ones."""
    def excerpt(index: int, with_the: bool) -> Excerpt:
        tokens = [" a", " cat", " the" if with_the else " dog", " sat", "\n", f" x{index}"]
        return Excerpt(tokens, [3.0 if token == " the" else 0.0 for token in tokens], index)

    return UnitRecords(0, "latent", [excerpt(i, True) for i in range(10)], [excerpt(10 + i, i % 2 == 1) for i in range(12)])


def test_one_request_per_batch_and_p_yes_from_the_logprobs(server, tmp_path):  # noqa: F811
    server.always(COMPLETIONS, Reply(body=toy_echo))
    backend = make_backend(server, cache_dir=tmp_path / "cache", top_logprobs=5)
    scorer = LLMScorer(backend, batch_size=4)
    records = unit_on_the()
    metrics = detection_scores(records, Explanation('the word "the"'), scorer)

    n_questions = 5 + 12  # odd-rank top excerpts and the random ones
    assert (metrics["positives"], metrics["negatives"]) == (5 + 6, 6)
    assert metrics["balanced_accuracy"] == 1.0 and metrics["auc"] == 1.0
    bodies = [seen.body for seen in server.requests]
    assert len(bodies) == math.ceil(n_questions / 4) == 5 and server.probes == 0  # no "10" probe: no digits read
    for body in bodies:
        assert body["echo"] is True and body["max_tokens"] == 1 and body["logprobs"] == 5 and body["model"] == "test-model"
        assert 'find the word "the".' in body["prompt"]
    assert sorted(body["prompt"].count("\nAnswer: " + UNKNOWN) for body in bodies) == [1, 4, 4, 4, 4]

    excerpts = [["a", " the", "\tb"], [" dog", "\n"]]
    scores = scorer.detect(Explanation("x"), excerpts)
    assert scores == pytest.approx([p_yes(marked_text(tokens)) for tokens in excerpts], abs=1e-12)
    marks = [[False, True, False], [True, False]]
    fuzzed = scorer.fuzz(Explanation("x"), excerpts, marks)
    assert fuzzed == pytest.approx([p_yes(f"a{MARK_OPEN} the{MARK_CLOSE}\\tb"), p_yes(f"{MARK_OPEN} dog{MARK_CLOSE}\\n")])

    seen = server.count()
    again = detection_scores(records, Explanation('the word "the"'), LLMScorer(make_backend(server, cache_dir=tmp_path / "cache",
                                                                                           top_logprobs=5), batch_size=4))
    assert again == metrics and server.count() == seen  # the cache answers a rerun


def test_fuzzing_prompts_mark_tokens_and_put_a_slot_after_each_text():
    records = unit_on_the()
    questions = fuzzing_questions(records)
    prompt, slots = yes_no_prompt("x", [q.tokens for q in questions], [q.marks for q in questions], "neuron")
    assert len(slots) == len(questions) and all(prompt[slot:].startswith(" " + UNKNOWN + "\n") for slot in slots)
    assert prompt.count(f"{MARK_OPEN} the{MARK_CLOSE}") >= sum(q.label for q in questions)
    assert "this neuron does is find x." in prompt and "\\n" in prompt and prompt.count("\n") > len(questions)


def test_answers_missing_from_the_top_logprobs_raise(server):  # noqa: F811
    def no_answers(request):
        reply = toy_echo(request)
        reply["choices"][0]["logprobs"]["top_logprobs"] = [None] + [{"x": -1.0}] * (len(reply["choices"][0]["logprobs"]["tokens"]) - 1)
        return reply

    server.always(COMPLETIONS, Reply(body=no_answers))
    with pytest.raises(ValueError, match="' no'..' yes' is among the top"):
        LLMScorer(make_backend(server)).detect(Explanation("x"), [[" a"]])


def test_local_backend_answers_equal_a_manual_softmax(lm_ten_one_token):
    backend = TransformersBackend(str(lm_ten_one_token))
    with pytest.raises(ValueError, match="not one token each"):
        backend.answer_distributions("word1\t", [6], list(ANSWERS) + ["word1\tword2"])
    prompt = "word1\t3\nword2\t5\nword3\t7\n"
    slots = [prompt.index(digit) for digit in "357"]
    answers = ["3", "5"]
    got = backend.answer_distributions(prompt, slots, answers)
    encoding = backend.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    ids = [backend.tokenizer.encode(answer)[0] for answer in answers]
    with torch.no_grad():
        for slot, distribution in zip(slots, got):
            position = starts.index(slot)
            probs = backend.model(input_ids=torch.tensor([encoding["input_ids"][:position]])).logits[0, -1].double().softmax(-1)
            expected = probs[ids] / probs[ids].sum()
            assert distribution == pytest.approx(expected.tolist(), abs=1e-5)
