"""Our SAE in the benchmark: `sae.trainer.train` on the cache, its checkpoints exported as SAE folders, and
optionally its final SAE fine-tuned end to end (`sae.finetune`)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from sae import checkpoint
from sae.cache import ActivationCache
from sae.config import TrainConfig
from sae.distributed import resolve_precision
from sae.finetune import FinetuneOptions, finetune
from sae.members import build_members, evaluation_sae, load_member
from sae.parallel import ShardLayout
from sae.trainer import train


def train_ours(cfg: TrainConfig, checkpoint_steps: list[int], out_dir: Path, metadata: dict) -> dict[int, Path]:
    """Train `cfg` (its `data.activation_cache` set) with a checkpoint every checkpoint_steps[0] steps;
    write each as an SAE folder out_dir/step-N (folded to raw activations, like the final one; a
    transcoder's input and output with their own scales) with `metadata`; {step: folder}."""
    every = checkpoint_steps[0]
    if any(step % every for step in checkpoint_steps[:-1]):  # the trainer also saves at its last step
        raise ValueError(f"checkpoint steps {checkpoint_steps} must be multiples of the first, but for the last")
    cfg = replace(cfg, out_dir=str(out_dir), run_name="run", save_every=every, keep_checkpoints=len(checkpoint_steps) + 1)
    train(cfg)
    cache = ActivationCache(cfg.data.activation_cache)
    folders = {}
    cpu = torch.device("cpu")
    compute_dtype = resolve_precision(cfg.precision, cpu)
    for path in checkpoint.list_checkpoints(cfg.run_dir):
        tensors, state = checkpoint.load_checkpoint(path)
        if state["step"] not in checkpoint_steps:
            continue
        [member] = build_members(cfg, {site: cache.d_in_of[site] for site in cfg.hookpoints}, ShardLayout(), cpu,
                                 compute_dtype)
        load_member(member, tensors, state["members"][member.name])
        sae = evaluation_sae(member)  # what the trainer's final save writes
        folders[state["step"]] = sae.save(out_dir / f"step-{state['step']:08d}", input_scale=member.input_scale,
                                          output_scale=member.output_scale,
                                          metadata={**metadata, "system": "ours", "tokens_trained": state["tokens_seen"]})
    return folders


def finetune_final(run: dict, tokens: int, seed: int, data_dir: str) -> dict:
    """The final SAE of one of our benchmark runs (`run`: {"folders": {tokens: folder}, ...}) fine-tuned end
    to end for `tokens` LM tokens at `sae.finetune`'s defaults, into FOLDER/../finetune-TOKENS (reused when
    it was done before from the same folder with the same tokens and seed): {"folders": {training tokens +
    tokens: folder}, "wall_s", "cpu_s", "identity"}."""
    last = max(run["folders"], key=int)
    source = Path(run["folders"][last])
    run_dir = source.parent / f"finetune-{tokens}"
    identity = {"source": str(source), "tokens": tokens, "seed": seed}
    record = run_dir / "run.json"
    if record.exists() and (earlier := json.loads(record.read_text())).get("identity") == identity:
        return earlier
    if run_dir.exists():  # the benchmark's own folder of an older fine-tune
        shutil.rmtree(run_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    folder = finetune(source, run_dir, FinetuneOptions(tokens=tokens, seed=seed, data_dir=data_dir))
    result = {"folders": {str(int(last) + tokens): str(folder)}, "wall_s": time.perf_counter() - wall,
              "cpu_s": time.process_time() - cpu, "identity": identity}
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result
