"""One command for a CUDA machine: the SAE step against float64, the bench rows, and a short GPT-2-shaped
training run with its peak memory, written as OUT/gpu_check.json and OUT/gpu_check.md.

    python -m sae.gpu_check --out gpu-check         # on a GPU
    python -m sae.gpu_check --dry --out /tmp/check  # anywhere: the same steps at tiny sizes on the CPU

1. step: the SAE's training forward and backward on the device (Triton kernels on CUDA), in fp32 and
   in bf16 mixed precision, against the same SAE in float64 on the CPU. Inputs are planted (each row is
   k decoder rows with coefficients in [2, 4] plus noise) so both select the same latents, and every
   latent the AuxK loss may use is used (k_aux = the dead count): losses and gradients then compare.
2. bench: `sae.bench.run` at its CUDA sizes (fp32 and bf16; with and without AuxK; sparsify on the same
   device when it is installed).
3. train: a randomly initialised 12-layer GPT-2 (transformers' config, no download; the embedded
   tokenizer), d_in 768, 32768 latents, k 32, on the embedded corpus: final fvu, tokens/s, peak memory
   against the run's own estimate.
The dry run (CI: tests/test_gpu_check.py) keeps every step at tiny sizes so the command cannot rot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import bench
from .config import DataConfig, SaeConfig, TrainConfig
from .embedded import EMBEDDED_MODEL_DIR
from .model import SparseAutoencoder
from .trainer import train

STEP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
"""Largest relative error (norm of the difference / norm of the float64 value) of a loss or gradient."""


def planted_sae_inputs(d_in: int, n_latents: int, k: int, rows: int, n_dead: int, seed: int = 0):
    """Unit decoder rows, inputs that are k live rows with coefficients in [2, 4] plus noise, a dead mask."""
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n_latents, d_in, generator=generator, dtype=torch.float64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    live = n_latents - n_dead
    chosen = torch.stack([torch.randperm(live, generator=generator)[:k] for _ in range(rows)])
    coefficients = 2 + 2 * torch.rand(rows, k, generator=generator, dtype=torch.float64)
    x = (coefficients[:, :, None] * W_dec[chosen]).sum(1) + 0.05 * torch.randn(rows, d_in, generator=generator,
                                                                               dtype=torch.float64)
    dead = torch.zeros(n_latents, dtype=torch.bool)
    dead[live:] = True
    return W_dec, x, dead


def step_check(device: torch.device, d_in: int, n_latents: int, k: int, rows: int) -> list[dict]:
    """Relative errors of the device's fp32 and bf16 step against float64 on the CPU."""
    n_dead = max(1, n_latents // 10)
    cfg = SaeConfig(d_in=d_in, n_latents=n_latents, k=k, k_aux=n_dead)
    W_dec, x, dead = planted_sae_inputs(d_in, n_latents, k, rows, n_dead)

    def run(on: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype | None):
        sae = SparseAutoencoder(cfg, device=on, dtype=dtype, compute_dtype=compute_dtype)
        with torch.no_grad():
            sae.W_dec.copy_(W_dec)
            sae.encoder.weight.copy_(W_dec)
        out = sae(x.to(on, dtype), dead.to(on))
        out.loss.backward()
        values = {"fvu": out.fvu, "auxk_loss": out.auxk_loss, **{f"grad {n}": p.grad for n, p in sae.named_parameters()}}
        return {name: value.detach().double().cpu() for name, value in values.items()}, out.latent_indices.cpu()

    reference, ref_indices = run(torch.device("cpu"), torch.float64, None)
    results = []
    for compute_dtype in (torch.float32, torch.bfloat16):
        values, indices = run(device, torch.float32, compute_dtype)
        errors = {name: ((values[name] - reference[name]).norm() / reference[name].norm().clamp_min(1e-30)).item()
                  for name in reference}
        same = torch.equal(indices.sort(1).values, ref_indices.sort(1).values)
        results.append({"compute_dtype": str(compute_dtype).removeprefix("torch."), "d_in": d_in, "n_latents": n_latents,
                        "k": k, "rows": rows, "same_selection": same, "max_relative_error": max(errors.values()),
                        "errors": errors, "ok": same and max(errors.values()) <= STEP_TOLERANCE[compute_dtype]})
    return results


def random_gpt2(folder: Path, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> Path:
    """A randomly initialised GPT-2 of these sizes with the embedded tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def training_check(device: torch.device, dry: bool, folder: Path) -> dict:
    n_layer, n_embd, n_head = (2, 64, 2) if dry else (12, 768, 12)
    model = random_gpt2(folder / "gpt2-random", n_layer, n_embd, n_head, n_positions=64)
    sae = SaeConfig(n_latents=512, k=8, k_aux=64, dead_tokens=20_000) if dry else \
        SaeConfig(n_latents=32768, k=32, k_aux=512, dead_tokens=1_000_000)
    batch_size = 1024 if dry else 8192
    cfg = TrainConfig(model=str(model), hookpoint=f"transformer.h.{n_layer // 2}", sae=sae, batch_size=batch_size,
                      max_tokens=batch_size * (4 if dry else 200), data=replace(DataConfig(), ctx_len=64),
                      device=str(device), out_dir=str(folder / "runs"), run_name="check", log_every=2, save_every=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    sae_dir = train(cfg)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (sae_dir.parent / "log.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"n_layer": n_layer, "d_in": n_embd, "n_latents": sae.n_latents, "k": sae.k, "batch_size": batch_size,
            "tokens": cfg.max_tokens, "final_fvu": log[-1]["fvu"], "tokens_per_s": log[-1]["tokens_per_s"],
            "wall_s": wall, "peak_memory_bytes": peak, "precision": cfg.precision}


def markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']} ({'dry run' if report['dry'] else 'full'})", "",
             "| step | compute | same selection | max relative error | ok |", "|---|---|---|---|---|"]
    for r in report["step"]:
        lines.append(f"| d{r['d_in']} n{r['n_latents']} k{r['k']} | {r['compute_dtype']} | {r['same_selection']} "
                     f"| {r['max_relative_error']:.2e} | {r['ok']} |")
    lines += ["", "| bench size | implementation | AuxK | step ms | step / matmul |", "|---|---|---|---|---|"]
    for r in report["bench"]:
        lines.append(f"| d{r['d_in']} n{r['n_latents']} k{r['k']} N{r['batch']} {r['dtype']} | {r['impl']} | "
                     f"{r['auxk']} | {r['step_ms']:.2f} | {r['ratio']:.2f} |")
    t = report["train"]
    peak = "n/a" if t["peak_memory_bytes"] is None else f"{t['peak_memory_bytes'] / 2**30:.2f} GiB"
    lines += ["", f"train: {t['n_layer']}-layer random GPT-2, d_in {t['d_in']}, {t['n_latents']} latents, k {t['k']}, "
              f"batch {t['batch_size']}, {t['tokens']:,} tokens, precision {t['precision']}: final fvu "
              f"{t['final_fvu']:.4f}, {t['tokens_per_s']:,.0f} tokens/s, peak memory {peak}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if not args.dry and device.type != "cuda":
        parser.error("no CUDA device here; use --dry to check the command on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # k small against d_in: a planted row's cross-talk with the others (~ 3.5 sqrt(k / d_in) of a
    # coefficient at the extreme) stays well below the selection margin, in bf16 too.
    step_shapes = [(256, 600, 2, 64)] if args.dry else [(768, 12288, 8, 4096), (1000, 4000, 10, 1000)]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dry": args.dry,
              "machine": bench.machine()}
    report["step"] = [r for shape in step_shapes for r in step_check(device, *shape)]
    report["bench"] = bench.run(bench.QUICK_SIZES if args.dry else bench.CUDA_SIZES, device, 1 if args.dry else 5,
                                {"sae_kernels[torch]"} if args.dry else None)
    with tempfile.TemporaryDirectory() as folder:
        report["train"] = training_check(device, args.dry, Path(folder))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["ok"] for r in report["step"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
