"""The activation cache when things go wrong at run time: activations that overflow the storage dtype, a
cache holding NaN or inf that `--verify` must not pass, and Ctrl-C in the middle of a build."""

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.cache import format as cache_format
from sae.cache import ActivationCache, CacheError, main
from sae.cache.cli import INTERRUPTED_STATUS
from test_cache import (  # noqa: F401  (built and lm are fixtures)
    HOOKPOINT,
    N_WINDOWS,
    SHARD_FILES,
    TOKENS_PER_WINDOW,
    assert_same_cache,
    build,
    built,
    cache_config,
    cli_arguments,
    copy_of,
    lm,
)


@pytest.fixture(scope="module")
def loud_lm_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2 with its token embeddings scaled by 1e7: a residual stream of finite float32 values
    far past float16's largest, 65504 (as in real LMs with massive activations)."""
    from transformers import GPT2LMHeadModel

    path = Path(shutil.copytree(tiny_lm_dir, tmp_path_factory.mktemp("loud") / "lm"))
    model = GPT2LMHeadModel.from_pretrained(path)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e7)
    model.save_pretrained(path)
    return path


def test_activations_that_overflow_float16_storage_stop_the_build_in_one_line(loud_lm_dir, text_file, tmp_path, capsys):
    cfg, out = cache_config(loud_lm_dir, text_file), tmp_path / "fp16"
    with pytest.raises(CacheError) as refused:
        build(cfg, out, tokens=20 * TOKENS_PER_WINDOW, storage_dtype="float16")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"activations at {HOOKPOINT} overflow float16 storage: max |x| ")
    assert "float16 holds at most 65504; use --storage_dtype bfloat16 or float32" in message
    assert float(message.split("max |x| ")[1].split(",")[0]) > 65504
    # Nothing written claims to be valid: no shard, a manifest that says incomplete, which --verify says.
    assert not any(path.name.startswith("shard-") for path in out.iterdir())
    assert ActivationCache(out).n_windows == 0 and not ActivationCache(out).complete
    assert main(["--out", str(out), "--verify"]) == 0
    verified = capsys.readouterr().out
    assert "verified 0 shard(s)" in verified and "an incomplete cache" in verified

    build(cfg, tmp_path / "bf16", tokens=20 * TOKENS_PER_WINDOW, storage_dtype="bfloat16")  # fits bfloat16
    assert ActivationCache(tmp_path / "bf16", verify=True).read_windows(0, 20).abs().max() > 65504


def test_verify_refuses_a_shard_holding_inf_that_its_hash_cannot_tell(built, tmp_path, capsys):
    # What a float16 cache written before the overflow check holds: inf values, with a matching sha256.
    out = copy_of(built, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][1]
    tensors = load_file(str(out / entry["file"]))
    tensors["activations.0"][5, :3] = float("inf")
    manifest["shards"][1] = cache_format._write_shard(out, 1, entry["first_window"], tensors["input_ids"],
                                                      [tensors["activations.0"]])
    cache_format._write_manifest(out, manifest)
    ActivationCache(out)  # sizes and headers are right

    with pytest.raises(CacheError) as refused:
        main(["--out", str(out), "--verify"])
    assert str(refused.value) == (
        f"shard {out / SHARD_FILES[1]} holds 3 NaN or inf activation value(s) at {HOOKPOINT} (of 11,040; storage "
        "dtype float32): training on it would give nan; build the cache again in a new --out (with "
        "--storage_dtype bfloat16 or float32 if it was float16)")


def test_ctrl_c_keeps_the_complete_shards_and_says_how_to_resume(built, lm, tiny_lm_dir, text_file, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "interrupted"
    arguments = cli_arguments(tiny_lm_dir, text_file, out)
    real_write = cache_format._write_bytes

    def ctrl_c_in_third_shard(path, data):
        if "shard-00002" in path:
            real_write(path, data[: len(data) // 2])
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(cache_format, "_write_bytes", ctrl_c_in_third_shard)
    try:
        status = main(arguments)
    except KeyboardInterrupt:  # (left to escape, it would stop the whole pytest session)
        pytest.fail("Ctrl-C escaped `python -m sae.cache`: a traceback and no resume hint")
    monkeypatch.undo()
    assert status == INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the cache in {out} holds 46 windows in 2 complete shard(s), kept; to resume, rerun the "
        f"same command: python -m sae.cache {shlex.join(arguments)}")
    assert ActivationCache(out, verify=True).n_windows == 46 and not ActivationCache(out).complete

    assert main(arguments) == 0  # the same command resumes
    assert f"this run wrote {N_WINDOWS - 46} windows" in capsys.readouterr().out
    assert_same_cache(out, built, lm[1])
