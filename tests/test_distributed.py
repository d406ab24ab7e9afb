"""Data parallelism on CPU (gloo), 2 processes launched with torchrun from the test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]


def torchrun(args, nproc, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_ranks_equal_one_process_on_the_same_global_batches(tmp_path):
    torchrun(["tests/dp_worker.py", str(tmp_path / "two.safetensors")], nproc=2)
    subprocess.run([sys.executable, "tests/dp_worker.py", str(tmp_path / "one.safetensors")], cwd=REPO, check=True, timeout=120)
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert set(two) == set(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-9, atol=1e-9, msg=name)
    assert (one["tokens_since_fired"] > 0).any()  # the dead-latent counters really ran


def test_torchrun_train_py_two_ranks_trains_and_resumes(tiny_lm_dir, text_file, tmp_path):
    args = [
        "train.py", f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1", f"--data.dataset={text_file}",
        "--data.ctx_len=16", "--data.shuffle_buffer_tokens=256", "--sae.n_latents=64", "--sae.k=4",
        "--batch_size=128", "--log_every=5", "--save_every=5", f"--out_dir={tmp_path}", "--run_name=dp",
    ]
    torchrun([*args, "--max_tokens=1280"], nproc=2)
    first = SparseAutoencoder.load(tmp_path / "dp" / "transformer.h.1")
    result = torchrun([*args, "--max_tokens=2560", "--resume"], nproc=2)
    assert "resumed from" in result.stdout
    log = (tmp_path / "dp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4  # steps 5, 10 (first run), 15, 20 (resumed); rank 0 alone writes
    second = SparseAutoencoder.load(tmp_path / "dp" / "transformer.h.1")
    assert not torch.equal(first.W_dec, second.W_dec)


def test_torchrun_latent_sharded_train_py_equals_one_process(tiny_lm_dir, text_file, tmp_path):
    args = [
        "train.py", f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1", f"--data.dataset={text_file}",
        "--data.ctx_len=16", "--data.shuffle_buffer_tokens=256", "--sae.n_latents=64", "--sae.k=4",
        "--sae.dead_tokens=300", "--sae.k_aux=8", "--batch_size=128", "--max_tokens=1280", "--log_every=5",
        "--save_every=5", f"--out_dir={tmp_path}", "--eval_every=5", "--eval_tokens=256", "--eval_split=train",
    ]
    # stopped at step 5 and resumed: the second rank of the shard group streams nothing itself
    # (its batches are the first rank's), so its empty stream state must resume too
    torchrun([*args, "--run_name=sharded", "--shard_latents=2", "--max_tokens=640"], nproc=2)
    torchrun([*args, "--run_name=sharded", "--shard_latents=2", "--resume"], nproc=2)
    single = subprocess.run([sys.executable, *args, "--run_name=single"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = SparseAutoencoder.load(tmp_path / "sharded" / "transformer.h.1")  # one ordinary SAE folder
    one = SparseAutoencoder.load(tmp_path / "single" / "transformer.h.1")
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # held-out evals of the sharded SAE (gathered to rank 0) equal those of the single-process one
    evals = {}
    for run in ("sharded", "single"):
        lines = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        evals[run] = [line for line in lines if "eval/fvu" in line]
    assert [line["step"] for line in evals["sharded"]] == [5, 10]
    for sharded_line, single_line in zip(evals["sharded"], evals["single"], strict=True):
        for key in ("eval/fvu", "eval/ce_sae", "eval/kl"):
            assert abs(sharded_line[key] - single_line[key]) < 1e-4, key
