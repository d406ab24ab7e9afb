"""Held-out text on real training runs shares no text with what training read, in one process and with 2
data-parallel ranks: the local files' hash-chosen validation and test splits (sae/splits.py), and rule 4
(eval/data.py: the training split past what training read, when it is asked for by name).

Each document is a string of random letter-words, so two windows share an 8-token run only when they
hold the same text. Runs of at most half a window (ctx_len 16) make the check blind to no alignment: two
streams of the same text cut into windows at any offset still share a whole run inside a window of each
(with 12-token runs, 7 of the 16 offsets share none). tests/recording_train_worker.py records every window the training stream handed out."""

import json
import math
import random
import string

import pytest
import torch

from eval.__main__ import main as eval_main
from eval.data import held_out_windows
from launch import run_script
from sae.activations import load_model_and_tokenizer
from sae.config import DataConfig
from sae.data import TokenWindows, load_text_dataset

NGRAM = 8


def write_random_letter_documents(path, count, seed):
    rng = random.Random(seed)
    with open(path, "w") as file:
        for _ in range(count):
            words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(rng.randint(3, 12)))
            file.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def ngrams(windows: torch.Tensor) -> set[tuple]:
    return {tuple(row[i : i + NGRAM].tolist()) for row in windows for i in range(row.numel() - NGRAM + 1)}


def overlapping(held_out: torch.Tensor, training_ngrams: set[tuple]) -> int:
    """How many held-out windows share an NGRAM-token run with the training windows."""
    return sum(bool(ngrams(window[None]) & training_ngrams) for window in held_out)


def train_recording(tiny_lm_dir, dataset, out_dir, nproc, steps):
    args = [
        "tests/recording_train_worker.py", str(out_dir), "train.py", f"--model={tiny_lm_dir}",
        "--hookpoint=transformer.h.1", f"--data.dataset={dataset}", "--data.ctx_len=16",
        "--data.shuffle_buffer_tokens=256", "--sae.n_latents=64", "--sae.k=4", "--batch_size=128",
        f"--max_tokens={128 * steps}", "--log_every=5", "--save_every=0", f"--out_dir={out_dir}", "--run_name=run",
    ]
    run_script(args[:2] + args[3:], nproc=nproc)
    training = [torch.load(out_dir / f"windows-rank{rank}.pt") for rank in range(nproc)]
    return out_dir / "run" / "transformer.h.1", training


@pytest.mark.parametrize("nproc, files", [(1, 1), (2, 2)], ids=["one-process-one-file", "two-ranks-two-files"])
def test_held_out_windows_share_no_text_with_training(tiny_lm_dir, tmp_path, nproc, files):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for number in range(files):
        write_random_letter_documents(data_dir / f"part{number}.jsonl", 250, seed=number)
    dataset = str(data_dir) if files > 1 else str(data_dir / "part0.jsonl")
    sae_dir, training = train_recording(tiny_lm_dir, dataset, tmp_path, nproc, steps=20)
    metadata = json.loads((sae_dir / "cfg.json").read_text())
    record = metadata["text_read"]
    assert record["replicas"] == nproc and len(record["streams"]) == nproc
    training_ngrams = ngrams(torch.cat(training))

    _, tokenizer = load_model_and_tokenizer(str(tiny_lm_dir))
    data = DataConfig(dataset=dataset, ctx_len=16)
    for split in ("validation", "test"):
        held_out, source = held_out_windows(data, tokenizer, n_tokens=10**7, split=split, read_by_training=[record])
        assert held_out.numel() > 0 and overlapping(held_out, training_ngrams) == 0, split
    everything_left, source = held_out_windows(data, tokenizer, n_tokens=10**7, split="train",
                                               read_by_training=[record])
    assert "past what training read" in source["held_out"]
    assert overlapping(everything_left, training_ngrams) == 0
    # and it loses little: per stream, at most the documents of the last tokenizer read (64) that
    # training did not get to, plus a window's worth of tokens at each end
    documents = [row["text"] for row in load_text_dataset(data)]
    longest = max(len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
    all_windows = torch.stack(list(TokenWindows(load_text_dataset(data), tokenizer, 16, loop=False)))
    lost = all_windows.numel() - sum(windows.numel() for windows in training) - everything_left.numel()
    assert everything_left.numel() > 0 and lost <= nproc * (64 * longest + 2 * 16)

    # What the eval used before (skip ceil(tokens_trained / ctx_len) windows of the whole dataset) overlaps.
    skipped = math.ceil(metadata["tokens_trained"] / 16)
    assert overlapping(all_windows[skipped:], training_ngrams) > 0

    [report] = eval_main([str(sae_dir), "--split", "train", "--tokens", "320"])
    assert report["data"]["held_out"] == source["held_out"] and report["data"]["windows"] == 20
    [report] = eval_main([str(sae_dir), "--tokens", "320"])  # by default: the validation split
    assert report["data"]["split"] == "validation"
