"""Launching the repo's scripts from tests: one process, or several through torchrun (gloo on CPU)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One thread per process: 2 ranks on 2 cores, and no oversubscription when the machine is loaded.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_command(nproc: int) -> list[str]:
    """The start of a command line that runs a script on `nproc` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_script(args: list[str], nproc: int = 1, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` (nproc 1) or torchrun of ARGS from the repo root; fails the test, showing the
    output's tail, if it exits non-zero."""
    launch = torchrun_command(nproc) if nproc > 1 else [sys.executable]
    result = subprocess.run([*launch, *args], cwd=REPO, env={**ENV, **(env_extra or {})}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result
