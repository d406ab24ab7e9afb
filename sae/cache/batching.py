"""Which windows go through the LM together: the groups a streamed training run uses, and how many windows it reads."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig

# ---------------------------------------------------------------- which windows go through the LM together


@dataclass(frozen=True)
class LmBatches:
    """The LM batches of a streamed run: ActivationStream takes blocks of `windows_per_block` windows and
    LMWindowSource runs each in batches of `lm_batch_windows` from its start (the last may be smaller).

    The cache runs the LM on exactly these groups because a batch's composition may change the last bits
    of its activations (kernels pick algorithms by shape), and the cache must equal the stream bitwise.
    """

    windows_per_block: int
    lm_batch_windows: int

    def start(self, window: int) -> int:
        """First window of the LM batch that holds window number `window`."""
        block_start = window - window % self.windows_per_block
        return block_start + (window - block_start) // self.lm_batch_windows * self.lm_batch_windows

    def end(self, window: int) -> int:
        """One past the last window of the LM batch that holds window number `window`."""
        block_end = window - window % self.windows_per_block + self.windows_per_block
        return min(self.start(window) + self.lm_batch_windows, block_end)


def windows_per_block(cfg: TrainConfig) -> int:
    """Windows per shuffle block of a one-process training run of `cfg` (`ActivationStream`'s formula)."""
    tokens_per_window = cfg.data.ctx_len - 1
    return -(-max(cfg.data.shuffle_buffer_tokens, cfg.batch_size) // tokens_per_window)


def lm_batches_for(cfg: TrainConfig) -> LmBatches:
    """The LM batches a one-process training run of `cfg` uses."""
    return LmBatches(windows_per_block(cfg), cfg.data.lm_batch_windows)


def windows_for_training(cfg: TrainConfig) -> int:
    """Windows a one-process training run of `cfg` reads: whole shuffle blocks until max_tokens is reached."""
    per_block = windows_per_block(cfg)
    batches_per_block = per_block * (cfg.data.ctx_len - 1) // cfg.batch_size
    total_steps = cfg.total_steps
    return -(-total_steps // batches_per_block) * per_block
