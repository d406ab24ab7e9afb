"""Every Triton kernel compiled ahead of time for real GPU targets, on a machine without a GPU.

    python -m sae_kernels.aot            # table: kernel, target, dtype, shape, registers, spills, shared memory
    python -m sae_kernels.aot --json F   # the same rows as JSON

The argument types and specialisations are not written by hand: the public ops (ops.py) run one
SAE training step as the trainer runs it (encode, decode, then AuxK: the encoder on the dead latents'
rows alone, their reconstruction loss; backward) on CPU tensors at each shape of
`SHAPES`, with every kernel launch recorded instead of run, and each recorded launch is then compiled
with `triton.compile` for each `GPUTarget` of `TARGETS`. The cubin's resource usage comes from the
`cuobjdump` that ships in the triton wheel. `problems` names what fails the check: a compile error,
register spills (local memory), more than 255 registers, shared memory over the target's limit, or a
kernel of this package that no launch used.

Recording needs the kernel modules imported as compiled kernels, so this must run in a process where
TRITON_INTERPRET is not set (the tests start it as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

MAX_REGISTERS = 255
# Per-block shared memory a kernel may use (the opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


@dataclass(frozen=True)
class Shape:
    """One SAE training step's sizes. The batch only sets grids, not the compiled code."""

    d_in: int
    n_latents: int
    k: int
    k_aux: int
    dtype: torch.dtype
    batch: int = 64


# The bench step (sae/bench.py: d_in 768, 12288 latents, k 32, k_aux 512) in fp32 and bf16, and an
# unaligned width (d_in 1000, k 50: no multiple of 16 anywhere).
SHAPES = (
    Shape(768, 12288, 32, 512, torch.float32),
    Shape(768, 12288, 32, 512, torch.bfloat16),
    Shape(1000, 4000, 50, 100, torch.float32),
    Shape(1000, 4000, 50, 100, torch.bfloat16),
)


@dataclass
class Build:
    """One kernel compiled for one target from one recorded launch."""

    kernel: str
    target: str
    """"sm_80" or "sm_90"."""
    shape: str
    """The step's sizes and dtype, e.g. "d768 n12288 k32 float32"."""
    signature: str
    """Argument types as Triton specialised them: "name=value" for a compile-time constant, "%16" for
    a pointer or integer known to be divisible by 16."""
    registers: int = -1
    spill_bytes: int = -1
    """Local memory per thread (register spills and stack arrays); 0 is required."""
    shared_bytes: int = -1
    error: str = ""


def _kernel_modules() -> list[Any]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sae_kernels.aot needs compiled kernels: run it where TRITON_INTERPRET is not set")
    from . import auxk, decode, encode

    return [decode, encode, auxk]


def record_launches(shape: Shape) -> list[tuple[Any, tuple, dict]]:
    """(kernel, args, kwargs) of every kernel launch in one training step at `shape`, none of them run.

    The unrun kernels leave their outputs uninitialised; only the launches' argument types matter."""
    from triton.runtime.jit import JITFunction

    from . import ops

    _kernel_modules()
    launches: list[tuple[Any, tuple, dict]] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.d_in, generator=generator).to(shape.dtype)
    W_enc = torch.randn(shape.n_latents, shape.d_in, generator=generator).to(shape.dtype).requires_grad_()
    b_enc = torch.zeros(shape.n_latents, dtype=shape.dtype, requires_grad=True)
    W_dec = W_enc.detach().clone().requires_grad_()
    b_dec = torch.zeros(shape.d_in, dtype=shape.dtype, requires_grad=True)
    dead = torch.arange(shape.n_latents // 10)
    saved_run, saved_interpret = JITFunction.run, os.environ.get("TRITON_INTERPRET")
    JITFunction.run = record
    # resolve_backend lets the triton backend take CPU tensors only under the interpreter; the kernels
    # were imported compiled above, so the variable only opens that door.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        values, indices = ops.topk_encode(x, W_enc, b_enc, shape.k, b_dec=b_dec, backend="triton")
        x_hat = ops.sparse_decode(values, indices, W_dec, backend="triton") + b_dec
        aux_values, local = ops.topk_encode(x, W_enc[dead], b_enc[dead], shape.k_aux, b_dec=b_dec, backend="triton")
        aux_loss = ops.auxk_loss(aux_values, dead[local], W_dec, x - x_hat, backend="triton")
        ((x - x_hat).float().pow(2).sum() + aux_loss).backward()
    finally:
        JITFunction.run = saved_run
        if saved_interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved_interpret
    return launches


def specialise(kernel: Any, args: tuple, kwargs: dict, capability: int) -> tuple[str, tuple]:
    """What `JITFunction.run` would compile for one recorded launch on sm_`capability`: its signature as
    text (see `Build.signature`) and the (source, target, options) to hand to `triton.compile`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    names = list(signature)
    constants = {names[path[0]]: value for path, value in constexprs.items()}
    aligned = {names[path[0]] for path, attr in attrs.items() if attr}
    text = ", ".join(
        f"{name}={constants[name]}" if name in constants else f"{name}: {kind}{' %16' if name in aligned else ''}"
        for name, kind in signature.items())
    return text, (ASTSource(kernel, signature, constexprs, attrs), target, options)


def compile_build(build: Build, compile_inputs: tuple, cuobjdump: str) -> None:
    """Compile one specialisation and fill `build`'s resources from the cubin (or its error)."""
    import triton

    source, target, options = compile_inputs
    try:
        compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as error:  # noqa: BLE001 -- a compile error is a result of this check
        build.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        build.error = f"no resource usage in cuobjdump's output: {usage.strip()[:200]}"
        return
    registers, stack, static_shared, local = map(int, found.groups())
    build.registers, build.spill_bytes = registers, local + stack
    build.shared_bytes = max(static_shared, int(compiled.metadata.shared))


def build_all(shapes=SHAPES, capabilities=TARGETS) -> tuple[list[Build], set[str]]:
    """Every distinct (kernel, target, signature) build over `shapes`, each compiled once, and the kernels
    launched."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    builds: dict[tuple[str, int, str], Build] = {}
    launched: set[str] = set()
    for shape in shapes:
        label = f"d{shape.d_in} n{shape.n_latents} k{shape.k} {str(shape.dtype).removeprefix('torch.')}"
        for kernel, args, kwargs in record_launches(shape):
            launched.add(kernel.__name__)
            for capability in capabilities:
                signature, compile_inputs = specialise(kernel, args, kwargs, capability)
                key = (kernel.__name__, capability, signature)
                if key not in builds:
                    builds[key] = Build(kernel.__name__, f"sm_{capability}", label, signature)
                    compile_build(builds[key], compile_inputs, cuobjdump)
    return list(builds.values()), launched


def package_kernels() -> dict[str, str]:
    """Name -> source of every @triton.jit function in this package's kernel modules."""
    from triton.runtime.jit import JITFunction

    return {value.__name__: value.src for module in _kernel_modules() for value in vars(module).values()
            if isinstance(value, JITFunction)}


def problems(builds: list[Build], launched: set[str]) -> list[str]:
    """One line per failure of the check (empty: every kernel compiles within the limits)."""
    found = []
    for b in builds:
        where = f"{b.kernel} for {b.target} at {b.shape}"
        limit = SHARED_LIMIT[int(b.target.removeprefix("sm_"))]
        if b.error:
            found.append(f"{where}: compile error: {b.error}")
        elif b.spill_bytes > 0:
            found.append(f"{where}: {b.spill_bytes} bytes of local memory per thread (register spills)")
        elif b.registers > MAX_REGISTERS:
            found.append(f"{where}: {b.registers} registers > {MAX_REGISTERS}")
        elif b.shared_bytes > limit:
            found.append(f"{where}: {b.shared_bytes} bytes of shared memory > {limit}")
    sources = package_kernels()
    launched_sources = "\n".join(sources[name] for name in launched)
    for name in sorted(set(sources) - launched):
        # A @triton.jit helper called from a launched kernel is used; any other is dead code.
        if not re.search(rf"\b{name}\(", launched_sources):
            found.append(f"{name}: a kernel nobody launches in a training step")
    return found


def markdown(builds: list[Build]) -> str:
    lines = ["| kernel | target | step | registers | spills (B) | shared (B) |", "|---|---|---|---|---|---|"]
    for b in sorted(builds, key=lambda b: (b.kernel, b.target, b.shape)):
        lines.append(f"| {b.kernel} | {b.target} | {b.shape} | {b.registers} | {b.spill_bytes} | {b.shared_bytes} |"
                     if not b.error else f"| {b.kernel} | {b.target} | {b.shape} | error: {b.error} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the builds and problems as JSON")
    args = parser.parse_args(argv)
    builds, launched = build_all()
    found = problems(builds, launched)
    print(markdown(builds))
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"builds": [asdict(b) for b in builds], "problems": found}, f, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
