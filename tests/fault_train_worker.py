"""`python train.py ARGS` with faults injected, for tests/test_faults.py.

    torchrun --nproc_per_node 2 tests/fault_train_worker.py OUT_DIR NAN_RANK NAN_STEP SLOW_SAVE_S ARGS...

On rank NAN_RANK the SAE's loss becomes NaN at training forward number NAN_STEP (1-based; the other ranks'
losses stay finite); rank 0's checkpoint writes each take SLOW_SAVE_S seconds longer. The message the
run exits with is written to OUT_DIR/exit-rank{RANK}.txt, so a test can see that every rank stopped by
itself, with the same words."""

import os
import sys
import time
from pathlib import Path

import torch

# Run as a script, sys.path[0] is tests/, where tests/eval would shadow the real `eval` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import train
from sae import checkpoint
from sae.errors import UserError, run_cli
from sae.model import SparseAutoencoder


def main(out_dir: str, nan_rank: int, nan_step: int, slow_save_s: float, train_args: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    forward, save_checkpoint, forwards = SparseAutoencoder.forward, checkpoint.save_checkpoint, [0]

    def forward_with_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        forwards[0] += torch.is_grad_enabled()  # training forwards only (not the init's fit on the first batch)
        if rank == nan_rank and forwards[0] == nan_step:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    def slow_save_checkpoint(*args, **kwargs):
        time.sleep(slow_save_s)
        return save_checkpoint(*args, **kwargs)

    SparseAutoencoder.forward = forward_with_nan
    checkpoint.save_checkpoint = slow_save_checkpoint
    try:
        train.main(train_args)
    except UserError as error:  # what run_cli turns into one line and exit status 2
        (Path(out_dir) / f"exit-rank{rank}.txt").write_text(str(error))
        raise


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]))
