"""Text -> token windows: local files through `datasets` streaming, their hash-chosen splits, exact state,
clear errors."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from sae.config import DataConfig
from sae.data import TokenWindows, load_text_dataset
from sae.splits import document_split


@pytest.fixture()
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_windows_are_the_concatenated_documents(text_file, tokenizer):
    dataset = load_text_dataset(DataConfig(dataset=str(text_file)))
    windows = TokenWindows(dataset, tokenizer, ctx_len=16, loop=False)
    produced = torch.cat(list(windows)).tolist()
    expected = []
    for text in (json.loads(line)["text"] for line in text_file.read_text().splitlines()):
        if document_split(text) != "train":
            continue
        expected += tokenizer(text, add_special_tokens=False)["input_ids"]
        expected.append(tokenizer.eos_token_id)
    assert len(produced) == len(expected) // 16 * 16
    assert produced == expected[: len(produced)]


def test_state_dict_resumes_exactly_and_loops_over_epochs(text_file, tokenizer):
    def fresh():
        return TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, ctx_len=32, docs_per_batch=7)

    reference = fresh()
    first_epoch = sum(1 for _ in TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, 32, loop=False))
    windows = [next(reference) for _ in range(first_epoch * 2 + 5)]  # crosses into the third epoch
    assert reference.epoch == 2
    for stop in (0, 3, first_epoch - 1, first_epoch + 7):
        stream = fresh()
        for _ in range(stop):
            next(stream)
        state = json.loads(json.dumps(stream.state_dict()))  # must survive JSON
        resumed = fresh()
        resumed.load_state_dict(state)
        for index in range(stop, stop + 40):
            assert torch.equal(next(resumed), windows[index]), (stop, index)


def test_text_files_and_folders(tmp_path, tokenizer):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one line of text\nanother line here\n")
    (tmp_path / "corpus" / "b.txt").write_text("more text in a second file\n")
    dataset = load_text_dataset(DataConfig(dataset=str(tmp_path / "corpus")))
    lines = ["one line of text", "another line here", "more text in a second file"]
    assert [row["text"] for row in dataset] == [line for line in lines if document_split(line) == "train"]


def test_local_files_split_into_train_validation_and_test_by_document_hash(text_file):
    everything = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    read = {split: [row["text"] for row in load_text_dataset(DataConfig(dataset=str(text_file), split=split))]
            for split in ("train", "validation", "test")}
    assert sorted(sum(read.values(), [])) == sorted(everything)  # every document in exactly one split
    for split, texts in read.items():
        assert texts and all(document_split(text) == split for text in texts), split
    assert len(read["train"]) > 0.85 * len(everything)
    with pytest.raises(ValueError, match=r"a local dataset has the splits \['train', 'validation', 'test'\].*not 'val'"):
        load_text_dataset(DataConfig(dataset=str(text_file), split="val"))


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.jsonl"):
        load_text_dataset(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


def test_wrong_text_column_lists_columns(text_file, tokenizer):
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, 16, text_column="content")
    with pytest.raises(KeyError, match="'content' not in the dataset; columns: \\['text'\\]"):
        next(windows)


def test_ranks_read_disjoint_shards(text_file):
    cfg = DataConfig(dataset=str(text_file))
    shards = [[row["text"] for row in load_text_dataset(cfg, rank=rank, world_size=2)] for rank in range(2)]
    everything = [row["text"] for row in load_text_dataset(cfg)]
    assert not set(shards[0]) & set(shards[1]) or len(set(everything)) < len(everything)
    assert sorted(shards[0] + shards[1]) == sorted(everything)
