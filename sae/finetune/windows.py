"""Batches of whole token windows for the fine-tune, mixed across documents, with exact resume.

The spliced LM needs whole windows, so the mixing is of windows, not of tokens as in training
(sae/activations.py `ActivationStream`): blocks of `block_windows` consecutive windows of the text are
permuted by a generator seeded by (seed, block number) and handed out `batch_windows` at a time. The
state is the text stream's position at the start of the current block and the batches handed out of it:
a resumed run re-reads that one block and skips ahead, which gives the same batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..data import TokenWindows


class WindowBatches:
    """Endless iterator of (batch_windows, ctx_len) int64 batches of windows from `windows`."""

    def __init__(self, windows: TokenWindows, batch_windows: int, block_windows: int, seed: int):
        self.windows = windows
        self.batch_windows = batch_windows
        self.batches_per_block = max(block_windows // batch_windows, 1)
        self.seed = seed
        self.block_index = -1  # the block being handed out; -1 before the first
        self.batches_done = 0
        self._block: Tensor | None = None
        self._windows_at_block_start: dict[str, Any] | None = None

    def __iter__(self) -> WindowBatches:
        return self

    def __next__(self) -> Tensor:
        if self._block is None or self.batches_done == self.batches_per_block:
            self._fill_block(self.block_index + 1)
        start = self.batches_done * self.batch_windows
        self.batches_done += 1
        return self._block[start : start + self.batch_windows]

    def _fill_block(self, block_index: int) -> None:
        self._windows_at_block_start = self.windows.state_dict()
        block = torch.stack([next(self.windows) for _ in range(self.batches_per_block * self.batch_windows)])
        generator = torch.Generator().manual_seed(hash((self.seed, block_index)) & (2**63 - 1))
        self._block = block[torch.randperm(len(block), generator=generator)]
        self.block_index = block_index
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the text stream's position at the start of the current block, and progress in it."""
        return {"block_index": self.block_index, "batches_done": self.batches_done,
                "windows": self._windows_at_block_start if self._block is not None else self.windows.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state["windows"])
        self._block = None
        self.block_index = -1
        self.batches_done = 0
        if state["block_index"] >= 0:
            self._fill_block(state["block_index"])
            self.batches_done = state["batches_done"]
