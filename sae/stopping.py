"""Stopping a run cleanly on SIGINT or SIGTERM: Ctrl-C, or what SLURM and Kubernetes send before they
preempt a job. The signal only sets a flag; the trainer looks at it at each step boundary, where every
rank agrees on it (a max over ranks), writes a checkpoint and raises `RunStopped`. `--resume` then
continues exactly as if the run had not stopped. A second signal stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch

from .distributed import DistInfo, all_reduce_max

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped on a signal after writing the checkpoint `checkpoint` at `step`; `info` is the
    rank that raised it (every rank does)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path, info: DistInfo):
        self.signal_number, self.step, self.checkpoint, self.info = signal_number, step, checkpoint, info
        super().__init__(f"stopped by {signal.Signals(signal_number).name} at step {step}; "
                         f"the run continues from {checkpoint} with --resume")

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (130, 143)."""
        return 128 + self.signal_number


class StopOnSignal:
    """While in its `with` block, SIGINT and SIGTERM ask the run to stop at the next step boundary
    (`requested`). Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self):
        self.signal_number = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signal_number: int, frame) -> None:
        if self.signal_number:  # asked twice: do not wait for the step to end
            raise KeyboardInterrupt
        self.signal_number = signal_number
        print(f"\n{signal.Signals(signal_number).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, info: DistInfo, device: torch.device) -> int:
        """The signal any rank received (0: none). Collective under torchrun: every rank calls it at the
        same step, so all stop at the same one even when the signal reached only some of them."""
        if not info.enabled:
            return self.signal_number
        flag = torch.tensor([self.signal_number], device=device)
        return int(all_reduce_max(flag, info).item())
