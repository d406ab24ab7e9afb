"""The activation cache: rows equal the stream's bitwise, crashes and corruption are repaired, never read."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae import activations as activations_module
from sae.activations import ActivationStream, LMWindowSource, capture_activations, get_module, load_model_and_tokenizer
from sae.cache import compute as cache_compute
from sae.cache import format as cache_format
from sae.cache import (
    ActivationCache,
    CacheError,
    CachedWindows,
    CorruptShardError,
    LmBatches,
    build_cache,
    cache_identity,
    check_same_identity,
    main,
    run_hookpoints,
    windows_for_training,
)
from sae.config import ConfigError, DataConfig, SaeConfig, SaeVariant, TrainConfig
from sae.data import TokenWindows, load_text_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
HOOKPOINT = "transformer.h.1"
HOOKPOINTS = [HOOKPOINT, "transformer.h.0"]  # a two-hookpoint cache's, in its order (the later layer first)
CTX_LEN = 16
TOKENS_PER_WINDOW = CTX_LEN - 1
WINDOWS_PER_BLOCK = 35  # ceil(shuffle_buffer_tokens 512 / 15): LM batches of 8, 8, 8, 8, 3 in every block
N_WINDOWS = 100  # two whole blocks and most of a third
SHARD_WINDOWS = 23  # shards of 23, 23, 23, 23, 8 windows: boundaries fall inside LM batches
SHARD_FILES = [f"shard-{number:05d}.safetensors" for number in range(5)]


def cache_config(tiny_lm_dir, text_file, **overrides) -> TrainConfig:
    """The tiny LM and text file, with windows of 16 tokens and blocks of 35 windows (as in test_trainer)."""
    values = dict(
        model=str(tiny_lm_dir),
        hookpoint=HOOKPOINT,
        sae=SaeConfig(n_latents=128, k=4, k_aux=16, dead_tokens=2000),
        data=DataConfig(dataset=str(text_file), ctx_len=CTX_LEN, shuffle_buffer_tokens=512, lm_batch_windows=8),
        batch_size=128,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def two_hookpoint_config(tiny_lm_dir, text_file, **overrides) -> TrainConfig:
    """A variants run over transformer.h.1 (the run's hookpoint) and transformer.h.0: a cache of HOOKPOINTS."""
    variants = (SaeVariant(name="a"), SaeVariant(name="b", hookpoint="transformer.h.0"))
    return cache_config(tiny_lm_dir, text_file, variants=variants, **overrides)


def build(cfg: TrainConfig, out: Path, **options):
    options = dict(tokens=N_WINDOWS * TOKENS_PER_WINDOW, shard_tokens=SHARD_WINDOWS * TOKENS_PER_WINDOW, progress=False) | options
    return build_cache(cfg, out, **options)


def cli_arguments(tiny_lm_dir, text_file, out: Path) -> list[str]:
    """The command line equivalent of `build(cache_config(...), out)`."""
    return [
        "--model", str(tiny_lm_dir), "--hookpoint", HOOKPOINT, "--data.dataset", str(text_file),
        f"--data.ctx_len={CTX_LEN}", "--data.shuffle_buffer_tokens", "512", "--data.lm_batch_windows", "8",
        "--batch_size", "128", "--device", "cpu", "--tokens", str(N_WINDOWS * TOKENS_PER_WINDOW),
        "--shard_tokens", str(SHARD_WINDOWS * TOKENS_PER_WINDOW), "--out", str(out), "--no_progress",
    ]


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_model_and_tokenizer(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def reference(lm, text_file):
    """(input_ids, {hookpoint: rows}) of the first N_WINDOWS windows at each of HOOKPOINTS, computed as
    ActivationStream._fill_block does: the LM runs on blocks of 35 windows in batches of 8 from each block's
    start; position 0 dropped. One hookpoint per forward here (the cache captures both in one)."""
    model, tokenizer = lm
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, CTX_LEN)
    blocks = [torch.stack([next(windows) for _ in range(WINDOWS_PER_BLOCK)]) for _ in range(-(-N_WINDOWS // WINDOWS_PER_BLOCK))]
    rows = {}
    for hookpoint in HOOKPOINTS:
        module = get_module(model, hookpoint)
        chunks = [capture_activations(model, module, block[i : i + 8])[:, 1:] for block in blocks for i in range(0, WINDOWS_PER_BLOCK, 8)]
        rows[hookpoint] = torch.cat(chunks).flatten(0, 1).float()[: N_WINDOWS * TOKENS_PER_WINDOW]
    return torch.cat(blocks)[:N_WINDOWS], rows


@pytest.fixture(scope="module")
def built(tiny_lm_dir, text_file, tmp_path_factory) -> Path:
    """A cache of the tiny config, built once, never modified (tests copy it to change it)."""
    out = tmp_path_factory.mktemp("cache") / "built"
    build(cache_config(tiny_lm_dir, text_file), out)
    return out


@pytest.fixture(scope="module")
def built2(tiny_lm_dir, text_file, tmp_path_factory) -> Path:
    """A cache of HOOKPOINTS (two_hookpoint_config), built once, never modified."""
    out = tmp_path_factory.mktemp("cache2") / "built2"
    build(two_hookpoint_config(tiny_lm_dir, text_file), out)
    return out


def copy_of(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def windows_after(cache: ActivationCache, tokenizer, count: int = 40) -> torch.Tensor:
    """The next `count` windows of the token stream from the state saved in the cache's manifest."""
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=cache.manifest["dataset"])), tokenizer, CTX_LEN)
    windows.load_state_dict(cache.manifest["windows_state"])
    return torch.stack([next(windows) for _ in range(count)])


def assert_same_cache(directory: Path, built: Path, tokenizer) -> None:
    """Same shard list (files, sizes, hashes), same tensors, a stream state that continues the same way."""
    ours, theirs = ActivationCache(directory, verify=True), ActivationCache(built)
    assert ours.manifest["shards"] == theirs.manifest["shards"]
    # (the `datasets` part of the state may be spelled differently after a resume; where it leads is the same)
    assert torch.equal(windows_after(ours, tokenizer), windows_after(theirs, tokenizer))
    assert ours.complete and ours.n_windows == theirs.n_windows == N_WINDOWS
    assert ours.hookpoints == theirs.hookpoints and ours.d_in_of == theirs.d_in_of
    for hookpoint in theirs.hookpoints:
        assert torch.equal(ours.read_windows(0, N_WINDOWS, hookpoint), theirs.read_windows(0, N_WINDOWS, hookpoint))
    assert torch.equal(ours.input_ids(0, N_WINDOWS), theirs.input_ids(0, N_WINDOWS))


# ---------------------------------------------------------------- 1. rows equal the stream's


def test_lm_batches_follow_the_stream_blocks():
    batches = LmBatches(windows_per_block=35, lm_batch_windows=8)
    assert [(batches.start(w), batches.end(w)) for w in (0, 7, 8, 33, 34, 35, 43, 69, 70)] == [
        (0, 8), (0, 8), (8, 16), (32, 35), (32, 35), (35, 43), (43, 51), (67, 70), (70, 78)]


def test_the_lm_runs_on_the_same_batches_as_when_streaming(lm, tiny_lm_dir, text_file, tmp_path, monkeypatch):
    # On CPU the batch composition happens not to change a row's bits; on a GPU it may, so check it directly,
    # also across a resume whose first LM batch starts in the shard before (windows 43..50 around 46).
    model, tokenizer = lm
    streamed, cached = [], []

    def recording(real, calls):
        def capture(model, modules, input_ids):
            if input_ids.shape[1] == CTX_LEN:  # not the 1x2 probe for d_in
                calls.append(input_ids)
            return real(model, modules, input_ids)
        return capture

    monkeypatch.setattr(activations_module, "capture_many", recording(activations_module.capture_many, streamed))
    monkeypatch.setattr(cache_compute, "capture_many", recording(cache_compute.capture_many, cached))
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, CTX_LEN)
    stream = ActivationStream(LMWindowSource(model, [HOOKPOINT], windows, 8), batch_size=128, shuffle_buffer_tokens=512)
    for _ in range(3 * 4):  # three blocks of 35 windows
        next(stream)
    assert [len(batch) for batch in streamed] == [8, 8, 8, 8, 3] * 3

    cfg, out = cache_config(tiny_lm_dir, text_file), tmp_path / "batches"
    build(cfg, out, tokens=46 * TOKENS_PER_WINDOW)  # windows 0..45, then a resume to 100
    first_run, cached[:] = list(cached), []
    build(cfg, out)
    for batches, expected in ((first_run, streamed[:7]), (cached, streamed[6:14])):
        assert len(batches) == len(expected)
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(batches, expected))


def test_cached_rows_equal_the_streams_unshuffled_rows_bitwise(built, reference):
    ids, rows = reference[0], reference[1][HOOKPOINT]
    cache = ActivationCache(built)
    assert [entry["windows"] for entry in cache.manifest["shards"]] == [23, 23, 23, 23, 8]
    assert cache.read_windows(0, N_WINDOWS).dtype == torch.float32
    assert torch.equal(cache.read_windows(0, N_WINDOWS), rows)
    assert torch.equal(cache.input_ids(0, N_WINDOWS), ids)
    for first, count in [(20, 10), (0, 23), (22, 50), (90, 10), (99, 1), (5, 0)]:  # within and across shards
        span = slice(first * TOKENS_PER_WINDOW, (first + count) * TOKENS_PER_WINDOW)
        assert torch.equal(cache.read_windows(first, count), rows[span])
        assert torch.equal(cache.input_ids(first, count), ids[first : first + count])
    for first, count in [(95, 6), (-1, 2), (100, 1)]:
        with pytest.raises(IndexError, match=rf"out of range: the cache in .* holds windows 0\.\.{N_WINDOWS - 1}"):
            cache.read_windows(first, count)


def test_training_batches_from_the_cache_equal_the_streamed_ones(built, lm, text_file):
    model, tokenizer = lm
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, CTX_LEN)
    streamed = ActivationStream(LMWindowSource(model, [HOOKPOINT], windows, 8), batch_size=128, shuffle_buffer_tokens=512, seed=5)
    cache = ActivationCache(built)
    cached = ActivationStream(CachedWindows(cache), batch_size=128, shuffle_buffer_tokens=512, seed=5)
    assert streamed.windows_per_block == cached.windows_per_block == WINDOWS_PER_BLOCK
    assert streamed.batches_per_block == 4
    for block in range(2):  # 8 batches: two whole blocks of the 100 cached windows
        batches = [next(streamed)[HOOKPOINT] for _ in range(4)]
        for batch in batches:
            assert torch.equal(next(cached)[HOOKPOINT], batch)
        # and they are the cached rows under _fill_block's permutation
        rows = cache.read_windows(block * WINDOWS_PER_BLOCK, WINDOWS_PER_BLOCK)
        generator = torch.Generator().manual_seed(hash((5, 0, block)) & (2**63 - 1))
        order = torch.randperm(len(rows), generator=generator)[: 4 * 128]
        assert torch.equal(rows[order], torch.cat(batches))
    # a training checkpoint of the cached stream resumes it exactly, mid-block
    state = json.loads(json.dumps(cached.state_dict()))
    expected = [next(cached)[HOOKPOINT] for _ in range(3)]
    resumed = ActivationStream(CachedWindows(ActivationCache(built)), batch_size=128, shuffle_buffer_tokens=512, seed=5)
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(next(resumed)[HOOKPOINT], batch)


# ---------------------------------------------------------------- 2. manifest and command line


def test_manifest_describes_the_cache(built, tiny_lm_dir, text_file):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == "sae-activation-cache" and manifest["format_version"] == 2
    assert manifest["model"] == str(tiny_lm_dir) and manifest["hookpoints"] == [HOOKPOINT] and "hookpoint" not in manifest
    assert manifest["model_dtype"] == "float32" and manifest["storage_dtype"] == "float32"
    assert manifest["d_in"] == {HOOKPOINT: 32} and manifest["ctx_len"] == CTX_LEN and manifest["tokens_per_window"] == TOKENS_PER_WINDOW
    assert manifest["dataset"] == str(text_file) and manifest["split"] == "train" and manifest["text_column"] == "text"
    assert manifest["lm_batch_windows"] == 8 and manifest["windows_per_block"] == WINDOWS_PER_BLOCK
    assert manifest["n_windows"] == N_WINDOWS and manifest["n_tokens"] == N_WINDOWS * TOKENS_PER_WINDOW
    assert manifest["windows_per_shard"] == SHARD_WINDOWS and manifest["complete"] is True
    assert [entry["file"] for entry in manifest["shards"]] == SHARD_FILES
    for entry in manifest["shards"]:
        assert entry["rows"] == entry["windows"] * TOKENS_PER_WINDOW
        assert entry["bytes"] == (built / entry["file"]).stat().st_size and len(entry["sha256"]) == 64
        with safe_open(str(built / entry["file"]), framework="pt") as shard:
            assert sorted(shard.keys()) == ["activations.0", "input_ids"]
    assert sorted(path.name for path in built.iterdir() if not path.name.startswith(".")) == ["manifest.json"] + SHARD_FILES
    cache = ActivationCache(built)
    assert (cache.n_windows, cache.n_tokens, cache.d_in, cache.ctx_len) == (100, 1500, 32, 16)
    assert (cache.hookpoints, cache.hookpoint, cache.d_in_of) == ([HOOKPOINT], HOOKPOINT, {HOOKPOINT: 32})


def test_command_line_in_process_and_as_a_module(built, lm, tiny_lm_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(cli_arguments(tiny_lm_dir, text_file, out)) == 0
    assert "100 windows, 1,500 tokens" in capsys.readouterr().out
    assert_same_cache(out, built, lm[1])
    assert main(["--out", str(out), "--verify"]) == 0
    assert "verified 5 shard(s)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown config key 'sae.kk'"):
        main(cli_arguments(tiny_lm_dir, text_file, tmp_path / "bad") + ["--sae.kk", "3"])

    # The entry point, from the repo root, with a YAML config plus overrides, building and verifying.
    config = tmp_path / "cache.yaml"
    config.write_text(f"model: {tiny_lm_dir}\nhookpoint: {HOOKPOINT}\nbatch_size: 128\n"
                      f"data:\n  dataset: {text_file}\n  ctx_len: {CTX_LEN}\n  shuffle_buffer_tokens: 512\n")
    module_out = tmp_path / "module"
    command = [sys.executable, "-m", "sae.cache", "--config", str(config), "--data.lm_batch_windows", "8",
               "--device", "cpu", "--tokens", "1500", "--shard_tokens=345", "--out", str(module_out), "--verify"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert "verified 5 shard(s)" in result.stdout and "tokens/s" in result.stdout
    assert_same_cache(module_out, built, lm[1])


def test_tokens_default_to_what_training_reads(tiny_lm_dir, text_file):
    # 40 steps of 128 tokens, 4 batches per block of 35 windows: 10 blocks.
    assert windows_for_training(cache_config(tiny_lm_dir, text_file, max_tokens=128 * 40)) == 350
    assert windows_for_training(cache_config(tiny_lm_dir, text_file, max_tokens=128 * 41)) == 385


# ---------------------------------------------------------------- 3. crash and resume


def test_a_crash_while_writing_a_shard_resumes_to_the_uninterrupted_cache(built, lm, tiny_lm_dir, text_file, tmp_path, monkeypatch):
    cfg, out = cache_config(tiny_lm_dir, text_file), tmp_path / "crashed"
    real_write = cache_format._write_bytes

    def crash_in_third_shard(path, data):
        if "shard-00002" in path:
            real_write(path, data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash half way through shard-00002")
        real_write(path, data)

    monkeypatch.setattr(cache_format, "_write_bytes", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, out)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["file"] for entry in manifest["shards"]] == SHARD_FILES[:2] and manifest["complete"] is False
    assert ActivationCache(out).n_windows == 46  # a reader sees the two complete shards only
    # What a crash on a filesystem without atomic renames, or a killed process, may leave behind:
    (out / "shard-00002.safetensors").write_bytes((built / "shard-00002.safetensors").read_bytes()[:1000])
    (out / ".shard-00003.safetensors.tmp-12345").write_bytes(b"partial")

    report = build(cfg, out, resume=True)
    assert sorted(report.files_removed) == [".shard-00003.safetensors.tmp-12345", "shard-00002.safetensors"]
    assert report.windows_written == N_WINDOWS - 46
    assert_same_cache(out, built, lm[1])


def test_a_killed_process_resumes_to_the_uninterrupted_cache(built, lm, tiny_lm_dir, text_file, tmp_path):
    out = tmp_path / "killed"
    script = (
        "import os, sys\n"
        "import sae.cache.format as cache_format\n"
        "from sae.cache import main\n"
        "real_write = cache_format._write_bytes\n"
        "def write(path, data):\n"
        "    if 'shard-00003' in path:\n"
        "        real_write(path, data[: len(data) // 3])\n"
        "        os._exit(9)  # no cleanup at all, like kill -9\n"
        "    real_write(path, data)\n"
        "cache_format._write_bytes = write\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *cli_arguments(tiny_lm_dir, text_file, out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 9, result.stderr
    assert any(path.name.startswith(".shard-00003.safetensors.tmp-") for path in out.iterdir())
    assert ActivationCache(out).n_windows == 69
    assert main(cli_arguments(tiny_lm_dir, text_file, out) + ["--resume"]) == 0
    assert_same_cache(out, built, lm[1])
    assert not any(".tmp-" in path.name for path in out.iterdir())


# ---------------------------------------------------------------- 4. corrupt shards


def test_truncated_or_corrupt_shards_are_refused_then_rewritten(built, lm, tiny_lm_dir, text_file, tmp_path, capsys):
    out = copy_of(built, tmp_path)
    truncated, flipped, deleted = (out / SHARD_FILES[number] for number in (1, 2, 4))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(CorruptShardError,
                       match=r"shard-00001.safetensors is truncated or corrupt: it has .* bytes, the manifest says .*--resume"):
        ActivationCache(out)
    shutil.copy(built / truncated.name, truncated)

    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    ActivationCache(out)  # same size: only the hash can tell
    with pytest.raises(CorruptShardError, match=r"shard-00002.safetensors is truncated or corrupt: its sha256"):
        ActivationCache(out, verify=True)
    with pytest.raises(CorruptShardError, match="shard-00002.safetensors is truncated or corrupt"):
        main(["--out", str(out), "--verify"])

    truncated.write_bytes(truncated.read_bytes()[:-100])
    deleted.unlink()
    with pytest.raises(CorruptShardError, match=r"(?s)shard-00001.safetensors is truncated.*\n.*shard-00004.safetensors is "
                                                r"truncated or corrupt: the file is missing"):
        ActivationCache(out)
    report = build(cache_config(tiny_lm_dir, text_file), out, resume=True)
    assert report.shards_rewritten == ["shard-00001.safetensors", "shard-00002.safetensors", "shard-00004.safetensors"]
    assert report.windows_written == 0
    assert_same_cache(out, built, lm[1])


# ---------------------------------------------------------------- 5. another config


def test_a_cache_of_something_else_is_refused_with_the_differing_keys(built, tiny_lm_dir, text_file, tmp_path):
    out = copy_of(built, tmp_path)
    manifest_before = (out / "manifest.json").read_bytes()
    other = cache_config(tiny_lm_dir, text_file, hookpoint="transformer.h.2",
                         data=DataConfig(dataset=str(text_file), ctx_len=CTX_LEN, shuffle_buffer_tokens=512, lm_batch_windows=4))
    with pytest.raises(CacheError, match=r"hookpoints: \['transformer.h.1'\] in the cache, \['transformer.h.2'\] requested; "
                                         r"lm_batch_windows: 8 in the cache, 4 requested\)"):
        build(other, out)
    with pytest.raises(CacheError,
                       match=r"model: '.*' in the cache, 'gpt2-other' requested; .*storage_dtype: 'float32' in the cache, 'bfloat16'"):
        build(cache_config(tiny_lm_dir, text_file, model="gpt2-other"), out, storage_dtype="bfloat16")
    assert (out / "manifest.json").read_bytes() == manifest_before


def test_a_manifest_of_another_version_or_none_is_a_clear_error(built, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no activation cache in .*manifest.json not found"):
        ActivationCache(tmp_path)
    out = copy_of(built, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"format_version": 7}))
    with pytest.raises(CacheError, match="format version 7; this code reads versions 1 and 2"):
        ActivationCache(out)


# ---------------------------------------------------------------- 6. CachedWindows


def test_cached_windows_loop_and_resume_exactly(built):
    cache = ActivationCache(built)
    everything = cache.read_windows(0, N_WINDOWS)
    rows = lambda first, count: everything[first * TOKENS_PER_WINDOW : (first + count) * TOKENS_PER_WINDOW]  # noqa: E731
    windows = CachedWindows(cache)
    assert windows.hookpoints == [HOOKPOINT] and windows.ctx_len == CTX_LEN
    (first,) = windows.next_activations(60).activations  # one tensor per hookpoint, like LMWindowSource
    assert torch.equal(first, rows(0, 60))
    assert windows.state_dict() == {"next_window": 60, "epoch": 0}
    assert torch.equal(windows.next_activations(60).activations[0], torch.cat([rows(60, 40), rows(0, 20)]))  # around the end
    state = json.loads(json.dumps(windows.state_dict()))
    assert state == {"next_window": 20, "epoch": 1}

    resumed = CachedWindows(ActivationCache(built))
    resumed.load_state_dict(state)
    for count in (30, 50, 250):
        assert torch.equal(resumed.next_activations(count).activations[0], windows.next_activations(count).activations[0])
    assert windows.state_dict() == resumed.state_dict() == {"next_window": 50, "epoch": 4}
    assert windows.next_activations(50).activations[0].shape == (50 * TOKENS_PER_WINDOW, 32)
    assert windows.state_dict() == {"next_window": 0, "epoch": 5}
    with pytest.raises(ValueError, match="next_window=100 is outside the cache"):
        resumed.load_state_dict({"next_window": 100, "epoch": 0})


# ---------------------------------------------------------------- 7. bfloat16 storage


def test_bfloat16_storage_rounds_each_row_and_halves_the_size(built, tiny_lm_dir, text_file, tmp_path):
    out = tmp_path / "bf16"
    build(cache_config(tiny_lm_dir, text_file), out, storage_dtype="bfloat16")
    half, full = ActivationCache(out), ActivationCache(built)
    assert half.manifest["storage_dtype"] == "bfloat16"
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as shard:
        assert shard.get_slice("activations.0").get_dtype() == "BF16"
    half_rows, full_rows = half.read_windows(0, N_WINDOWS), full.read_windows(0, N_WINDOWS)
    assert half_rows.dtype == torch.float32
    torch.testing.assert_close(half_rows, full_rows, rtol=2**-8, atol=0)
    assert torch.equal(half_rows, full_rows.bfloat16().float())
    assert torch.equal(half.input_ids(0, N_WINDOWS), full.input_ids(0, N_WINDOWS))
    ids_bytes = N_WINDOWS * CTX_LEN * 8
    half_bytes = sum(entry["bytes"] for entry in half.manifest["shards"]) - ids_bytes
    full_bytes = sum(entry["bytes"] for entry in full.manifest["shards"]) - ids_bytes
    assert abs(half_bytes - full_bytes / 2) < 5 * 256  # headers aside, exactly half
    # resuming without naming the dtype keeps the cache's own
    report = build(cache_config(tiny_lm_dir, text_file), out, tokens=(N_WINDOWS + 10) * TOKENS_PER_WINDOW)
    assert report.windows_written == 10 and ActivationCache(out).manifest["storage_dtype"] == "bfloat16"


# ---------------------------------------------------------------- 8. several hookpoints


def test_a_two_hookpoint_cache_holds_each_hookpoints_rows_bitwise(built2, built, reference, tiny_lm_dir, text_file):
    assert run_hookpoints(two_hookpoint_config(tiny_lm_dir, text_file)) == HOOKPOINTS
    ids, rows = reference
    manifest = json.loads((built2 / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["hookpoints"] == HOOKPOINTS
    assert manifest["d_in"] == {HOOKPOINT: 32, "transformer.h.0": 32}
    with safe_open(str(built2 / "shard-00000.safetensors"), framework="pt") as shard:
        assert sorted(shard.keys()) == ["activations.0", "activations.1", "input_ids"]
    cache = ActivationCache(built2, verify=True)
    assert cache.hookpoints == HOOKPOINTS and cache.d_in_of == {HOOKPOINT: 32, "transformer.h.0": 32}
    assert (cache.hookpoint, cache.d_in, cache.n_windows) == (HOOKPOINT, 32, N_WINDOWS)
    assert torch.equal(cache.input_ids(0, N_WINDOWS), ids)
    for hookpoint in HOOKPOINTS:
        assert torch.equal(cache.read_windows(0, N_WINDOWS, hookpoint), rows[hookpoint])
        for first, count in [(22, 50), (99, 1), (5, 0)]:
            span = slice(first * TOKENS_PER_WINDOW, (first + count) * TOKENS_PER_WINDOW)
            assert torch.equal(cache.read_windows(first, count, hookpoint), rows[hookpoint][span])
    assert not torch.equal(rows[HOOKPOINT], rows["transformer.h.0"])
    assert torch.equal(cache.read_windows(0, N_WINDOWS), rows[HOOKPOINT])  # None: the first hookpoint
    assert torch.equal(ActivationCache(built).read_windows(0, N_WINDOWS), rows[HOOKPOINT])  # = the one-hookpoint cache


def test_training_batches_from_a_two_hookpoint_cache_equal_the_streamed_ones(built2, lm, text_file):
    model, tokenizer = lm
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, CTX_LEN)
    streamed = ActivationStream(LMWindowSource(model, HOOKPOINTS, windows, 8), batch_size=128, shuffle_buffer_tokens=512, seed=5)
    source = CachedWindows(ActivationCache(built2))
    assert source.hookpoints == HOOKPOINTS
    cached = ActivationStream(source, batch_size=128, shuffle_buffer_tokens=512, seed=5)
    for _ in range(8):  # two whole blocks
        ours, theirs = next(cached), next(streamed)
        assert list(ours) == list(theirs) == HOOKPOINTS
        assert all(torch.equal(ours[hookpoint], theirs[hookpoint]) for hookpoint in HOOKPOINTS)
    state = json.loads(json.dumps(cached.state_dict()))
    expected = [next(cached) for _ in range(3)]
    resumed = ActivationStream(CachedWindows(ActivationCache(built2)), batch_size=128, shuffle_buffer_tokens=512, seed=5)
    resumed.load_state_dict(state)
    for batch in expected:
        ours = next(resumed)
        assert all(torch.equal(ours[hookpoint], batch[hookpoint]) for hookpoint in HOOKPOINTS)


def test_a_crashed_two_hookpoint_build_resumes_to_the_uninterrupted_cache(built2, lm, tiny_lm_dir, text_file, tmp_path, monkeypatch):
    cfg, out = two_hookpoint_config(tiny_lm_dir, text_file), tmp_path / "crashed2"
    real_write, real_capture = cache_format._write_bytes, cache_compute.capture_many
    hooked = []

    def crash_in_fourth_shard(path, data):
        if "shard-00003" in path:
            real_write(path, data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash half way through shard-00003")
        real_write(path, data)

    def capture(model, modules, input_ids):
        hooked.append(len(modules))
        return real_capture(model, modules, input_ids)

    monkeypatch.setattr(cache_format, "_write_bytes", crash_in_fourth_shard)
    monkeypatch.setattr(cache_compute, "capture_many", capture)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, out)
    monkeypatch.setattr(cache_format, "_write_bytes", real_write)
    assert ActivationCache(out).n_windows == 69
    (out / "shard-00001.safetensors").write_bytes(b"\0" * (out / "shard-00001.safetensors").stat().st_size)  # corrupt too
    report = build(cfg, out, resume=True)
    assert report.shards_rewritten == ["shard-00001.safetensors"] and report.windows_written == N_WINDOWS - 69
    assert_same_cache(out, built2, lm[1])
    assert set(hooked) == {2}  # one forward for both hookpoints, every time


def test_a_subset_of_the_hookpoints_can_be_read(built2, lm, text_file):
    cache = ActivationCache(built2)
    only_h0 = CachedWindows(cache, hookpoints=["transformer.h.0"])
    assert only_h0.hookpoints == ["transformer.h.0"]
    (rows,) = only_h0.next_activations(60).activations
    assert torch.equal(rows, cache.read_windows(0, 60, "transformer.h.0"))
    reordered = CachedWindows(cache, hookpoints=["transformer.h.0", HOOKPOINT])
    h0, h1 = reordered.next_activations(120).activations  # around the end
    assert torch.equal(h1, torch.cat([cache.read_windows(0, N_WINDOWS), cache.read_windows(0, 20)]))
    assert h0.shape == h1.shape == (120 * TOKENS_PER_WINDOW, 32)

    model, tokenizer = lm
    windows = TokenWindows(load_text_dataset(DataConfig(dataset=str(text_file))), tokenizer, CTX_LEN)
    streamed = ActivationStream(LMWindowSource(model, ["transformer.h.0"], windows, 8), batch_size=128, shuffle_buffer_tokens=512,
                                seed=2)
    cached = ActivationStream(CachedWindows(cache, ["transformer.h.0"]), batch_size=128, shuffle_buffer_tokens=512, seed=2)
    for _ in range(5):
        ours, theirs = next(cached), next(streamed)
        assert list(ours) == ["transformer.h.0"] and torch.equal(ours["transformer.h.0"], theirs["transformer.h.0"])

    not_cached = r"hookpoint 'transformer.h.2' is not in the cache in .*, which holds transformer.h.1, transformer.h.0"
    with pytest.raises(CacheError, match=not_cached):
        CachedWindows(cache, hookpoints=[HOOKPOINT, "transformer.h.2"])
    with pytest.raises(CacheError, match=not_cached):
        cache.read_windows(0, 1, "transformer.h.2")
    with pytest.raises(ValueError, match="one or more distinct hookpoints"):
        CachedWindows(cache, hookpoints=[HOOKPOINT, HOOKPOINT])


def test_other_hookpoints_or_another_order_is_another_cache(built2, tiny_lm_dir, text_file, tmp_path, capsys):
    out = copy_of(built2, tmp_path)
    manifest_before = (out / "manifest.json").read_bytes()
    one = cache_config(tiny_lm_dir, text_file)
    with pytest.raises(CacheError, match=r"hookpoints: \['transformer.h.1', 'transformer.h.0'\] in the cache, "
                                         r"\['transformer.h.1'\] requested\)"):
        build(one, out)
    with pytest.raises(CacheError, match=r"hookpoints: .* in the cache, \['transformer.h.0', 'transformer.h.1'\] requested"):
        build(one, out, hookpoints=["transformer.h.0", HOOKPOINT])
    # what the trainer checks before training from a cache
    cache = ActivationCache(out)
    check_same_identity(cache.manifest, cache_identity(two_hookpoint_config(tiny_lm_dir, text_file), "float32"), out)
    with pytest.raises(CacheError, match=r"hookpoints: .* in the cache, \['transformer.h.1'\] requested"):
        check_same_identity(cache.manifest, cache_identity(one, "float32"), out)
    check_same_identity(cache.manifest, cache_identity(one, "float32"), out, hookpoints_subset=True)  # to read h.1 only
    with pytest.raises(CacheError, match=r"hookpoints: .* in the cache, \['transformer.h.2'\] requested"):
        check_same_identity(cache.manifest, cache_identity(one, "float32", ["transformer.h.2"]), out, hookpoints_subset=True)

    # --hookpoints overrides the config's: the same list resumes (nothing to add), another order is refused
    arguments = cli_arguments(tiny_lm_dir, text_file, out)
    assert main(arguments + ["--hookpoints", "transformer.h.1,transformer.h.0"]) == 0
    assert "this run wrote 0 windows" in capsys.readouterr().out
    with pytest.raises(CacheError, match=re.escape("hookpoints: ['transformer.h.1', 'transformer.h.0'] in the cache")):
        main(arguments + ["--hookpoints", "transformer.h.0,transformer.h.1"])
    assert (out / "manifest.json").read_bytes() == manifest_before


def test_cli_hookpoints_build_the_same_cache_as_the_variants_config(built2, lm, tiny_lm_dir, text_file, tmp_path):
    out = tmp_path / "cli2"
    assert main(cli_arguments(tiny_lm_dir, text_file, out) + ["--hookpoints", " transformer.h.1, transformer.h.0"]) == 0
    assert_same_cache(out, built2, lm[1])
    with pytest.raises(SystemExit):
        main(cli_arguments(tiny_lm_dir, text_file, tmp_path / "bad") + ["--hookpoints", "transformer.h.0,,"])


# ---------------------------------------------------------------- 9. version 1 caches


def as_version_1(directory: Path) -> None:
    """Rewrite a one-hookpoint cache as the previous format wrote it: one "activations" tensor per shard,
    "hookpoint" and an int "d_in" in the manifest, format_version 1."""
    manifest = json.loads((directory / "manifest.json").read_text())
    (hookpoint,) = manifest.pop("hookpoints")
    manifest = {"hookpoint": hookpoint, **manifest, "format_version": 1, "d_in": manifest["d_in"][hookpoint]}
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        tensors = load_file(str(path))
        save_file({"activations": tensors["activations.0"], "input_ids": tensors["input_ids"]}, str(path),
                  metadata={"first_window": str(entry["first_window"])})
        entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_version_1_cache_is_read_but_not_added_to(built, tiny_lm_dir, text_file, tmp_path):
    out = copy_of(built, tmp_path)
    as_version_1(out)
    old, new = ActivationCache(out, verify=True), ActivationCache(built)
    assert old.manifest["format_version"] == 1 and "hookpoint" not in old.manifest
    assert (old.hookpoints, old.hookpoint, old.d_in_of, old.d_in) == ([HOOKPOINT], HOOKPOINT, {HOOKPOINT: 32}, 32)
    assert torch.equal(old.read_windows(0, N_WINDOWS, HOOKPOINT), new.read_windows(0, N_WINDOWS))
    assert torch.equal(old.input_ids(0, N_WINDOWS), new.input_ids(0, N_WINDOWS))
    assert torch.equal(CachedWindows(old).next_activations(130).activations[0], CachedWindows(new).next_activations(130).activations[0])
    cfg = cache_config(tiny_lm_dir, text_file)
    check_same_identity(old.manifest, cache_identity(cfg, "float32"), out)  # trainable, as the trainer checks it
    with pytest.raises(CacheError, match=r"holds a version 1 cache .* can be read and trained from, but not added to"):
        build(cfg, out, tokens=(N_WINDOWS + 10) * TOKENS_PER_WINDOW)
    assert ActivationCache(out).n_windows == N_WINDOWS
