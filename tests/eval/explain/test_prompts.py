"""The explainer and simulator prompts: 0-10 scaling, escaping, repeated non-zero lines, slots."""

from eval.explain.prompts import UNKNOWN, clean_explanation, escape, explainer_prompt, scale_to_digits, simulator_prompt
from eval.explain.records import Excerpt


def test_scale_to_digits():
    assert scale_to_digits([-3.0, 0.0, 1.0, 2.5, 5.0], 5.0) == [0, 0, 2, 5, 10]
    assert scale_to_digits([0.0, -1.0], 0.0) == [0, 0]


def test_tokens_with_tabs_and_newlines_stay_on_one_line():
    assert escape("a\tb\nc\\") == "a\\tb\\nc\\\\"
    prompt, slots = simulator_prompt("tabs", ["x", "\t", "\n\n", "y"])
    block = prompt[prompt.index("<start>", prompt.index("tabs")) :]
    assert block.count("\n") == len(["<start>", "x", "\t", "\n\n", "y", "<end>"])
    assert [prompt[slot : slot + len(UNKNOWN)] for slot in slots] == [UNKNOWN] * 4
    assert all(prompt[slot - 1] == "\t" for slot in slots)


def test_explainer_prompt_shows_scaled_excerpts_and_repeats_sparse_lines():
    sparse = Excerpt([" a", " b", " c", " d", " e", " f"], [0.0, 0.0, 4.0, 0.0, 0.0, -1.0])
    dense = Excerpt([" x", " y"], [8.0, 2.0])
    prompt = explainer_prompt([sparse, dense], unit="neuron")
    assert prompt.endswith("Explanation of neuron 3: the main thing this neuron does is find")
    question = prompt[prompt.index("Neuron 3") :]
    assert " c\t5\n" in question and " f\t0\n" in question and " x\t10\n" in question  # max over excerpts -> 10
    assert question.count("only the tokens with non-zero values") == 1  # the sparse excerpt only
    assert question.split("only the tokens with non-zero values:\n")[1].startswith(" c\t5\n\n")


def test_clean_explanation():
    assert clean_explanation(" numbers in tables.\nLatent 4") == "numbers in tables"
    assert clean_explanation("") == ""
    assert clean_explanation("The main thing this latent does is find file paths.") == "file paths"
