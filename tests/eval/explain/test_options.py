"""The scoring options `python -m eval` and `python -m eval.explain puzzles` share are declared once:
same name, same --help entry, and the same backend built from them."""

import pytest

from eval.__main__ import EvalConfig
from eval.__main__ import main as eval_main
from eval.explain.__main__ import PuzzleConfig
from eval.explain.__main__ import main as explain_main

# Options whose meaning differs between the commands on purpose: eval reads them from each SAE's cfg.json.
PER_COMMAND = {"--config", "--model", "--dataset", "--split", "--ctx_len", "--tokens", "--seed", "--out"}


def help_entries(main, argv, capsys) -> dict[str, str]:
    """--help's entries by option name: the option's line and the lines of its description."""
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("  --"):
            name = line.split()[0]
            entries[name] = line
        elif name is not None:
            entries[name] += "\n" + line
    return entries


def test_shared_options_have_one_help_entry(capsys):
    eval_help = help_entries(eval_main, ["--help"], capsys)
    puzzles_help = help_entries(explain_main, ["puzzles", "--help"], capsys)
    shared = (set(eval_help) & set(puzzles_help)) - PER_COMMAND
    assert {"--simulators", "--simulator_url", "--api_key_env", "--http_concurrency", "--cache_dir"} <= shared
    for name in sorted(shared):
        assert eval_help[name] == puzzles_help[name], name


@pytest.mark.parametrize("cls", [EvalConfig, PuzzleConfig])
def test_the_simulator_backend_uses_the_options(cls, tmp_path):
    cfg = cls(simulator_url="http://127.0.0.1:9/v1", simulator_model="m", http_concurrency=7,
              cache_dir=str(tmp_path), api_key_env="NO_SUCH_KEY_VARIABLE")
    backend = cfg.simulator_backend()
    assert (backend.base_url, backend.model, backend.concurrency, backend.cache_dir) == (
        "http://127.0.0.1:9/v1", "m", 7, tmp_path)
    assert cls().simulator_backend() is None  # no URL, no model: the offline simulators only
