"""wandb sweep files: every parameter is a TrainConfig key, and a run launched by wandb's own agent
code (offline: the server's part, handing out a run, is played by the test) trains and logs the
metrics the sweep optimises."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from sae.config import TrainConfig, parse_args

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs").glob("sweep-*.yaml"))


def agent_args(parameters: dict) -> list[str]:
    """The flags wandb's agent builds for the first grid point (its ${args} macro)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = {name: {"value": spec["values"][0] if "values" in spec else spec["value"]} for name, spec in parameters.items()}
    return create_sweep_command_args({"args": values})["args"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_round_trips_through_the_cli(path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and "${args}" in sweep["command"]
    assert sweep["metric"]["name"].startswith("final/")
    monkeypatch.chdir(REPO)  # sweep files name configs relative to the repo root
    cfg = parse_args(agent_args(sweep["parameters"]))
    for name, spec in sweep["parameters"].items():
        value = spec["values"][0] if "values" in spec else spec["value"]
        if name != "config":
            node = cfg
            for part in name.split("."):
                node = getattr(node, part)
            assert node == value, name


def test_run_name_auto_needs_the_agent_run_id(monkeypatch):
    from sae.trainer import train

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    with pytest.raises(ValueError, match="WANDB_RUN_ID"):
        train(TrainConfig(run_name="auto"))


def test_a_sweep_run_under_wandb_agent_offline(tiny_lm_dir, text_file, tmp_path, monkeypatch):
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((REPO / "configs" / "sweep-k.yaml").read_text())
    parameters = {name: {"value": spec["values"][0] if "values" in spec else spec["value"]}
                  for name, spec in sweep["parameters"].items()}
    parameters.update({  # shrink the run to the test's tiny model and text
        "model": {"value": str(tiny_lm_dir)}, "hookpoint": {"value": "transformer.h.1"},
        "data.dataset": {"value": str(text_file)}, "data.ctx_len": {"value": 16},
        "data.shuffle_buffer_tokens": {"value": 512}, "sae.n_latents": {"value": 64}, "sae.k": {"value": 4},
        "batch_size": {"value": 128}, "max_tokens": {"value": 1280}, "eval_every": {"value": 0},
        "lr_warmup_steps": {"value": 2}, "wandb_mode": {"value": "offline"}, "out_dir": {"value": str(tmp_path / "runs")},
    })
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # ${interpreter} is "python"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    agent = Agent(api=None, queue=None, sweep_id="offline")
    agent._sweep_command = sweep["command"]
    agent._command_run({"type": "run", "run_id": "sweeprun1", "program": sweep["program"], "args": parameters})
    process = agent._run_processes["sweeprun1"]
    process.wait(timeout=300)
    assert process.poll() == 0
    sae_dir = tmp_path / "runs" / "sweeprun1" / "transformer.h.1"  # run_name auto -> the agent's run id
    saved = json.loads((sae_dir / "cfg.json").read_text())
    assert saved["k"] == 4 and saved["run_name"] == "sweeprun1" and "fvu" in saved["final_metrics"]["last_train_batch"]
    [offline_run] = (tmp_path / "runs" / "sweeprun1" / "wandb").glob("offline-run-*-sweeprun1")
    assert b"final/fvu" in (offline_run / "run-sweeprun1.wandb").read_bytes()  # the metric the sweep optimises
