"""Our SAE in the benchmark: `sae.trainer.train` on the cache, its checkpoints exported as SAE folders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sae import checkpoint
from sae.cache import ActivationCache
from sae.config import TrainConfig
from sae.distributed import resolve_precision
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
