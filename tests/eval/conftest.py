"""Fixtures for the eval tests: the tiny LM, loaded once per module, and random token windows."""

from pathlib import Path

import pytest
import torch
import yaml

from sae.activations import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    """(model, tokenizer) of the tiny 3-layer width-32 GPT-2, on CPU in float32."""
    return load_model_and_tokenizer(str(tiny_lm_dir))


@pytest.fixture
def windows(tiny_lm):
    """(10, 16) random token windows (10 is not a multiple of the batch sizes the tests use)."""
    model, _ = tiny_lm
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (10, 16), generator=generator)


@pytest.fixture(scope="module")
def embedded_lm():
    """(model, tokenizer) of the committed embedded GPT-2 (trained: ablating its residual stream hurts)."""
    from sae.embedded import EMBEDDED_MODEL_DIR

    return load_model_and_tokenizer(str(EMBEDDED_MODEL_DIR))


@pytest.fixture
def embedded_windows(embedded_lm):
    """(10, 16) windows of English text the embedded model knows the style of (stdlib docstrings)."""
    import argparse, collections, json, logging, textwrap, typing

    _, tokenizer = embedded_lm
    text = "\n\n".join(module.__doc__ for module in (argparse, collections, json, logging, textwrap, typing))
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids[: 10 * 16]).view(10, 16)


@pytest.fixture
def train_config(tmp_path, tiny_lm_dir, text_file) -> Path:
    """A YAML run config of the tiny LM on the local text file (its hash-chosen validation and test splits),
    for the peer benchmark's tests; its sae is a plain SAE (a transcoder system asks for one itself)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_lm_dir), "hookpoint": "transformer.h.1",
        "sae": {"n_latents": 64, "k": 4, "k_aux": 8, "dead_tokens": 2000},
        "data": {"dataset": str(text_file), "ctx_len": 16, "shuffle_buffer_tokens": 512},
        "batch_size": 128, "lr_warmup_steps": 2, "log_every": 3,
    }))
    return path
