"""Held-out text that is what its label says: an explicit --dataset on a folder that does not say what it
was trained on, one table footer per evaluation text, the training split asked for by name, and rule 4
(past what training read, replayed from cfg.json `text_read`). The leakage check on real training runs
is tests/test_held_out_leakage.py."""

import pytest
import torch

from eval.__main__ import main
from eval.data import held_out_windows
from eval.report import comparison_table
from sae.config import DataConfig
from sae.data import TokenWindows, load_text_dataset, local_file_sizes

from known_saes import random_sae


def sparsify_like_sae(tmp_path, tiny_lm_dir):
    """A folder whose cfg.json names no dataset (as sparsify writes them): what training read is unknown."""
    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16}
    return random_sae(32).save(tmp_path / "sae", metadata=metadata)


def test_explicit_local_dataset_is_read_from_its_validation_split_when_training_text_is_unknown(tiny_lm_dir, text_file,
                                                                                               tmp_path):
    sae_dir = sparsify_like_sae(tmp_path, tiny_lm_dir)
    [report] = main([str(sae_dir), "--dataset", str(text_file), "--tokens", "160"])
    assert report["data"]["split"] == "validation" and "chosen by hash" in report["data"]["held_out"]


def test_the_training_split_by_name_is_read_past_what_training_read_or_refused(tiny_lm_dir, text_file, tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    data = DataConfig(dataset=str(text_file), ctx_len=16)
    with pytest.raises(ValueError, match="split 'train' of .* is the text training reads; name one"):
        held_out_windows(data, tokenizer, n_tokens=160, split="train")  # during training: refused
    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16, "dataset": str(text_file),
                "split": "train", "text_read": text_read_after(data, tokenizer, 10)}
    sae_dir = random_sae(32).save(tmp_path / "sae", metadata=metadata)
    [report] = main([str(sae_dir), "--split", "train", "--tokens", "160"])
    assert "past what training read" in report["data"]["held_out"]
    without_record = random_sae(32).save(tmp_path / "old", metadata={**metadata, "text_read": None})
    with pytest.raises(ValueError, match="is the text training reads, and cfg.json does not record what training read"):
        main([str(without_record), "--split", "train", "--tokens", "160"])


def test_naming_the_split_evaluates_and_says_so(tiny_lm_dir, text_file, tmp_path):
    sae_dir = sparsify_like_sae(tmp_path, tiny_lm_dir)
    [report] = main([str(sae_dir), "--dataset", str(text_file), "--split", "train", "--tokens", "160"])
    assert report["data"]["held_out"] == "split 'train' (as asked)" and report["tokens"] == 10 * 15


def test_a_table_gets_one_footer_per_evaluation_text():
    numbers = dict(l0=4.0, fvu=0.5, nmse=0.4, ce_sae=4.0, delta_ce=0.1, kl=0.1, ce_recovered=0.9,
                   ce_recovered_mean=0.8, never_fired_frac=0.0, never_fired_tokens=100, ce_clean=3.9, ce_zero=9.0,
                   ce_mean=6.0, ce_positions=100)
    reports = [
        {"sae": "a", "model": "m", "hookpoint": "h", "data": {"dataset": "x", "held_out": "split 'validation'"}, **numbers},
        {"sae": "b", "model": "m", "hookpoint": "h", "data": {"dataset": "y", "held_out": "split 'train' (as asked)"}, **numbers},
        {"sae": "c", "model": "m", "hookpoint": "h", "data": {"dataset": "x", "held_out": "split 'validation'"}, **numbers},
    ]
    footers = [line for line in comparison_table(reports).splitlines() if "ce_clean=" in line]
    assert len(footers) == 2 and "(x, split 'validation')" in footers[0] and "(y, split 'train' (as asked))" in footers[1]


def text_read_after(data: DataConfig, tokenizer, windows_read: int, replicas: int = 1) -> dict:
    """The cfg.json `text_read` record of a run whose replicas each trained on their first `windows_read` windows."""
    positions = []
    for replica in range(replicas):
        stream = TokenWindows(load_text_dataset(data, rank=replica, world_size=replicas), tokenizer, data.ctx_len)
        for _ in range(windows_read):
            next(stream)
        positions.append(stream.read_position())
    return {"replicas": replicas, "streams": positions, "file_sizes": local_file_sizes(data)}


def test_rule_four_starts_past_the_furthest_any_sae_read(tiny_lm_dir, text_file, tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    data = DataConfig(dataset=str(text_file), ctx_len=16)
    shorter, longer = text_read_after(data, tokenizer, 10), text_read_after(data, tokenizer, 40)
    windows, source = held_out_windows(data, tokenizer, n_tokens=160, split="train", read_by_training=[longer, shorter])
    assert "training split 'train' past what training read" in source["held_out"] and windows.shape == (10, 16)
    rest = TokenWindows(load_text_dataset(data), tokenizer, 16, loop=False)
    rest.load_state_dict({**longer["streams"][0], "pending": []})  # the first document the longer run did not read
    assert torch.equal(windows, torch.stack([next(rest) for _ in range(10)]))

    metadata = {"model": str(tiny_lm_dir), "hookpoint": "transformer.h.1", "ctx_len": 16, "dataset": str(text_file),
                "split": "train", "text_read": longer}
    [report] = main([str(random_sae(32).save(tmp_path / "sae", metadata=metadata)), "--split", "train", "--tokens", "160"])
    assert report["data"]["held_out"] == source["held_out"]


def test_rule_four_refuses_what_it_cannot_replay(text_file, tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    data = DataConfig(dataset=str(text_file), ctx_len=16)
    record = text_read_after(data, tokenizer, 10)
    with pytest.raises(ValueError, match="is the text training reads; name one"):  # during training: nothing to skip yet
        held_out_windows(data, tokenizer, n_tokens=160, split="train", read_by_training=None)
    with pytest.raises(ValueError, match="does not record what training read.*--split"):  # an older folder
        held_out_windows(data, tokenizer, n_tokens=160, split="train", read_by_training=[record, None])
    with pytest.raises(ValueError, match=r"trained with \[1, 2\] data-parallel replicas.*--split"):
        held_out_windows(data, tokenizer, n_tokens=160, split="train",
                         read_by_training=[record, text_read_after(data, tokenizer, 5, 2)])
    looped = {**record, "streams": [{**record["streams"][0], "epoch": 1}]}  # training read the whole file
    with pytest.raises(ValueError, match="no held-out text"):
        held_out_windows(data, tokenizer, n_tokens=160, split="train", read_by_training=[looped])

    changed = tmp_path / "docs.jsonl"
    changed.write_text(text_file.read_text())
    changed_data = DataConfig(dataset=str(changed), ctx_len=16)
    record = text_read_after(changed_data, tokenizer, 10)
    with changed.open("a") as file:
        file.write('{"text": "one more document"}\n')
    with pytest.raises(ValueError, match="files changed since training.*--split"):
        held_out_windows(changed_data, tokenizer, n_tokens=160, split="train", read_by_training=[record])
