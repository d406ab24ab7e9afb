"""Residual-stream activations from a causal LM, streamed and shuffled into training batches.

token windows -> LM forward with hooks at the hookpoints (the forward stops as soon as the last
hooked module has run) -> drop the first position of each window -> shuffle buffer ->
{hookpoint: (batch_size, d_in)}. The window activations come from a "source": the LM
(LMWindowSource) or an activation cache on disk (sae.cache.CachedWindows), in the same order.

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

from .config import TrainConfig
from .data import TokenWindows
from .errors import UsageError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                             init: str = "pretrained", init_seed: int = 0):
    """A causal LM and its tokenizer via transformers' `from_pretrained` (hub name or local folder).

    init "random": the same architecture and tokenizer with freshly initialised weights (transformers'
    own init, drawn in float32 on the CPU from `init_seed`, so the same seed rebuilds the same LM), the
    random-model baseline of Heap et al. 2025 ("Sparse autoencoders can interpret randomly initialized
    transformers")."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype])
    elif init == "random":
        config = AutoConfig.from_pretrained(name_or_path)
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream as it was
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(_DTYPES[dtype])
    else:
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    return model.to(device).eval().requires_grad_(False), tokenizer


def load_run_lm(cfg: TrainConfig, device: str | torch.device = "cpu"):
    """The LM and tokenizer a training run (or its activation cache) reads: cfg.model in cfg.model_dtype,
    pretrained or re-initialised as cfg.model_init says."""
    return load_model_and_tokenizer(cfg.model, cfg.model_dtype, device, cfg.model_init, cfg.model_init_seed)


def check_context_length(model: nn.Module, ctx_len: int, option: str = "data.ctx_len") -> None:
    """A clear error, naming both numbers, when windows of `ctx_len` tokens are longer than the model's
    positions (the LM forward would fail deep inside with an IndexError)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and ctx_len > positions:
        name = getattr(config, "_name_or_path", "") or "the model"
        raise UsageError(f"{option} is {ctx_len}, but {name} has only {positions} positions; use {option} <= {positions}")


def get_module(model: nn.Module, hookpoint: str) -> nn.Module:
    """The submodule named `hookpoint`; a clear error listing the real names when it does not exist."""
    modules = dict(model.named_modules())
    if hookpoint not in modules:
        raise UsageError(f"hookpoint '{hookpoint}' is not a module of {type(model).__name__}; "
                         f"modules are: {module_name_summary([name for name in modules if name])}")
    return modules[hookpoint]


def module_name_summary(names: list[str]) -> str:
    """Module names with each stack of numbered layers shown once, as its pattern and range, followed
    by the first layer's children: 'transformer.wte, transformer.h.{0..11} (each with
    transformer.h.0.ln_1, transformer.h.0.attn, ...), lm_head' instead of hundreds of names."""
    shown: dict[str, str] = {}  # the entry of each name or layer stack, in model order
    layer_numbers: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if numbered is None:
            shown[name] = name
            continue
        stack = ".".join(parts[:numbered])
        layer_numbers.setdefault(stack, []).append(int(parts[numbered]))
        shown.setdefault(stack + ".#", "")
    for stack, numbers in layer_numbers.items():
        first = f"{stack}.{min(numbers)}"
        children = [name for name in names if name.startswith(first + ".") and name.count(".") == first.count(".") + 1]
        shown[stack + ".#"] = f"{stack}.{{{min(numbers)}..{max(numbers)}}}" + (f" (each with {', '.join(children)})" if children else "")
    return ", ".join(shown.values())


class _StopForward(Exception):
    """Raised by the capture hooks once every hooked module has run: the rest of the LM is not needed."""


@torch.no_grad()
def capture_many(model: nn.Module, modules: list[nn.Module], input_ids: Tensor) -> list[Tensor]:
    """Outputs of several submodules of `model` for `input_ids` (B, T), each (B, T, d), in one forward
    that stops as soon as the last of them has run."""
    captured: dict[int, Tensor] = {}

    def make_hook(position: int):
        def hook(_module, _inputs, output):
            captured[position] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(modules):
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(make_hook(position)) for position, module in enumerate(modules)]
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [type(modules[position]).__name__ for position in range(len(modules)) if position not in captured]
    if missing:
        raise RuntimeError(f"the hooked module(s) {missing} did not run in the forward pass")
    return [captured[position] for position in range(len(modules))]


def capture_activations(model: nn.Module, module: nn.Module, input_ids: Tensor) -> Tensor:
    """Output of `module` (a submodule of `model`) for `input_ids` (B, T): (B, T, d)."""
    return capture_many(model, [module], input_ids)[0]


class LMWindowSource:
    """Activations of consecutive token windows, computed by the LM: the source of a streamed run.

    `next_activations(n)` reads the next n windows, runs the LM on them in batches of
    `lm_batch_windows`, drops each window's first position and returns, per hookpoint, the rows in
    window order: (n * (ctx_len - 1), d) float32.
    """

    def __init__(self, model: nn.Module, hookpoints: list[str], windows: TokenWindows, lm_batch_windows: int = 64):
        self.model = model
        self.hookpoints = list(hookpoints)
        self.modules = [get_module(model, hookpoint) for hookpoint in self.hookpoints]
        self.windows = windows
        self.lm_batch_windows = lm_batch_windows
        self.ctx_len = windows.ctx_len
        self.device = next(model.parameters()).device

    def next_activations(self, n_windows: int) -> list[Tensor]:
        input_ids = torch.stack([next(self.windows) for _ in range(n_windows)]).to(self.device)
        per_batch = [
            capture_many(self.model, self.modules, input_ids[i : i + self.lm_batch_windows])
            for i in range(0, len(input_ids), self.lm_batch_windows)
        ]
        return [torch.cat([outputs[h][:, 1:] for outputs in per_batch]).flatten(0, 1).float() for h in range(len(self.modules))]

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def text_read(self) -> dict[str, Any]:
        """The end of the text read so far (TokenWindows.read_position), for cfg.json's `text_read`."""
        return self.windows.read_position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


class ActivationStream:
    """Endless iterator of shuffled activation batches with exact resume.

    Yields, per step, a dict {hookpoint: (batch_size, d) float32}: the same tokens (rows) for every
    hookpoint, so several SAEs trained from one stream see the same batches. `source` hands out the
    activations of consecutive windows: an LMWindowSource (streaming) or sae.cache.CachedWindows.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        shuffle_buffer_tokens: int,
        seed: int = 0,
        rank: int = 0,
    ):
        tokens_per_window = source.ctx_len - 1  # the first position of each window is dropped
        self.windows_per_block = -(-max(shuffle_buffer_tokens, batch_size) // tokens_per_window)
        self.batches_per_block = self.windows_per_block * tokens_per_window // batch_size
        self.source = source
        self.hookpoints = list(source.hookpoints)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.block_index = -1  # the block being handed out; -1 before the first
        self.batches_done = 0  # batches of the current block handed out
        self._block: list[Tensor] | None = None
        self._source_state_at_block_start: dict[str, Any] | None = None

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._block is None or self.batches_done == self.batches_per_block:
            self._fill_block(self.block_index + 1)
        start = self.batches_done * self.batch_size
        self.batches_done += 1
        return {hookpoint: block[start : start + self.batch_size] for hookpoint, block in zip(self.hookpoints, self._block)}

    def _fill_block(self, block_index: int) -> None:
        """Take the next windows_per_block windows' activations and shuffle them (one permutation for all hookpoints)."""
        self._source_state_at_block_start = self.source.state_dict()
        activations = self.source.next_activations(self.windows_per_block)
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, block_index)) & (2**63 - 1))
        order = torch.randperm(len(activations[0]), generator=generator)[: self.batches_per_block * self.batch_size]
        self._block = [rows[order.to(rows.device)] for rows in activations]
        self.block_index = block_index
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the source's position at the start of the current block, and progress in it."""
        return {
            "block_index": self.block_index,
            "batches_done": self.batches_done,
            "windows": self._source_state_at_block_start if self._block is not None else self.source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["windows"])
        self._block = None
        self.block_index = -1
        self.batches_done = 0
        if state["block_index"] >= 0:
            self._fill_block(state["block_index"])  # the same windows, the same permutation
            self.batches_done = state["batches_done"]


class PlaceholderWindowSource:
    """Window source of the ranks of a latent-shard group other than its first.

    All ranks of a group train on the first rank's batches (`ShardLayout.broadcast_rows`), so the
    others need batches of the right shape only: zeros, with no LM forward and no data read. Its
    stream state is empty; on resume the first rank's state alone restores the group's data.
    """

    def __init__(self, hookpoints: list[str], ctx_len: int, d_in_of: dict[str, int], device: torch.device | str):
        self.hookpoints = list(hookpoints)
        self.ctx_len = ctx_len
        self.d_in_of = d_in_of
        self.device = device

    def next_activations(self, n_windows: int) -> list[Tensor]:
        rows = n_windows * (self.ctx_len - 1)
        return [torch.zeros(rows, self.d_in_of[hookpoint], device=self.device) for hookpoint in self.hookpoints]

    def state_dict(self) -> dict:
        return {}

    def text_read(self) -> None:
        """Nothing: the group's first rank reads the text."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass
