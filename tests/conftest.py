"""Shared fixtures. Everything runs on CPU, offline, writing nothing outside temporary folders."""

import os
import tempfile

# Set before anything imports transformers, datasets, wandb or a Triton kernel module.
_SANDBOX = tempfile.mkdtemp(prefix="sae-tests-")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HOME"] = os.path.join(_SANDBOX, "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_DIR"] = os.path.join(_SANDBOX, "wandb")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# sparsify picks its decoder when imported: its Triton one would run in the interpreter here, several times slower
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_WORDS = (
    "the a an sparse latent model token window stream residual layer value index decoder encoder "
    "returns list string number file path error name class function method object module python "
    "when if each every only one two three first last new old small large read write open close"
).split()


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of varying length."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A JSON-lines file of 300 small documents, {"text": ...} per line."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with open(path, "w") as file:
        for document in make_documents(300):
            file.write(json.dumps({"text": document}) + "\n")
    return path


def save_tiny_gpt2(path: Path, texts: list[str], vocab_size: int, n_positions: int, n_layer: int, seed: int) -> Path:
    """A randomly initialised GPT-2 (width 32, 2 heads) with a byte-level BPE tokenizer trained on
    `texts`, saved with `save_pretrained` so it loads through the same `from_pretrained` path as a real model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    bpe.save(str(path / "tokenizer.json"))
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=n_layer, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_factory():
    """`save_tiny_gpt2`, for test folders whose own conftest builds other tiny LMs."""
    return save_tiny_gpt2


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A randomly initialised 3-layer GPT-2 (width 32) with a BPE tokenizer trained on pseudo-English."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-lm"), make_documents(200, seed=1), vocab_size=300,
                          n_positions=64, n_layer=3, seed=0)


@pytest.fixture(scope="session")
def embedded_sae_dir(tmp_path_factory) -> Path:
    """A short run of the embedded default (committed model, stdlib corpus), with held-out evals every
    50 steps and wandb offline: RUN_DIR/transformer.h.2."""
    from sae.config import DataConfig, SaeConfig, TrainConfig
    from eval import training_evaluator
    from sae.trainer import train

    root = tmp_path_factory.mktemp("embedded")
    cfg = TrainConfig(
        sae=SaeConfig(n_latents=512, k=16, k_aux=64, dead_tokens=100_000),
        data=DataConfig(data_dir=str(root / "data"), shuffle_buffer_tokens=8192),
        batch_size=1024,
        max_tokens=1024 * 100,
        lr=3e-3,
        lr_warmup_steps=10,
        log_every=1,
        save_every=0,
        eval_every=50,
        eval_tokens=4096,
        out_dir=str(root / "runs"),
        wandb_mode="offline",
    )
    return train(cfg, evaluator=training_evaluator)
