"""The all-at-once simulator on a local transformers LM: expected values equal a manual softmax over
the digit tokens, read at the right positions, whether "10" is one token or two."""

import pytest
import torch

from eval.explain.backends import TransformersBackend
from eval.explain.explainers import Explanation, LLMExplainer
from eval.explain.prompts import simulator_prompt
from eval.explain.records import Excerpt, UnitRecords
from eval.explain.simulators import LLMSimulator

TOKENS = [" The", " value", "\t", " is", " 42", "\n", "."]  # a tab and a newline inside tokens


def manual_expected_values(model_dir, tokens, explanation):
    """For each slot: one forward on the prompt up to the slot (and, for a two-token "10", one more
    with "1" appended), softmax, the digits' probabilities renormalised, the expected value."""
    backend = TransformersBackend(str(model_dir))
    tokenizer, model = backend.tokenizer, backend.model
    prompt, slots = simulator_prompt(explanation, tokens)
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    starts = [start for start, _ in encoding["offset_mapping"]]
    digit = [tokenizer.encode(str(value)) for value in range(11)]
    expected = []
    with torch.no_grad():
        for slot in slots:
            position = starts.index(slot)
            assert prompt[slot:].startswith("unknown") and prompt[slot - 1] == "\t"
            probs = model(input_ids=torch.tensor([ids[:position]])).logits[0, -1].double().softmax(-1)
            p = [probs[digit[value][0]].item() for value in range(10)]
            if len(digit[10]) == 1:
                p.append(probs[digit[10][0]].item())
            else:
                after_one = model(input_ids=torch.tensor([ids[:position] + digit[1]])).logits[0, -1].double().softmax(-1)
                p.append(p[1] * after_one[digit[0][0]].item())
                p[1] -= p[10]
            expected.append(sum(value * q for value, q in enumerate(p)) / sum(p))
    return expected


@pytest.mark.parametrize("fixture", ["lm_ten_one_token", "lm_ten_two_tokens"])
def test_simulator_expected_values_equal_manual_softmax(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    backend = TransformersBackend(str(model_dir))
    assert backend.ten_is_one_token == (fixture == "lm_ten_one_token")
    simulated = LLMSimulator(backend).simulate(Explanation("numbers"), [TOKENS, TOKENS[:3]])
    assert len(simulated[0]) == len(TOKENS) and len(simulated[1]) == 3
    expected = manual_expected_values(model_dir, TOKENS, "numbers")
    torch.testing.assert_close(torch.tensor(simulated[0]), torch.tensor(expected, dtype=torch.float64).float(), rtol=1e-4, atol=1e-4)
    assert all(0 <= value <= 10 for value in simulated[0])


def test_slot_that_is_not_a_token_start_is_a_clear_error(lm_ten_one_token):
    backend = TransformersBackend(str(lm_ten_one_token))
    prompt, _ = simulator_prompt("numbers", [" a"])
    offsets = backend.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    inside = next(start + 1 for start, end in offsets if end - start >= 2)  # not where a token begins
    with pytest.raises(ValueError, match=f"slot offset {inside}"):
        backend.digit_distributions(prompt, [inside])


def test_llm_explainer_returns_the_cleaned_first_line(lm_ten_one_token):
    backend = TransformersBackend(str(lm_ten_one_token))
    records = UnitRecords(3, "latent", top=[Excerpt([" a", " b"], [0.0, 2.0])] * 6, random=[])
    explanation = LLMExplainer(backend, max_tokens=8).explain(records)
    assert "\n" not in explanation.text and explanation.token_values is None
