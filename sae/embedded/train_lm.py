"""Train the embedded default language model: a tiny GPT-2 on the "stdlib-docs" corpus.

    python -m sae.embedded.train_lm --out sae/embedded/gpt2-tiny --minutes 30 --seed 0

Steps: build the corpus (`corpus.py`), train a 4096-token byte-level BPE tokenizer on the train
split, train a 4-layer, 128-wide GPT-2 on 64-token windows for a wall-clock budget, and save the
best checkpoint (by held-out loss) with its tokenizer and a `training.json` record. The record also
holds unigram and bigram baselines on the same held-out tokens (`ngram.py`).

The learning rate warms up, stays at its peak, then follows a cosine decay over the last half of
the run. While it is at its peak, the total step count is re-planned from the average speed so far,
so a machine shared with other jobs still ends the decay at the budget; once the decay begins the
step count is fixed. `--steps N --decay-start D --eval-every E` replays a run without depending
on the machine's speed (training.json records the exact command; see `train` on exactness).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
)

from . import CORPUS_NAME
from .corpus import build_corpus, read_documents
from .ngram import baseline_losses

EOS = "<|endoftext|>"

TIMING_FROM_STEP = 5
"""Speed is measured from this step on: the first steps are slow (compilation, allocator)."""

FIRST_PLAN_STEP = 30
"""The step at which the run is first planned (number of steps, evaluation interval)."""


@dataclass(frozen=True)
class Hyperparams:
    """Everything that shapes the model and its training, recorded in training.json."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    context: int = 64
    """Window length, and also `n_positions`: longer inputs fail loudly instead of reaching
    position embeddings that training never updated."""
    dropout: float = 0.1
    """The corpus is small (~0.55M tokens) and a 30-minute run sees it ~20 times: regularise."""
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_fraction: float = 0.5
    """Share of the steps, at the end, over which the learning rate decays (cosine)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    n_evals: int = 40
    """Held-out evaluations spread over the run (plus one before the first step); fewer when
    they would take more than 10% of a short budget."""
    eval_batch_size: int = 32
    """Small batches evaluate faster on CPU (the logits stay in cache)."""
    threads: int = 2
    compile: bool = True
    """torch.compile the training step: ~2x faster on CPU (fused GELU, dropout, softmax) for a
    one-off ~1 minute of compilation. Falls back to eager mode if compilation fails."""


# ---------------------------------------------------------------------------------------------
# Tokenizer and data


def train_tokenizer(docs: list[str], hp: Hyperparams) -> PreTrainedTokenizerBase:
    """A byte-level BPE (GPT-2 style) fitted to `docs`, wrapped as a transformers tokenizer."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        docs, vocab_size=hp.vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    # `_tokenizer` is the underlying `tokenizers.Tokenizer` that transformers wraps. GPT-2 uses
    # its single special token for bos, eos and unk alike; byte-level BPE never actually needs
    # unk, since every byte has a token.
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS, eos_token=EOS, unk_token=EOS,
        model_max_length=hp.context,
    )


def encode_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def make_windows(stream: torch.Tensor, context: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping windows [n, context] starting at `offset`; the ragged tail is dropped."""
    n = (len(stream) - offset) // context
    return stream[offset : offset + n * context].view(n, context)


def train_batches(
    stream: torch.Tensor, context: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of windows; each pass over the data cuts windows at a new offset,
    so the model does not see the same window boundaries epoch after epoch."""
    while True:
        offset = int(torch.randint(context, (1,), generator=generator))
        windows = make_windows(stream, context, offset)
        order = torch.randperm(len(windows), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[i : i + batch_size]]


# ---------------------------------------------------------------------------------------------
# Model, optimisation, evaluation


def make_model(hp: Hyperparams, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=hp.context,
        n_embd=hp.n_embd,
        n_layer=hp.n_layer,
        n_head=hp.n_head,
        resid_pdrop=hp.dropout,
        embd_pdrop=hp.dropout,
        attn_pdrop=hp.dropout,
        # The defaults point at GPT-2's token 50256, which does not exist in this vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def make_optimizer(model: torch.nn.Module, hp: Hyperparams) -> torch.optim.AdamW:
    """AdamW that decays matrices (incl. the tied embedding) but not biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2))


@dataclass
class Schedule:
    """Learning-rate multiplier: linear warm-up, constant, then cosine decay to `min_lr_ratio`.

    While the decay has not started, `total_steps` may still move (`replan`); the decay starts
    at the first step past `1 - decay_fraction` of the current plan, and from then on both
    `decay_start` and `total_steps` are fixed. Because the multiplier before the decay does not
    depend on `total_steps`, (total_steps, decay_start) alone determine the whole schedule.
    """

    hp: Hyperparams
    total_steps: int
    decay_start: int | None = None

    def update(self, step: int) -> None:
        """Start the decay if `step` has reached it (never during warm-up)."""
        start = max(self.hp.warmup_steps, round((1 - self.hp.decay_fraction) * self.total_steps))
        if self.decay_start is None and step >= start:
            self.decay_start = step

    def replan(self, step: int, total_steps: int) -> None:
        """Move the end of the run, unless the decay has already begun."""
        if self.decay_start is None:
            self.total_steps = max(step + 1, total_steps)

    def factor(self, step: int) -> float:
        hp = self.hp
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if self.decay_start is None or step < self.decay_start:
            return 1.0
        span = max(1, self.total_steps - self.decay_start)
        progress = min(1.0, (step - self.decay_start) / span)
        return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(
    model: torch.nn.Module, windows: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy (nats) of predicting tokens 1..T-1 of each window from their prefix."""
    logits = model(windows).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean held-out cross-entropy in nats per predicted token (dropout off)."""
    was_training = model.training
    model.eval()
    total = sum(
        next_token_loss(model, windows[i : i + batch_size]).item()
        for i in range(0, len(windows), batch_size)
    )
    model.train(was_training)
    return total / (len(windows) * (windows.shape[1] - 1))


def first_plan(
    budget_s: float, elapsed_s: float, step_s: float, eval_s: float, steps_done: int,
    max_evals: int,
) -> tuple[int, int]:
    """(total steps, steps between evaluations) that fit in the budget, evaluations included.

    Evaluations get at most 10% of the remaining time. The evaluation interval chosen here stays
    for the whole run; the step count is only a first estimate (see `replan_total`).
    """
    remaining = budget_s - elapsed_s
    n_evals = min(max_evals, max(1, int(0.1 * remaining / eval_s)))
    total = steps_done + max(1, int(0.97 * (remaining - n_evals * eval_s) / step_s))
    return total, max(1, total // n_evals)


def replan_total(budget_s: float, elapsed_s: float, avg_step_s: float, steps_done: int) -> int:
    """Steps that fit in the budget at the average pace so far (which includes evaluations).

    A 2% margin absorbs noise: the machine may be shared with other jobs.
    """
    return steps_done + max(1, int(0.98 * (budget_s - elapsed_s) / avg_step_s))


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Data:
    """Everything training and evaluation read, all derived from the corpus."""

    train_docs: list[str]
    val_docs: list[str]
    tokenizer: PreTrainedTokenizerBase
    train_stream: torch.Tensor  # 1-D token ids, documents separated by end-of-text
    val_windows: torch.Tensor  # [n, context]: the held-out tokens every loss is measured on


def prepare_data(hp: Hyperparams, corpus_dir: str | Path | None = None) -> Data:
    """Build the corpus (in a throwaway directory unless `corpus_dir` is given), fit the tokenizer
    on the train split and tokenise both splits."""
    with tempfile.TemporaryDirectory() as tmp_corpus:
        paths = build_corpus(corpus_dir or tmp_corpus)
        train_docs = read_documents(paths["train"])
        # The LM's held-out text is both of the SAE's held-out splits: the 5% of documents the shipped model
        # was trained without, so that retraining reproduces it.
        val_docs = read_documents(paths["validation"]) + read_documents(paths["test"])
    tokenizer = train_tokenizer(train_docs, hp)
    return Data(
        train_docs, val_docs, tokenizer,
        encode_stream(tokenizer, train_docs),
        make_windows(encode_stream(tokenizer, val_docs), hp.context),
    )


@dataclass
class LoopResult:
    """What the training loop hands back; the model itself is left at its best checkpoint."""

    schedule: Schedule
    eval_every: int | None
    curve: list[dict]
    best_step: int
    minutes: float


def train_loop(
    model: GPT2LMHeadModel,
    data: Data,
    hp: Hyperparams,
    minutes: float,
    data_gen: torch.Generator,
    steps: int | None = None,
    eval_every: int | None = None,
    decay_start: int | None = None,
) -> LoopResult:
    """Train within `minutes` (or for exactly `steps`), evaluating every `eval_every` steps and
    at the end; load the checkpoint with the lowest held-out loss back into `model`."""
    model.train()
    optimizer = make_optimizer(model, hp)
    batches = train_batches(data.train_stream, hp.context, hp.batch_size, data_gen)
    budget_s = minutes * 60
    train_start = time.perf_counter()
    evaluate(model, data.val_windows[:2])  # warm-up, so the timed evaluation is representative
    eval_start = time.perf_counter()
    val_loss = evaluate(model, data.val_windows, hp.eval_batch_size)
    eval_s = time.perf_counter() - eval_start
    curve = [{"step": 0, "train_loss": None, "val_loss": val_loss, "lr": 0.0, "minutes": 0.0}]
    best = {"val_loss": val_loss, "step": 0, "state": copy.deepcopy(model.state_dict())}

    fixed = steps is not None
    # Before the first plan the step count is a placeholder: warm-up does not depend on it.
    schedule = Schedule(hp, steps if fixed else 10**9, decay_start)
    if fixed and eval_every is None:
        eval_every = max(1, steps // hp.n_evals)
    loss_fn = torch.compile(next_token_loss) if hp.compile else next_token_loss
    timing_start = 0.0
    loss_sum, loss_count = 0.0, 0
    step = 0
    while step < schedule.total_steps:
        schedule.update(step)
        factor = schedule.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = hp.lr * factor
        batch = next(batches)
        try:
            loss = loss_fn(model, batch, "mean")
        except Exception as error:  # compilation needs a C++ compiler; eager mode always works
            if loss_fn is next_token_loss:
                raise
            print(f"torch.compile failed ({type(error).__name__}: {error}); eager mode", flush=True)
            loss_fn = next_token_loss
            loss = loss_fn(model, batch, "mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        step += 1

        now = time.perf_counter()
        if step == TIMING_FROM_STEP:
            timing_start = now
        if not fixed and step == FIRST_PLAN_STEP:
            step_s = (now - timing_start) / (step - TIMING_FROM_STEP)
            total, planned_every = first_plan(
                budget_s, now - train_start, step_s, eval_s, step, hp.n_evals
            )
            schedule.replan(step, total)
            eval_every = eval_every or planned_every
            print(
                f"{step_s * 1000:.0f} ms/step, eval {eval_s:.1f} s -> ~{total} steps "
                f"in {minutes:g} min, eval every {eval_every}",
                flush=True,
            )
        elif not fixed and step > FIRST_PLAN_STEP:
            avg_step_s = (now - timing_start) / (step - TIMING_FROM_STEP)
            schedule.replan(step, replan_total(budget_s, now - train_start, avg_step_s, step))

        if eval_every is not None and (step % eval_every == 0 or step == schedule.total_steps):
            val_loss = evaluate(model, data.val_windows, hp.eval_batch_size)
            train_loss = loss_sum / loss_count
            loss_sum, loss_count = 0.0, 0
            mins = (time.perf_counter() - train_start) / 60
            curve.append(
                {"step": step, "train_loss": train_loss, "val_loss": val_loss,
                 "lr": hp.lr * factor, "minutes": mins}
            )
            if val_loss < best["val_loss"]:
                state = copy.deepcopy(model.state_dict())
                best = {"val_loss": val_loss, "step": step, "state": state}
            print(
                f"step {step:6d}/{schedule.total_steps}  train {train_loss:.4f}  "
                f"val {val_loss:.4f}  lr {hp.lr * factor:.2e}  {mins:.1f} min",
                flush=True,
            )
    train_minutes = (time.perf_counter() - train_start) / 60
    model.load_state_dict(best["state"])
    model.eval()
    return LoopResult(schedule, eval_every, curve, best["step"], train_minutes)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A fresh directory next to `out` that replaces `out` only if the block completes, so the
    model folder is never half-written and never keeps stray files from an older run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        # mkdtemp and some writers create owner-only files; the model ships as package data.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def reproduce_command(
    out: Path, minutes: float, seed: int, steps: int, schedule: Schedule, eval_every: int | None
) -> str:
    """The command line that replays this run step for step, whatever the machine's speed."""
    cmd = f"python -m sae.embedded.train_lm --out {out} --minutes {minutes:g} --seed {seed} "
    cmd += f"--steps {steps} --eval-every {eval_every}"
    if schedule.decay_start is not None:  # None only for runs that end during warm-up
        cmd += f" --decay-start {schedule.decay_start}"
    return cmd


def environment() -> dict[str, dict]:
    """Library versions and the machine, for the record."""
    return {
        "versions": {
            "python": sys.version,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def train(
    out: str | Path,
    minutes: float,
    seed: int = 0,
    steps: int | None = None,
    corpus_dir: str | Path | None = None,
    hp: Hyperparams = Hyperparams(),
    eval_every: int | None = None,
    decay_start: int | None = None,
) -> dict:
    """Train and save the embedded model into `out`; return the training record.

    `steps` fixes the step count instead of deriving it from `minutes`; with the recorded
    `decay_start` and `eval_every` (which decides the candidates for the best checkpoint) it
    replays a run.
    """
    run_start = time.perf_counter()
    out = Path(out)
    torch.set_num_threads(hp.threads)
    # Seeding makes a replay (`--steps N`) repeat the initialisation, data order and dropout
    # masks. We do not ask for torch.use_deterministic_algorithms: it doubles the CPU step time
    # (embedding backward). Without it, eager CPU training still replays bit for bit; compiled
    # training replays up to float rounding (weights within ~1e-4, losses within ~1e-7).
    torch.manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed)

    data = prepare_data(hp, corpus_dir)
    val = data.val_windows
    contexts, targets = val[:, :-1].reshape(-1), val[:, 1:].reshape(-1)
    baselines = baseline_losses(data.train_stream, contexts, targets, len(data.tokenizer))
    print(
        f"corpus: {len(data.train_docs)} train / {len(data.val_docs)} validation documents, "
        f"{len(data.train_stream)} train tokens, {targets.numel()} scored validation tokens\n"
        f"baselines (nats/token): unigram {baselines['unigram']['loss']:.4f}, "
        f"bigram {baselines['bigram']['loss']:.4f} (lambda={baselines['bigram']['lambda']})",
        flush=True,
    )

    model = make_model(hp, data.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    result = train_loop(model, data, hp, minutes, data_gen, steps, eval_every, decay_start)
    total_steps = result.schedule.total_steps

    with staged_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        data.tokenizer.save_pretrained(staging)
        # Score what was written, reloaded the way users load it: the record is the truth on disk.
        reloaded = AutoModelForCausalLM.from_pretrained(staging)
        reloaded_tok = AutoTokenizer.from_pretrained(staging)
        same_tokens = torch.equal(
            make_windows(encode_stream(reloaded_tok, data.val_docs), hp.context), val
        )
        held_out = evaluate(reloaded, val, hp.eval_batch_size)
        record = {
            "corpus": CORPUS_NAME,
            "held_out_loss": held_out,
            "held_out_loss_unit": (
                f"nats per predicted token ({hp.context}-token windows, "
                f"{hp.context - 1} predictions each)"
            ),
            "held_out_perplexity": math.exp(held_out),
            "final_step_val_loss": result.curve[-1]["val_loss"],
            "best_step": result.best_step,
            "baselines": baselines,
            "documents": {"train": len(data.train_docs), "validation": len(data.val_docs)},
            "tokens": {
                "train": len(data.train_stream),
                "validation_scored": targets.numel(),
                "validation_windows": len(val),
            },
            "reloaded_tokenizer_matches": same_tokens,
            "steps": total_steps,
            "decay_start": result.schedule.decay_start,
            "eval_every": result.eval_every,
            "minutes_budget": minutes,
            "minutes_training": result.minutes,
            "minutes_total": (time.perf_counter() - run_start) / 60,
            "epochs": total_steps * hp.batch_size * hp.context / len(data.train_stream),
            "seed": seed,
            "parameters": n_params,
            "hyperparameters": dataclasses.asdict(hp),
            **environment(),
            "reproduce": reproduce_command(
                out, minutes, seed, total_steps, result.schedule, result.eval_every
            ),
            "curve": result.curve,
        }
        write_json(staging / "training.json", record)
    print(
        f"saved {out}: held-out {held_out:.4f} nats/token (best step {result.best_step}), "
        f"unigram {baselines['unigram']['loss']:.4f}, bigram {baselines['bigram']['loss']:.4f}, "
        f"{total_steps} steps in {result.minutes:.1f} min",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded tiny GPT-2 (gpt2-tiny).")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None,
        help="fixed number of steps (overrides --minutes' estimate; replays a recorded run)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=None,
        help="steps between held-out evaluations (default: planned from the budget)",
    )
    parser.add_argument(
        "--decay-start", type=int, default=None,
        help="with --steps: step at which the decay begins (default: half way)",
    )
    parser.add_argument("--no-compile", action="store_true", help="train in eager mode")
    parser.add_argument(
        "--corpus-dir", type=Path, default=None,
        help="keep the built corpus here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # keep the log to one line per event
    hp = Hyperparams(compile=not args.no_compile)
    train(
        args.out, args.minutes, args.seed, args.steps, args.corpus_dir, hp,
        args.eval_every, args.decay_start,
    )


if __name__ == "__main__":
    main()
