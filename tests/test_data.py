"""Text -> token windows: local files through `datasets` streaming, their hash-chosen splits, exact state,
clear errors, a note when the text is read a second time."""

import json

import pytest
import torch
from datasets import IterableDataset
from transformers import AutoTokenizer

import sae.data
from sae.config import DataConfig
from sae.data import TokenWindows, load_text_dataset
from sae.errors import UsageError
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


def test_a_missing_text_column_is_one_line_naming_the_file_and_its_columns(tmp_path, tokenizer):
    """It was a KeyError traceback (and for a local file, it did not say which)."""
    data = tmp_path / "code.jsonl"
    data.write_text('{"content": "x = 1", "id": 3}\n{"content": "y = 2", "id": 4}\n')
    with pytest.raises(UsageError, match=rf"^{data} has no column 'text' \(its columns: content, id\); name the text column "
                                         r"with --data\.text_column \(python -m eval: --text_column\)$"):
        next(TokenWindows(load_text_dataset(DataConfig(dataset=str(data))), tokenizer, 16))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 5}\n')
    with pytest.raises(UsageError, match=rf"column 'text' of {numbers} holds int values, not text"):
        next(TokenWindows(load_text_dataset(DataConfig(dataset=str(numbers))), tokenizer, 16))
    hub_like = IterableDataset.from_generator(lambda: iter([{"content": "x = 1"}]))  # any other dataset
    with pytest.raises(UsageError, match=r"the dataset has no column 'text' \(its columns: content\)"):
        next(TokenWindows(hub_like, tokenizer, 16))


def test_an_empty_jsonl_file_is_one_line(tmp_path):
    """`datasets` raised a bare StopIteration reading the columns off a first record there is not."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match=rf"^{empty} has no documents: its data file\(s\) are empty$"):
        load_text_dataset(DataConfig(dataset=str(empty)))


@pytest.mark.parametrize("name, content, bad_offset", [
    ("latin1.txt", "ok line\ncaf\u00e9 fine\nmore\n".encode() + b"caf\xe9 bad\n", 27),
    ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 30),
])
def test_a_file_that_is_not_utf8_is_one_line_naming_it_and_the_byte(tmp_path, tokenizer, name, content, bad_offset):
    """It was a UnicodeDecodeError traceback from deep inside `datasets` (or pyarrow), naming no file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / f"a{name}").write_text("good text\n" if name.endswith(".txt") else '{"text": "good text"}\n')
    (folder / f"b{name}").write_bytes(content)
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(folder))), tokenizer, 16, loop=False)
    with pytest.raises(UsageError, match=rf"^data file {folder / ('b' + name)} is not UTF-8 text: byte 0xe9 at offset "
                                         rf"{bad_offset} does not decode; convert it to UTF-8"):
        list(windows)


def test_the_first_bad_byte_is_found_across_chunks(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("\u00e9\u00e9\u20ac".encode() + b"\xe2\x82")  # a 3-byte character cut short at the end
    for chunk_bytes in (1, 2, 3, 1 << 20):
        assert sae.data._first_invalid_utf8([str(path)], chunk_bytes) == (str(path), 7, 0xe2), chunk_bytes
    path.write_bytes(b"ab\xc3(\xa9")
    assert sae.data._first_invalid_utf8([str(path)], 2) == (str(path), 2, 0xc3)
    path.write_text("all good \u00e9")
    assert sae.data._first_invalid_utf8([str(path)], 3) is None


def test_documents_of_only_whitespace_are_empty(tmp_path, tokenizer):
    """A whitespace-only .txt trained an SAE (fvu 0.90) with exit 0; now it is 'no non-empty documents'."""
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\t\n \n\n")
    with pytest.raises(UsageError, match=r"the dataset has no non-empty documents \(a document of only whitespace is empty\)"):
        next(TokenWindows(load_text_dataset(DataConfig(dataset=str(blank))), tokenizer, 16))
    lines = [f"line {i} of real text here" for i in range(40)]
    (tmp_path / "mixed.txt").write_text("\n  \n".join(lines) + "\n")
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n")
    windows = {name: torch.cat(list(TokenWindows(load_text_dataset(DataConfig(dataset=str(tmp_path / name))), tokenizer, 16,
                                                 loop=False))) for name in ("mixed.txt", "plain.txt")}
    assert torch.equal(windows["mixed.txt"], windows["plain.txt"])


def test_a_second_pass_over_the_text_is_noted_once(text_file, tokenizer, capsys, monkeypatch):
    """A small file was looped over silently, after which `python -m eval` had no held-out text."""
    monkeypatch.setattr(sae.data, "_second_pass_noted", False)

    def windows():
        return TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, ctx_len=32)

    first_epoch = sum(1 for _ in TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, 32, loop=False))
    stream = windows()
    for _ in range(first_epoch):
        next(stream)
    assert stream.epoch == 0 and "note" not in capsys.readouterr().err
    train_texts = [text for text in (json.loads(line)["text"] for line in text_file.read_text().splitlines())
                   if document_split(text) == "train"]
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in train_texts)  # + end-of-text
    for _ in range(first_epoch * 2 + 2):  # into the third epoch, and a second stream into its second
        next(stream)
    again = windows()
    for _ in range(first_epoch + 2):
        next(again)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert notes[0].startswith(f"note: the training text ran out after {tokens:,} tokens ({len(train_texts):,} documents) "
                               "and is read again from the start (epoch 2)")
    assert "python -m eval: the dataset's validation or test split" in notes[0] and "--dataset" in notes[0]


def test_the_second_pass_note_is_rank_0s(text_file, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(sae.data, "_second_pass_noted", False)
    monkeypatch.setattr(sae.data.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sae.data.dist, "get_rank", lambda: 1)
    stream = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, ctx_len=32)
    while stream.epoch == 0:
        next(stream)
    assert "note" not in capsys.readouterr().err


def test_ranks_read_disjoint_shards(text_file):
    cfg = DataConfig(dataset=str(text_file))
    shards = [[row["text"] for row in load_text_dataset(cfg, rank=rank, world_size=2)] for rank in range(2)]
    everything = [row["text"] for row in load_text_dataset(cfg)]
    assert not set(shards[0]) & set(shards[1]) or len(set(everything)) < len(everything)
    assert sorted(shards[0] + shards[1]) == sorted(everything)
