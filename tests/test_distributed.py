"""Data parallelism on CPU (gloo), 2 processes launched with torchrun from the test."""

import json

import torch
from safetensors.torch import load_file

from launch import run_script
from sae import SparseAutoencoder


def test_two_ranks_equal_one_process_on_the_same_global_batches(tmp_path):
    run_script(["tests/dp_worker.py", str(tmp_path / "two.safetensors")], nproc=2)
    run_script(["tests/dp_worker.py", str(tmp_path / "one.safetensors")], timeout=120)
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
    run_script([*args, "--max_tokens=1280"], nproc=2)
    first = SparseAutoencoder.load(tmp_path / "dp" / "transformer.h.1")
    result = run_script([*args, "--max_tokens=2560", "--resume"], nproc=2)
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
        "--save_every=5", f"--out_dir={tmp_path}", "--eval_every=5", "--eval_tokens=256",
    ]
    # stopped at step 5 and resumed: the second rank of the shard group streams nothing itself
    # (its batches are the first rank's), so its empty stream state must resume too
    run_script([*args, "--run_name=sharded", "--shard_latents=2", "--max_tokens=640"], nproc=2)
    run_script([*args, "--run_name=sharded", "--shard_latents=2", "--resume"], nproc=2)
    run_script([*args, "--run_name=single"])
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


def test_torchrun_latent_sharded_variants_equal_one_process(tiny_lm_dir, text_file, tmp_path):
    """Variants under --shard_latents: every member's SAE is split the same way, through the same code; a
    skip transcoder among them (its W_skip whole on every rank)."""
    config = tmp_path / "variants.yaml"
    config.write_text("variants:\n  - {name: k4, k: 4}\n  - {name: wide, n_latents: 128, k: 2, hookpoint: transformer.h.0}\n"
                      "  - {name: tc, hookpoint: transformer.h.0.mlp, transcode: true, skip_connection: true}\n")
    args = [
        "train.py", f"--config={config}", f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1",
        f"--data.dataset={text_file}", "--data.ctx_len=16", "--data.shuffle_buffer_tokens=256", "--sae.n_latents=64",
        "--sae.dead_tokens=300", "--sae.k_aux=8", "--batch_size=128", "--max_tokens=1280", "--log_every=5",
        "--save_every=5", f"--out_dir={tmp_path}",
    ]
    run_script([*args, "--run_name=sharded", "--shard_latents=2"], nproc=2)
    run_script([*args, "--run_name=single"])
    for variant, n_latents in (("k4", 64), ("wide", 128), ("tc", 64)):
        sharded = SparseAutoencoder.load(tmp_path / "sharded" / variant)
        one = SparseAutoencoder.load(tmp_path / "single" / variant)
        assert sharded.cfg == one.cfg and one.cfg.n_latents == n_latents and one.cfg.skip_connection == (variant == "tc")
        for name, tensor in one.state_dict().items():
            torch.testing.assert_close(sharded.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{variant} {name}")
