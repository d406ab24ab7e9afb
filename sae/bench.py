"""Benchmark: one SAE training step (forward + backward + Adam step) per implementation, as a multiple of
the bare encoder matmul x @ W_enc^T measured in the same process.

    python -m sae.bench                 # table; CPU: fp32, 2 threads, d_in 768, 12288 latents, k 32, batch 4096
    python -m sae.bench --json          # the same as JSON
    python -m sae.bench --quick         # tiny shapes (a smoke test, numbers mean nothing)

Implementations: `sae_kernels[torch]` and `sae_kernels[triton]` (the `sae_kernels` ops alone; triton
only on CUDA), `sae.model` (the SparseAutoencoder forward the trainer runs, on the same ops), `dense` (a
dense TopK SAE: (N, n_latents) codes and matmuls, autograd backward) and `sparsify` (EleutherAI's
SparseCoder, eager decoder, if installed). Each runs with and without AuxK (10% of latents dead,
k_aux = 512; sparsify picks its own k_aux = d_in / 2). AuxK in the `sae_kernels` and `sae.model` rows
is the trainer's: after the TopK selection, a second encode on the dead latents' rows alone (its
matmul costs n_dead / n_latents of the first), then their reconstruction loss.
All use the same parameters, batch and Adam (torch's fused Adam where the device supports it). On CUDA
a second size is added: 32768 latents, batch 32768, bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_kernels import ops


@dataclass(frozen=True)
class Size:
    d_in: int
    n_latents: int
    k: int
    batch: int
    dtype: str


CPU_SIZES = [Size(768, 12288, 32, 4096, "float32")]
CUDA_SIZES = [Size(768, 12288, 32, 4096, "float32"), Size(768, 32768, 32, 32768, "bfloat16")]
QUICK_SIZES = [Size(64, 600, 8, 256, "float32")]
K_AUX = 512
DEAD_FRAC = 0.1


class Params(nn.Module):
    """The four SAE parameters, named as in sae.model / sparsify."""

    def __init__(self, size: Size, device: torch.device, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, size.dtype)
        W_dec = torch.randn(size.n_latents, size.d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.encoder = nn.Linear(size.d_in, size.n_latents, device=device, dtype=dtype)
        with torch.no_grad():
            self.encoder.weight.copy_(W_dec)
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(W_dec.to(device, dtype))
        self.b_dec = nn.Parameter(torch.zeros(size.d_in, device=device, dtype=dtype))


def nmse(target: Tensor, prediction: Tensor) -> Tensor:
    return (target - prediction).pow(2).sum() / (target - target.mean(0)).pow(2).sum()


# ---- one forward per implementation: (params, x, dead_mask or None, k) -> loss -------------------


def kernels_forward(backend: str) -> Callable:
    """The step on the ops alone, in the trainer's order (SparseAutoencoder.forward without the module)."""
    def forward(p: Params, x: Tensor, dead: Tensor | None, k: int) -> Tensor:
        values, indices = ops.topk_encode(x, p.encoder.weight, p.encoder.bias, k, b_dec=p.b_dec, backend=backend)
        x_hat = ops.sparse_decode(values, indices, p.W_dec, backend=backend) + p.b_dec
        loss = nmse(x, x_hat)
        dead_latents = dead.nonzero().squeeze(1) if dead is not None else None
        if dead_latents is not None and len(dead_latents) > 0:
            aux_values, local = ops.topk_encode(
                x, p.encoder.weight.index_select(0, dead_latents), p.encoder.bias.index_select(0, dead_latents),
                min(K_AUX, len(dead_latents)), b_dec=p.b_dec, backend=backend,
            )
            loss = loss + ops.auxk_loss(aux_values, dead_latents[local], p.W_dec, x - x_hat, backend=backend) / 32
        return loss

    return forward


def dense_forward(p: Params, x: Tensor, dead: Tensor | None, k: int) -> Tensor:
    """A dense TopK SAE: codes and reconstructions through (N, n_latents) matrices, autograd backward."""
    pre = F.linear(x - p.b_dec, p.encoder.weight, p.encoder.bias)
    values, indices = pre.topk(k, dim=1, sorted=False)
    codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
    x_hat = codes @ p.W_dec + p.b_dec
    loss = nmse(x, x_hat)
    if dead is not None:
        values, indices = pre.masked_fill(~dead, -math.inf).topk(min(K_AUX, int(dead.sum())), dim=1, sorted=False)
        aux_codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
        loss = loss + nmse((x - x_hat).detach(), aux_codes @ p.W_dec) / 32
    return loss


def model_forward(p: Params, x: Tensor, dead: Tensor | None, k: int) -> Tensor:
    return p.model(x, dead).loss


def sparsify_forward(p: Params, x: Tensor, dead: Tensor | None, k: int) -> Tensor:
    out = p.model(x, dead_mask=dead)
    return out.fvu + out.auxk_loss / 32


def _attach_model(impl: str, p: Params, size: Size) -> None:
    """Give sae.model / sparsify a module of their own that shares the benchmark's parameter tensors."""
    if impl == "sae.model":
        from .config import SaeConfig
        from .model import SparseAutoencoder

        model = SparseAutoencoder(SaeConfig(d_in=size.d_in, n_latents=size.n_latents, k=size.k, k_aux=K_AUX),
                                  device=p.W_dec.device, dtype=p.W_dec.dtype)
    else:
        from sparsify import SparseCoder, SparseCoderConfig

        model = SparseCoder(size.d_in, SparseCoderConfig(num_latents=size.n_latents, k=size.k),
                            device=p.W_dec.device, dtype=p.W_dec.dtype)
    model.encoder.weight, model.encoder.bias, model.W_dec, model.b_dec = (
        p.encoder.weight, p.encoder.bias, p.W_dec, p.b_dec
    )
    object.__setattr__(p, "model", model)  # not a submodule: its parameters are p's own


def sparsify_available() -> bool:
    if "SPARSIFY_DISABLE_TRITON" not in os.environ and not torch.cuda.is_available():
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs CUDA
    try:
        with contextlib.redirect_stdout(sys.stderr):  # it prints which decoder it chose
            import sparsify  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure just drops the comparison
        return False
    return True


def implementations(device: torch.device) -> dict[str, Callable]:
    impls = {"sae_kernels[torch]": kernels_forward("torch")}
    if device.type == "cuda" and ops.triton_available():
        impls["sae_kernels[triton]"] = kernels_forward("triton")
    impls["sae.model"] = model_forward
    impls["dense"] = dense_forward
    if sparsify_available():
        impls["sparsify"] = sparsify_forward
    return impls


# ---- timing ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def timed(fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Wall times in ms of `repeats` rounds of the functions, interleaved (f0, f1, ..., f0, f1, ...) so
    that each sees the same machine conditions, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples.append(_time_once(fn, device))
    return times


def make_adam(params, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def run(sizes: list[Size], device: torch.device, repeats: int, only: set[str] | None = None) -> list[dict]:
    """Time every implementation at every size. Steps alternate with bare matmuls (and matmuls into a
    preallocated output), and the matmul samples of the whole size are pooled into the unit, so
    drift (clock, other processes) affects both sides of each ratio alike.

    Per record: step_ms (median) and step_min_ms; ratio = median step / median matmul; ratio_best =
    fastest step / fastest matmul; ratio_vs_mm_out = median step / median matmul into a preallocated
    output (the product alone, without allocating its ~0.2 GB result).
    """
    results = []
    for size in sizes:
        dtype = getattr(torch, size.dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(size.batch, size.d_in, generator=gen).to(device, dtype)
        dead = torch.zeros(size.n_latents, dtype=torch.bool)
        dead[torch.randperm(size.n_latents, generator=gen)[: round(DEAD_FRAC * size.n_latents)]] = True
        dead = dead.to(device)
        weight = torch.randn(size.n_latents, size.d_in, generator=gen).to(device, dtype)
        out = torch.empty(size.batch, size.n_latents, device=device, dtype=dtype)
        matmuls = [lambda: torch.mm(x, weight.t()), lambda: torch.mm(x, weight.t(), out=out)]
        matmul_ms: list[float] = []
        matmul_out_ms: list[float] = []
        records = []

        def measure(name: str, aux: bool, step: Callable[[], object]) -> None:
            step_times, mm_times, mm_out_times = timed([step, *matmuls], device, repeats)
            matmul_ms.extend(mm_times)
            matmul_out_ms.extend(mm_out_times)
            records.append({"impl": name, "auxk": aux, "times": step_times})

        p = Params(size, device)
        adam = make_adam(p.parameters(), device)
        for param in p.parameters():
            param.grad = torch.zeros_like(param)
        measure("adam step alone", False, adam.step)
        del p, adam

        for name, forward in implementations(device).items():
            if only and name not in only:
                continue
            for aux in (False, True):
                p = Params(size, device)
                if name in ("sae.model", "sparsify"):
                    _attach_model(name, p, size)
                adam = make_adam(p.parameters(), device)

                def step():
                    adam.zero_grad(set_to_none=True)
                    forward(p, x, dead if aux else None, size.k).backward()
                    adam.step()

                measure(name, aux, step)
                del p, adam, step
        del out
        unit, unit_min, unit_out = statistics.median(matmul_ms), min(matmul_ms), statistics.median(matmul_out_ms)
        for record in records:
            times = record.pop("times")
            step_ms, step_min = statistics.median(times), min(times)
            results.append({
                **asdict(size), **record, "step_ms": step_ms, "step_min_ms": step_min,
                "matmul_ms": unit, "matmul_min_ms": unit_min, "matmul_out_ms": unit_out,
                "ratio": step_ms / unit, "ratio_best": step_min / unit_min, "ratio_vs_mm_out": step_ms / unit_out,
                "step_samples_ms": [round(t, 2) for t in times],
            })
    return results


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check that it runs")
    parser.add_argument("--only", nargs="*", help="implementations to run (default all)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = QUICK_SIZES if args.quick else (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    info = machine()
    results = run(sizes, device, args.repeats, set(args.only) if args.only else None)
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps({"machine": info, "device": str(device), "results": results}, indent=2))
        return 0
    print(f"{info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, {info['threads']} threads, device {device}")
    if "load_average_1m_at_start" in info:
        print(f"load average (1 min): {info['load_average_1m_at_start']} at start, {info['load_average_1m_at_end']} at end")
    print("step = forward + backward + Adam step. x matmul: median step / median bare encoder matmul")
    print("torch.mm(x, W_enc.t()) in the same process; best: fastest / fastest; vs mm(out=): median step /")
    print("median matmul into a preallocated output.")
    header = f"{'size':<32} {'implementation':<17} {'AuxK':<4} {'step ms':>8} {'x matmul':>9} {'best':>6} {'vs mm(out=)':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        size = f"d{r['d_in']} n{r['n_latents']} k{r['k']} N{r['batch']} {r['dtype']}"
        aux = "yes" if r["auxk"] else "no"
        print(f"{size:<32} {r['impl']:<17} {aux:<4} {r['step_ms']:>8.1f} {r['ratio']:>9.2f} {r['ratio_best']:>6.2f} "
              f"{r['ratio_vs_mm_out']:>12.2f}")
    for size in sizes:
        r = next(r for r in results if r["n_latents"] == size.n_latents and r["batch"] == size.batch)
        print(f"bare encoder matmul at n{size.n_latents} N{size.batch}: median {r['matmul_ms']:.1f} ms, "
              f"fastest {r['matmul_min_ms']:.1f} ms, into a preallocated output {r['matmul_out_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
