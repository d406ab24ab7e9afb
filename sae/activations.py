"""Residual-stream activations from a causal LM, streamed and shuffled into training batches.

token windows -> LM forward with a hook at the hookpoint (the forward stops as soon as the hooked
module has run) -> drop the first position of each window -> shuffle buffer -> (batch_size, d_in).

The shuffle buffer works in blocks: it fills with `shuffle_buffer_tokens` activations from many
windows, permutes them with a generator seeded by (seed, rank, block number) and hands them out in
batches. Memory is one block whatever the dataset size, and the stream's state is just the token
stream's position at the start of the current block plus the number of batches already handed out:
resuming re-runs the LM on that one block and skips ahead, which reproduces the batches exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .data import TokenWindows

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    """A causal LM and its tokenizer via transformers' `from_pretrained` (hub name or local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    return model.to(device).eval().requires_grad_(False), tokenizer


def get_module(model: nn.Module, hookpoint: str) -> nn.Module:
    """The submodule named `hookpoint`; a clear error listing the real names when it does not exist."""
    modules = dict(model.named_modules())
    if hookpoint not in modules:
        names = [name for name in modules if name]
        shown = ", ".join(names[:60]) + (f", ... ({len(names) - 60} more)" if len(names) > 60 else "")
        raise ValueError(f"hookpoint '{hookpoint}' is not a module of {type(model).__name__}; modules are: {shown}")
    return modules[hookpoint]


class _StopForward(Exception):
    """Raised by the capture hook once the hooked module has run: the rest of the LM is not needed."""


@torch.no_grad()
def capture_activations(model: nn.Module, module: nn.Module, input_ids: Tensor) -> Tensor:
    """Output of `module` (a submodule of `model`) for `input_ids` (B, T): (B, T, d)."""
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the hooked module {type(module).__name__} did not run in the forward pass")
    return captured[0]


class ActivationStream:
    """Endless iterator of shuffled activation batches, (batch_size, d_in) float32, with exact resume."""

    def __init__(
        self,
        model: nn.Module,
        hookpoint: str,
        windows: TokenWindows,
        batch_size: int,
        shuffle_buffer_tokens: int,
        lm_batch_windows: int = 64,
        seed: int = 0,
        rank: int = 0,
    ):
        tokens_per_window = windows.ctx_len - 1  # the first position of each window is dropped
        self.windows_per_block = -(-max(shuffle_buffer_tokens, batch_size) // tokens_per_window)
        self.batches_per_block = self.windows_per_block * tokens_per_window // batch_size
        self.model = model
        self.module = get_module(model, hookpoint)
        self.windows = windows
        self.batch_size = batch_size
        self.lm_batch_windows = lm_batch_windows
        self.seed = seed
        self.rank = rank
        self.device = next(model.parameters()).device
        self.block_index = -1  # the block being handed out; -1 before the first
        self.batches_done = 0  # batches of the current block handed out
        self._block: Tensor | None = None
        self._windows_state_at_block_start: dict[str, Any] | None = None

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> Tensor:
        if self._block is None or self.batches_done == self.batches_per_block:
            self._fill_block(self.block_index + 1)
        start = self.batches_done * self.batch_size
        self.batches_done += 1
        return self._block[start : start + self.batch_size]

    def _fill_block(self, block_index: int) -> None:
        """Run the LM on the next windows_per_block windows and shuffle their activations."""
        self._windows_state_at_block_start = self.windows.state_dict()
        window_batches = []
        for _ in range(self.windows_per_block):
            window_batches.append(next(self.windows))
        input_ids = torch.stack(window_batches).to(self.device)
        chunks = [
            capture_activations(self.model, self.module, input_ids[i : i + self.lm_batch_windows])[:, 1:]
            for i in range(0, len(input_ids), self.lm_batch_windows)
        ]
        activations = torch.cat(chunks).flatten(0, 1).float()
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, block_index)) & (2**63 - 1))
        order = torch.randperm(len(activations), generator=generator)[: self.batches_per_block * self.batch_size]
        self._block = activations[order.to(activations.device)]
        self.block_index = block_index
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the token stream's position at the start of the current block, and progress in it."""
        return {
            "block_index": self.block_index,
            "batches_done": self.batches_done,
            "windows": self._windows_state_at_block_start if self._block is not None else self.windows.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state["windows"])
        self._block = None
        self.block_index = -1
        self.batches_done = 0
        if state["block_index"] >= 0:
            self._fill_block(state["block_index"])  # the same windows, the same permutation
            self.batches_done = state["batches_done"]
