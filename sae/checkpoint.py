"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNNNN/` holding
    state.safetensors   SAE parameters (unfolded, in training scale), optimizer tensors, the
                        dead-latent counters and the RNG state
    state.json          step, tokens seen, input scale, optimizer hyperparameters, the data stream's
                        position, the wandb run id, the run's config
It is written into a hidden temporary folder, fsynced, then renamed into place: a crash mid-write
leaves no folder named step-*, so an incomplete checkpoint is never found, let alone loaded.
Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from .errors import MissingFileError, UsageError
from .files import TensorSpec, write_safetensors

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """The folder of checkpoint `step` (whether or not it was written yet)."""
    return checkpoint_dir(run_dir) / f"{_PREFIX}{step:08d}"


def save_checkpoint(run_dir: Path, step: int, specs: list[TensorSpec], chunks: Iterable[Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, then prune all but the newest `keep`. Its tensors come as
    pieces (`files.write_safetensors`), so a large run's state is never whole in memory; `whole`
    makes them from a dict."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_safetensors(tmp / STATE_TENSORS, specs, chunks)
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for name in (STATE_TENSORS, STATE_JSON):
            with open(tmp / name, "rb") as file:
                os.fsync(file.fileno())
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a write cut short by a full disk must not keep filling it
        raise
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that a crash cut short (`.tmp-step-*`; never
    loaded, but as large as a checkpoint); call it before this run writes any. Returns those removed."""
    root = checkpoint_dir(run_dir)
    unfinished = sorted(root.glob(f".tmp-{_PREFIX}*")) if root.is_dir() else []
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    return unfinished


def whole(tensors: dict[str, Tensor]) -> tuple[list[TensorSpec], list[Tensor]]:
    """`save_checkpoint`'s (specs, chunks) for tensors that are whole in memory: one piece each."""
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], list(tensors.values())


def step_of(path: Path) -> int:
    """The step of checkpoint folder `path` (`step_dir`'s inverse)."""
    return int(Path(path).name.removeprefix(_PREFIX))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


class CheckpointTensors(Mapping):
    """A checkpoint's tensors, read from the file when asked (safetensors' `safe_open`): a tensor by
    name, or only some rows of it (`rows`), so that resuming a latent-sharded run reads each rank's
    rows and never the whole state into every rank's memory."""

    def __init__(self, path: Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as file:  # reads and checks the header only
            self.shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        with safe_open(self.path, framework="pt") as file:
            return file.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of tensor `name`, reading those rows only."""
        with safe_open(self.path, framework="pt") as file:
            return file.get_slice(name)[start:stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def load_checkpoint(path: Path) -> tuple[CheckpointTensors, dict[str, Any]]:
    """(tensors, read when asked; state) of a checkpoint folder; a clear error when a file is missing
    or corrupt."""
    path = Path(path)
    for name in (STATE_TENSORS, STATE_JSON):
        if not (path / name).is_file():
            raise MissingFileError(f"checkpoint file missing: {path / name}")
    try:
        state = json.loads((path / STATE_JSON).read_text())
        tensors = CheckpointTensors(path / STATE_TENSORS)
    except Exception as error:
        raise UsageError(f"checkpoint {path} is unreadable: {error}") from None
    return tensors, state


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into named tensors and a JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"optimizer.{param_id}.{key}"
            if isinstance(value, Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    items = [(n, t) for n, t in tensors.items() if n.startswith("optimizer.")] + list(meta["scalars"].items())
    for name, value in items:
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng_state
    return tensors


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
