"""The command lines: every entry point's --help lists every option, and a user's mistake is one line
on stderr with exit status 2 (sae/errors.py), never a traceback."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import train
from eval.__main__ import EvalConfig
from eval.__main__ import main as eval_main
from eval.browse.__main__ import BrowseConfig
from eval.browse.__main__ import main as browse_main
from eval.explain.__main__ import PuzzleConfig
from eval.explain.__main__ import main as explain_main
from eval.peers.__main__ import PeersConfig
from eval.peers.__main__ import main as peers_main
from eval.scaling import ScalingConfig, main as scaling_main
from sae import bench
from sae.cache import cli as cache_cli
from sae.config import TrainConfig, field_docs

REPO = Path(__file__).resolve().parents[1]


def option_names(cls: type, prefix: str = "") -> list[str]:
    """--NAME of every field of config dataclass `cls`, nested sections dotted."""
    names = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            names += option_names(hint, f"{prefix}{name}.")
        else:
            names.append(f"--{prefix}{name}")
    return names


def help_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


def listed(help_text: str) -> set[str]:
    """The option names a help text lists, each at the start of an entry line."""
    return {line.split()[0].rstrip(",") for line in help_text.splitlines() if line.strip().startswith("--")}


@pytest.mark.parametrize("main, argv, cls", [
    (train.main, ["--help"], TrainConfig),
    (train.main, ["--sae.k", "8", "-h"], TrainConfig),
    (eval_main, ["--help"], EvalConfig),
    (eval_main, ["runs/x", "-h"], EvalConfig),
    (explain_main, ["puzzles", "--help"], PuzzleConfig),
    (browse_main, ["--help"], BrowseConfig),
    (peers_main, ["--help"], PeersConfig),
    (scaling_main, ["--help"], ScalingConfig),
], ids=["train", "train-h", "eval", "eval-h", "explain", "browse", "peers", "scaling"])
def test_help_lists_every_option_with_its_default(main, argv, cls, capsys):
    text = help_of(main, argv, capsys)
    assert set(option_names(cls)) | {"--config"} == listed(text)
    entries = [line for line in text.splitlines() if line.startswith("  --") and not line.startswith("  --config")]
    assert len(entries) == len(option_names(cls)) and all("(default: " in line or "(required)" in line for line in entries)
    assert text.index("\noptions:\n") > 0  # the usage, from the entry point's docstring, comes first


def test_every_option_has_a_docstring_that_help_shows(capsys):
    """A field without a docstring would be an option --help cannot explain."""
    for cls in (TrainConfig, EvalConfig, PuzzleConfig, BrowseConfig, PeersConfig, ScalingConfig):
        for item in dataclasses.fields(cls):
            assert field_docs(cls).get(item.name), f"{cls.__name__}.{item.name} has no docstring"
    text = help_of(train.main, ["--help"], capsys)
    assert "--sae.k INT  (default: 16)\n      Number of latents kept per token" in text
    assert "--optimizer {adam,schedule_free_adam}  (default: schedule_free_adam)" in text


def test_the_cache_and_bench_help_list_their_options(capsys):
    text = help_of(cache_cli.main, ["--help"], capsys)
    own = [option for action in cache_cli._cache_arguments()._actions for option in action.option_strings
           if option.startswith("--") and option != "--help"]
    assert set(own + option_names(TrainConfig) + ["--config"]) == listed(text)
    text = help_of(bench.main, ["--help"], capsys)
    assert {"--json", "--threads", "--repeats", "--device", "--quick", "--only"} == listed(text)
    from sae import convert

    text = help_of(convert.main, ["--help"], capsys)
    assert {"--to", "--model", "--hookpoint"} <= listed(text)


def run_train(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[-1], lines[-1]
    # the error line is the only one that is not tqdm's or a library's warning
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]


def test_user_mistakes_are_one_line_and_exit_status_2(tiny_lm_dir, text_file, tmp_path):
    base = [f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1", f"--data.dataset={text_file}", "--data.ctx_len=16",
            "--batch_size=64", "--max_tokens=128", "--sae.n_latents=64", "--sae.k=4", f"--out_dir={tmp_path}"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sae:\n  k: [8\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "log.jsonl").write_text('{"step": 5}\n')
    cases = [
        (["--hookpoint=transformer.h.9"], ["hookpoint 'transformer.h.9'", "transformer.h.{0..2}"]),
        (["--model=./gpt2-typo"], ["model folder not found: ./gpt2-typo"]),  # was a traceback of 88 lines
        ([f"--data.dataset={tmp_path / 'missing.txt'}"], ["data file not found", "missing.txt"]),
        (["--run_name=taken"], ["already holds a run", "log.jsonl", "--resume"]),
        (["--config", str(bad_yaml)], ["bad.yaml: not valid YAML"]),
        (["--lr=-1"], ["lr"]),
        (["--data.ctx_len=999"], ["data.ctx_len is 999", "positions"]),
        (["--sae.kk=1"], ["unknown config key 'sae.kk'"]),
        # 2^28 latents: ~1 TiB of SAE and optimiser; refused from the estimate before any of it exists
        (["--sae.n_latents=268435456"], ["the run needs about", "free", "sae.n_latents"]),
    ]
    for extra, words in cases:
        assert_one_line_error(run_train(*base, *extra), *words)
    assert (tmp_path / "taken" / "log.jsonl").read_text() == '{"step": 5}\n'  # nothing overwritten


def test_empty_data_is_one_line_too(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": " \\n\\t "}\n')  # whitespace alone trained an SAE with exit 0
    result = run_train(f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1", f"--data.dataset={empty}",
                       "--data.ctx_len=16", "--batch_size=64", "--max_tokens=128", f"--out_dir={tmp_path}")
    assert_one_line_error(result, "no non-empty documents")


def test_other_entry_points_exit_2_with_one_line(tmp_path):
    for module, argv, words in [
        ("eval", [str(tmp_path / "nowhere")], ["SAE not found", "nowhere"]),
        ("sae.convert", [str(tmp_path / "nowhere"), str(tmp_path / "out"), "--to", "saelens"], ["not found", "nowhere"]),
        ("eval.browse", [str(tmp_path / "nowhere")], ["--out"]),
        ("sae.cache", ["--out", str(tmp_path / "cache"), "--verify"], ["no activation cache"]),
        ("sae.finetune", [str(tmp_path / "nowhere"), "--tokens", "1024"], ["SAE folder not found", "nowhere"]),
        ("sae.publish", [str(tmp_path / "nowhere"), "owner/repo", "--dry_run", str(tmp_path / "staged")], ["run folder not found", "nowhere"]),
    ]:
        result = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert_one_line_error(result, *words)
