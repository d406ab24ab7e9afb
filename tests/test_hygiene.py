"""Token hygiene in training: the rows of special tokens (and, when asked, of outlier norms) never reach a
batch, every other row of a block does exactly once, a resumed stream drops the same rows, and the run
records what it did in cfg.json."""

import json

import pytest
import torch

from sae.activations import ActivationStream, WindowRows
from sae.config import ConfigError, SaeConfig, parse_args
from sae.hygiene import excluded_ids, norm_keep_mask, special_token_ids, token_keep_mask

H = "h"
EOS = 7


class TokenSource:
    """Windows of random token ids (EOS every few tokens) whose one-column activation is the row's
    number, plus a million where the token is 3: rows can be told apart and some have outlier norms."""

    def __init__(self, ctx_len: int = 9, seed: int = 0):
        self.ctx_len, self.hookpoints, self.next_window, self.seed = ctx_len, [H], 0, seed

    def next_activations(self, n_windows: int) -> WindowRows:
        rows = n_windows * (self.ctx_len - 1)
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.next_window)
        token_ids = torch.randint(0, 10, (rows,), generator=generator)
        number = torch.arange(rows, dtype=torch.float32) + 1 + 1000 * self.next_window
        values = torch.where(token_ids == 3, number + 1e6, number)
        self.next_window += n_windows
        return WindowRows([torch.stack([values, token_ids.float()], dim=1)], token_ids)

    def state_dict(self) -> dict:
        return {"next_window": self.next_window}

    def load_state_dict(self, state: dict) -> None:
        self.next_window = state["next_window"]


def block_rows(excluded, ratio):
    """The rows of the source's first block (20 windows) that the hygiene keeps, as (value, token) pairs."""
    (rows,), token_ids = TokenSource().next_activations(20)
    keep = token_keep_mask(token_ids, excluded)
    kept = rows[keep]
    if ratio:
        median = kept.norm(dim=-1).median()
        kept = kept[kept.norm(dim=-1) <= ratio * median]
    return kept


@pytest.mark.parametrize("ratio", [0.0, 50.0])
def test_a_block_hands_out_every_kept_row_once_and_no_excluded_one(ratio):
    stream = ActivationStream(TokenSource(), batch_size=10, shuffle_buffer_tokens=160, seed=1,
                              excluded_token_ids=[EOS], outlier_norm_ratio=ratio)
    expected = block_rows([EOS], ratio)
    batches = [next(stream)[H] for _ in range(len(expected) // 10)]
    assert stream.block_index == 0 and stream.batches_in_block == len(expected) // 10 < stream.batches_per_block
    handed = torch.cat(batches)
    assert not bool((handed[:, 1] == EOS).any())
    assert len(handed.unique(dim=0)) == len(handed)  # each row at most once
    assert set(map(tuple, handed.tolist())) <= set(map(tuple, expected.tolist()))
    assert bool((handed[:, 1] == 3).any()) == (ratio == 0)  # the rows of token 3 are the outliers
    next(stream)
    assert stream.block_index == 1


def test_without_hygiene_the_stream_is_the_one_of_old_runs():
    plain = ActivationStream(TokenSource(), batch_size=10, shuffle_buffer_tokens=160, seed=1)
    off = ActivationStream(TokenSource(), batch_size=10, shuffle_buffer_tokens=160, seed=1, excluded_token_ids=[],
                           outlier_norm_ratio=0.0)
    for _ in range(40):
        assert torch.equal(next(plain)[H], next(off)[H])
    assert plain.batches_in_block == plain.batches_per_block


def test_a_resumed_stream_drops_the_same_rows_and_hands_out_the_same_batches():
    def stream():
        return ActivationStream(TokenSource(), batch_size=10, shuffle_buffer_tokens=160, seed=1,
                                excluded_token_ids=[EOS, 0], outlier_norm_ratio=20.0)

    reference = stream()
    expected = [next(reference)[H] for _ in range(40)]
    for stop in (0, 5, 13, 27):
        first = stream()
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = stream()
        resumed.load_state_dict(state)
        for index in range(stop, 40):
            assert torch.equal(next(resumed)[H], expected[index]), (stop, index)


def test_a_text_of_only_excluded_tokens_is_one_line():
    stream = ActivationStream(TokenSource(), batch_size=10, shuffle_buffer_tokens=160,
                              excluded_token_ids=list(range(10)))
    with pytest.raises(ValueError, match="special tokens"):
        next(stream)


def test_the_outlier_rule_is_against_the_median_of_the_kept_rows_at_every_hookpoint():
    first = torch.tensor([[1.0], [2.0], [3.0], [100.0], [2.5]])
    second = torch.tensor([[1.0], [1.0], [50.0], [1.0], [1.0]])
    keep = torch.tensor([True, True, True, True, False])
    # medians of the kept rows' norms: first 2.0 (lower median of 1, 2, 3, 100), second 1.0
    assert norm_keep_mask([first, second], keep, 10.0).tolist() == [True, True, False, False, False]
    assert norm_keep_mask([first, second], keep, 0.0).tolist() == keep.tolist()


def test_special_tokens_are_bos_eos_and_pad(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    tokenizer.pad_token = tokenizer.unk_token = None
    assert special_token_ids(tokenizer) == [tokenizer.eos_token_id]  # GPT-2: BOS = EOS, no pad
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert special_token_ids(tokenizer) == sorted({tokenizer.eos_token_id, tokenizer.pad_token_id})
    assert excluded_ids(tokenizer, False) == []


def test_the_ratio_must_be_off_or_above_one():
    with pytest.raises(ConfigError, match="outlier_norm_ratio"):
        parse_args(["--data.outlier_norm_ratio", "0.5"])
    assert parse_args(["--data.outlier_norm_ratio", "8"]).data.outlier_norm_ratio == 8.0


def test_a_run_leaves_out_the_separator_and_records_its_hygiene(tmp_path, tiny_lm_dir, text_file, monkeypatch):
    from transformers import AutoTokenizer

    from sae.trainer import train
    from tiny_runs import tiny_run_config

    eos = AutoTokenizer.from_pretrained(str(tiny_lm_dir)).eos_token_id
    fed = []
    original = ActivationStream._fill_block

    def recording_fill(self, block_index):
        original(self, block_index)
        fed.append(self.excluded_token_ids)

    monkeypatch.setattr(ActivationStream, "_fill_block", recording_fill)
    out = train(tiny_run_config(tiny_lm_dir, text_file, tmp_path, "run", 64 * 3, SaeConfig(n_latents=32, k=4)))
    assert fed and all(ids == [eos] for ids in fed)
    recorded = json.loads((out / "cfg.json").read_text())
    assert recorded["exclude_special_tokens"] is True and recorded["outlier_norm_ratio"] == 0.0
