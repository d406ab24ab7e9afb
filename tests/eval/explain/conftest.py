"""Fixtures for the explain tests: small causal LMs whose tokenizers have "10" as one token or as two."""

import pytest
import torch


def _digit_lm(path, merge_ten: bool):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    lines = [f"word{i % 7}\t{i % 10}\n" for i in range(400)]
    if merge_ten:
        lines += ["x\t10\n"] * 400  # frequent enough that BPE merges "1" "0" into one token
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=280, special_tokens=["<|endoftext|>"])
    path.mkdir(parents=True)
    bpe.save(str(path / "tokenizer.json"))
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=2048, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    assert (len(tokenizer.encode("10")) == 1) == merge_ten
    return path


@pytest.fixture(scope="session")
def lm_ten_one_token(tmp_path_factory):
    return _digit_lm(tmp_path_factory.mktemp("lm") / "ten-one", merge_ten=True)


@pytest.fixture(scope="session")
def lm_ten_two_tokens(tmp_path_factory):
    return _digit_lm(tmp_path_factory.mktemp("lm") / "ten-two", merge_ten=False)
