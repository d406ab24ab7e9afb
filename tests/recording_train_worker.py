"""`python train.py ARGS` that also records every token window its stream hands out.

    python tests/recording_train_worker.py RECORD_DIR ARGS...            (one process)
    torchrun --nproc_per_node 2 tests/recording_train_worker.py RECORD_DIR ARGS...

Each rank writes RECORD_DIR/windows-rank{RANK}.pt, (n_windows, ctx_len) int64: the text it trained on
(and, through the shuffle buffer, the windows of blocks it filled), for tests that count held-out windows
overlapping training's."""

import os
import sys
from pathlib import Path

# Run as a script, sys.path[0] is tests/, where tests/eval would shadow the real `eval` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

import train
from sae.data import TokenWindows


def main(record_dir: str, train_args: list[str]) -> None:
    recorded = []
    next_window = TokenWindows.__next__

    def recording_next(self):
        window = next_window(self)
        recorded.append(window)
        return window

    TokenWindows.__next__ = recording_next
    train.main(train_args)
    rank = os.environ.get("RANK", "0")
    torch.save(torch.stack(recorded), Path(record_dir) / f"windows-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
