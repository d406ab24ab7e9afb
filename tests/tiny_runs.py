"""Tiny training runs shared by the tests of each kind of coder: the config, and the check that a run
stopped at step 7 and resumed to step 12 saves what an uninterrupted 12-step run saves, bit for bit."""

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.config import DataConfig, SaeConfig, TrainConfig
from sae.trainer import train

STEPS, STOP_AT, BATCH = 12, 7, 64


def tiny_run_config(lm_dir: Path, text_file: Path, out_dir: Path, run_name: str, max_tokens: int, sae: SaeConfig,
                    hookpoint: str = "transformer.h.1", **overrides) -> TrainConfig:
    """A run of `sae` on the tiny LM and text of tests/conftest.py: 16-token windows, batches of 64 tokens,
    a checkpoint every 5 steps."""
    values = dict(model=str(lm_dir), hookpoint=hookpoint, sae=sae,
                  data=DataConfig(dataset=str(text_file), ctx_len=16, shuffle_buffer_tokens=512),
                  batch_size=BATCH, max_tokens=max_tokens, save_every=5, out_dir=str(out_dir), run_name=run_name)
    return TrainConfig(**(values | overrides))


def train_whole_and_resumed(config) -> Path:
    """Train `config(run_name, max_tokens)` for STEPS steps at once, and again stopped after STOP_AT steps
    and resumed; assert the two saved SAEs are equal bit for bit; return the first's folder."""
    whole = train(config("whole", BATCH * STEPS))
    stopped = config("resumed", BATCH * STOP_AT)
    train(stopped)
    resumed = train(dataclasses.replace(stopped, max_tokens=BATCH * STEPS, resume=True))
    for name, tensor in load_file(whole / "sae.safetensors").items():
        assert torch.equal(tensor, load_file(resumed / "sae.safetensors")[name]), name
    return whole
