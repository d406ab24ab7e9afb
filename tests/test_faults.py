"""Crashes and stops: SIGKILL mid-run then --resume equals a run that never stopped; SIGINT / SIGTERM
checkpoint at the step boundary on every rank and say how to resume; a dead rank ends the job."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from launch import ENV, REPO, torchrun_command
from sae import checkpoint



def train_args(tiny_lm_dir, text_file, out_dir, run_name, steps):
    return [
        "train.py", f"--model={tiny_lm_dir}", "--hookpoint=transformer.h.1", f"--data.dataset={text_file}",
        "--data.ctx_len=16", "--data.shuffle_buffer_tokens=512", "--sae.n_latents=256", "--sae.k=4",
        "--sae.dead_tokens=500", "--batch_size=64", f"--max_tokens={64 * steps}", "--log_every=5",
        "--save_every=5", "--keep_checkpoints=3", f"--out_dir={out_dir}", f"--run_name={run_name}",
    ]


def wait_for(condition, timeout, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_lm_dir, text_file, tmp_path):
    steps = 300
    subprocess.run([sys.executable, *train_args(tiny_lm_dir, text_file, tmp_path, "whole", steps)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *train_args(tiny_lm_dir, text_file, tmp_path, "killed", steps)],
                               cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: len(checkpoint.list_checkpoints(run_dir)) >= 2, 120, process), "no checkpoint before the run ended"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    killed_at = checkpoint.list_checkpoints(run_dir)[-1].name
    assert killed_at != f"step-{steps:08d}"

    subprocess.run([sys.executable, *train_args(tiny_lm_dir, text_file, tmp_path, "killed", steps), "--resume"],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    whole = load_file(tmp_path / "whole" / "transformer.h.1" / "sae.safetensors")
    resumed = load_file(run_dir / "transformer.h.1" / "sae.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming from {killed_at}"


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    return [int(line.split('"step": ')[1].split(",")[0]) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigint_checkpoints_at_the_step_boundary_and_resume_equals_an_uninterrupted_run(tiny_lm_dir, text_file, tmp_path):
    """Ctrl-C used to print a 37-line KeyboardInterrupt traceback and lose the work since the last
    checkpoint. With --save_every=0 the only checkpoint before the end is the one the stop writes."""
    steps = 300
    args = lambda name: [*train_args(tiny_lm_dir, text_file, tmp_path, name, steps), "--save_every=0"]  # noqa: E731
    subprocess.run([sys.executable, *args("whole")], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)

    run_dir = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, *args("stopped")], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: max(logged_steps(run_dir), default=0) >= 10, 120, process), "no step logged"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    [stopped_at] = checkpoint.list_checkpoints(run_dir)
    step = int(stopped_at.name.removeprefix("step-"))
    assert 10 <= step < steps and f"stopped by SIGINT at step {step}; the run continues from {stopped_at}" in stderr
    assert stderr.rstrip().endswith("--run_name=stopped --save_every=0 --resume"), stderr[-500:]

    subprocess.run([sys.executable, *args("stopped"), "--resume"], cwd=REPO, env=ENV, check=True, capture_output=True,
                   timeout=300)
    whole = load_file(tmp_path / "whole" / "transformer.h.1" / "sae.safetensors")
    resumed = load_file(run_dir / "transformer.h.1" / "sae.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming from {stopped_at}"
    assert logged_steps(run_dir) == logged_steps(tmp_path / "whole")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tiny_lm_dir, text_file, tmp_path):
    """What a cluster sends before preemption, here to rank 1 alone: both ranks stop after the same
    step, rank 0 writes the checkpoint of both ranks' streams and prints how to resume."""
    run_dir = tmp_path / "dp"
    command = [*torchrun_command(2), *train_args(tiny_lm_dir, text_file, tmp_path, "dp", 100_000), "--save_every=0"]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: max(logged_steps(run_dir), default=0) >= 10, 180, process), "no step logged"
        workers = _worker_pids(process.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    [stopped_at] = checkpoint.list_checkpoints(run_dir)
    _, state = checkpoint.load_checkpoint(stopped_at)
    assert len(state["streams"]) == 2 and state["step"] == int(stopped_at.name.removeprefix("step-")) >= 10
    assert f"stopped by SIGTERM at step {state['step']}" in stderr, stderr[-3000:]
    assert "torchrun [the same launcher options] train.py " in stderr and "--save_every=0 --resume" in stderr
    assert process.returncode != 0


def _worker_pids(torchrun_pid):
    """PIDs of torchrun's worker processes, by the RANK in their environment."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if parent == torchrun_pid:
            for variable in environ:
                if variable.startswith(b"RANK="):
                    workers[int(variable[5:])] = int(entry.name)
    return workers


def test_a_dead_rank_ends_the_job_and_the_last_checkpoint_still_loads(tiny_lm_dir, text_file, tmp_path):
    run_dir = tmp_path / "dp"
    command = [*torchrun_command(2), *train_args(tiny_lm_dir, text_file, tmp_path, "dp", 100_000)]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(checkpoint.list_checkpoints(run_dir)) >= 1, 180, process), "no checkpoint written"
        workers = _worker_pids(process.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.monotonic()
        returncode = process.wait(timeout=60)
        assert returncode != 0 and time.monotonic() - started < 60
    finally:
        if process.poll() is None:
            process.kill()
    tensors, state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run_dir)[-1])
    assert state["step"] % 5 == 0 and len(state["streams"]) == 2 and "W_dec" in tensors


def test_two_rank_sigkill_then_resume_equals_an_uninterrupted_run(tiny_lm_dir, text_file, tmp_path):
    steps = 120
    launch = torchrun_command(2)
    subprocess.run([*launch, *train_args(tiny_lm_dir, text_file, tmp_path, "whole", steps)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([*launch, *train_args(tiny_lm_dir, text_file, tmp_path, "killed", steps)], cwd=REPO,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: len(checkpoint.list_checkpoints(run_dir)) >= 2, 180, process), "no checkpoint before the end"
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks at once
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert checkpoint.list_checkpoints(run_dir)[-1].name != f"step-{steps:08d}"

    subprocess.run([*launch, *train_args(tiny_lm_dir, text_file, tmp_path, "killed", steps), "--resume"],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)
    whole = load_file(tmp_path / "whole" / "transformer.h.1" / "sae.safetensors")
    resumed = load_file(run_dir / "transformer.h.1" / "sae.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_slow_save_is_waited_for_and_a_nan_on_one_rank_stops_every_rank(tiny_lm_dir, text_file, tmp_path):
    """Rank 0's checkpoint write at step 5 takes 25 s, longer than the 15 s collective timeout: the run
    goes on. At the 8th step rank 1's loss alone is NaN: both ranks stop by themselves, with one message."""
    args = train_args(tiny_lm_dir, text_file, tmp_path, "nan", 20)[1:]  # without "train.py"
    command = [*torchrun_command(2), "tests/fault_train_worker.py", str(tmp_path), "1", "8", "25", *args,
               "--collective_timeout_s=15"]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    exits = [tmp_path / f"exit-rank{rank}.txt" for rank in (0, 1)]
    assert all(path.exists() for path in exits), result.stderr[-3000:]  # rank 0 was not killed waiting
    message = exits[0].read_text()
    assert exits[1].read_text() == message
    assert "loss is nan on rank 1 of 2 at step 7" in message and message.endswith("step-00000005")
