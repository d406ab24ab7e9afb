"""EleutherAI sparsify's own `Trainer`, with its defaults, on the benchmark's shared batches.

sparsify trains from a transformers model and a dataset of token ids, hooking the model. Here the
"model" is a stand-in that takes the next (inputs, targets) batch of the shared order and calls its one
hooked submodule, `rows`, with it; `rows` returns the targets. So sparsify's hook sees the inputs as the
module's input and the targets as its output: a transcoder (sparsify's `transcode`) reads the inputs and
predicts the targets, an SAE reconstructs the targets (its inputs). The dataset's items are 1-token
sequences, so sparsify's batch of `batch_size` sequences is exactly one of our batches of `batch_size`
rows. Everything else (its optimiser, learning rate, init, b_dec from the first batch's mean, no AuxK by
default) is sparsify's. Its saves (`Trainer.save`, schedule-free weights swapped in) are copied out as
our SAE folders at the benchmark's checkpoint steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from sae.model import SparseAutoencoder


class _NextRows(nn.Module):
    """Called with (B, 1) "input ids", returns the next batch's (inputs, targets), each (B, 1, d_in); any
    other batch size (sparsify's width probe) gets zeros and consumes nothing.

    Before handing out batch s + 1 it calls `before_batch(s)`: sparsify has then taken exactly s
    optimiser steps and holds no autograd graph, so the SAE can be saved there. (sparsify's own
    `save_every` saves after s steps where s + 1 is a multiple, one step off the checkpoints.)"""

    def __init__(self, batches: Iterator[tuple[Tensor, Tensor]], batch_size: int, d_in: int,
                 before_batch: Callable[[int], None]):
        super().__init__()
        self.batches, self.batch_size, self.d_in, self.before_batch = batches, batch_size, d_in, before_batch
        self.served = 0  # batches handed out

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        if input_ids.shape[0] != self.batch_size:
            zeros = torch.zeros(*input_ids.shape, self.d_in)
            return zeros, zeros
        self.before_batch(self.served)
        inputs, targets = next(self.batches)
        self.served += 1
        return inputs.reshape(self.batch_size, 1, self.d_in), targets.reshape(self.batch_size, 1, self.d_in)


class _Module(nn.Module):
    """The module sparsify hooks: its input (the first argument) is what the sparse coder reads, its
    output what it predicts."""

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return targets


class _RowsModel(nn.Module):
    """What sparsify's Trainer needs of a transformers model: `base_model`, `device`, `dummy_inputs`, a call."""

    def __init__(self, next_rows: _NextRows):
        super().__init__()
        self.next_rows = next_rows
        self.rows = _Module()

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.rows(*self.next_rows(input_ids))


class _OneTokenSequences(torch.utils.data.Dataset):
    """`count` items {"input_ids": (1,)}: the values are unused, only the batch shape matters."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, dtype=torch.long)}


def train_sparsify(batches: Iterator[tuple[Tensor, Tensor]], steps: int, batch_size: int, d_in: int, n_latents: int,
                   k: int, checkpoint_steps: list[int], out_dir: Path, metadata: dict, seed: int = 0,
                   lr_factor: float = 1.0, transcode: bool = False, skip_connection: bool = False) -> dict[int, Path]:
    """Train sparsify's TopK sparse coder (its Trainer's defaults, its default learning rate times `lr_factor`;
    with `transcode` a transcoder, with `skip_connection` a skip path, sparsify's own options) for `steps`
    steps on `batches` of (inputs, targets), each (batch_size, d_in): an SAE's targets are its inputs; after
    each of `checkpoint_steps` write it as our SAE folder out_dir/step-N; {step: folder}."""
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
    from sparsify import SparseCoderConfig, Trainer
    from sparsify import TrainConfig as SparsifyTrainConfig

    folders: dict[int, Path] = {}
    saved = out_dir / "sparsify" / "run" / "rows"  # where Trainer.save writes the SAE

    def export(steps_done: int) -> None:
        folders[steps_done] = SparseAutoencoder.load(saved).save(out_dir / f"step-{steps_done:08d}", metadata={
            **metadata, "system": "sparsify", "tokens_trained": steps_done * batch_size})

    def before_batch(steps_done: int) -> None:
        if steps_done in checkpoint_steps and steps_done not in folders:
            trainer.save()  # with the schedule-free average swapped in, as sparsify saves it
            export(steps_done)

    rows = _NextRows(batches, batch_size, d_in, before_batch)
    cfg = SparsifyTrainConfig(
        SparseCoderConfig(num_latents=n_latents, k=k, transcode=transcode, skip_connection=skip_connection),
        batch_size=batch_size, hookpoints=["rows"],
        init_seeds=[seed], save_every=steps + 1, log_to_wandb=False, save_dir=str(out_dir / "sparsify"), run_name="run",
    )
    trainer = Trainer(cfg, _OneTokenSequences(steps * batch_size), _RowsModel(rows))
    scale_learning_rates(trainer, lr_factor)
    trainer.fit()  # ends with a save after the last step
    export(steps)
    shutil.rmtree(out_dir / "sparsify")
    return folders


def scale_learning_rates(trainer, factor: float) -> None:
    """Multiply the learning rate sparsify's Trainer chose (its default rule for this width) by `factor`,
    in its optimisers and in any schedulers' base rates, before training starts."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for scheduler in trainer.lr_schedulers:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
