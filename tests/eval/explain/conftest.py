"""Fixtures for the explain tests: small causal LMs whose tokenizers have "10" as one token or as two."""

import pytest


def _digit_lm(save_tiny_gpt2, path, merge_ten: bool):
    lines = [f"word{i % 7}\t{i % 10}\n" for i in range(400)]
    if merge_ten:
        lines += ["x\t10\n"] * 400  # frequent enough that BPE merges "1" "0" into one token
    save_tiny_gpt2(path, lines, vocab_size=280, n_positions=2048, n_layer=2, seed=1)
    from transformers import AutoTokenizer

    assert (len(AutoTokenizer.from_pretrained(path).encode("10")) == 1) == merge_ten
    return path


@pytest.fixture(scope="session")
def lm_ten_one_token(tmp_path_factory, tiny_gpt2_factory):
    return _digit_lm(tiny_gpt2_factory, tmp_path_factory.mktemp("lm") / "ten-one", merge_ten=True)


@pytest.fixture(scope="session")
def lm_ten_two_tokens(tmp_path_factory, tiny_gpt2_factory):
    return _digit_lm(tiny_gpt2_factory, tmp_path_factory.mktemp("lm") / "ten-two", merge_ten=False)
