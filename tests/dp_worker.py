"""Run by tests/test_distributed.py under torchrun: train an SAE for a few steps on fixed global
batches, each rank taking its slice, and save the parameters. Run alone, it trains on whole batches."""

import sys
from pathlib import Path

# Run as a script, sys.path[0] is tests/, where tests/eval would shadow the real `eval` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from safetensors.torch import save_file

from sae import SaeConfig, SparseAutoencoder
from sae.config import TrainConfig
from sae.distributed import init_distributed, shutdown
from sae.parallel import ShardLayout
from sae.trainer import initialize_from_first_batch, training_step


def main(out_path: str) -> None:
    info = init_distributed(timeout_s=60)
    torch.manual_seed(0)
    global_batch, steps = 64, 6
    batches = torch.randn(steps, global_batch, 24, generator=torch.Generator().manual_seed(1)) * 3 + 1
    share = global_batch // info.world_size
    local = batches[:, info.rank * share : (info.rank + 1) * share]

    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=96, k=4, k_aux=8, dead_tokens=64, multi_topk=True),
                            dtype=torch.float64, layout=ShardLayout(info.rank, info.world_size))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=6.25e-10)
    scale = initialize_from_first_batch(sae, local[0].double(), TrainConfig())
    tokens_since_fired = torch.zeros(96, dtype=torch.long)
    for step in range(steps):
        training_step(sae, optimizer, local[step].double() * scale, tokens_since_fired, 1e-2, 1.0)
    if info.is_main:
        save_file({**{k: v.contiguous() for k, v in sae.state_dict().items()}, "tokens_since_fired": tokens_since_fired,
                   "scale": torch.tensor(scale)}, out_path)
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1])
