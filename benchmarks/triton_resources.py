"""Compile every kernel of the triton route's plan for an NVIDIA architecture, offline.

No GPU is needed: Triton lowers the kernels to PTX and its bundled ``ptxas`` assembles them
for ``--arch`` (90: H100/H200, 80: A100). For the paper's circuit (16·8·8·4 all_pairs) in
each dtype and token bucket given, every pass of the plan (forward, recomputed inputs,
backward, transposed circuit; and the dense matrix's passes) is printed with its shared
memory, registers and spills — what decides whether a budget fits a device
(``triton_route.search`` also checks it on the GPU itself, by compiling).

Usage: ``python benchmarks/triton_resources.py [--arch 90] [--dtype bfloat16 ...]
[--bucket 16 8192 ...]`` (needs Triton; compiling takes seconds per kernel).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qcircuit import Circuit
from qcircuit.compiler import compile as compile_circuit
from qcircuit.compiler import triton_kernels as tk
from qcircuit.compiler import triton_route

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def assemble(kernel, args: dict, constants: dict, arch: int) -> str:
    """Shared memory, registers and spills of one kernel compiled for ``sm_<arch>``."""
    warps = constants.pop("num_warps")
    src = ASTSource(fn=kernel, signature={**args, **{k: "constexpr" for k in constants}},
                    constexprs=constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name,
                              "-o", os.devnull], capture_output=True, text=True).stderr
    regs = (re.findall(r"Used (\d+) registers", log) or ["?"])[0]
    spills = [w.strip().split()[0] for w in log.split(",") if "spill" in w]
    shared = compiled.metadata.shared
    over = " OVER the device's shared memory" if shared > SHARED_LIMIT.get(arch, 1 << 30) else ""
    return (f"shared {shared // 1024:4d} KiB, {regs:>3s} registers, spills "
            f"{'/'.join(spills) or '?'} bytes (stores/loads), {warps} warps{over}")


def report(plan, dtype: torch.dtype, bucket: int, arch: int, precision: str) -> list[str]:
    steps = triton_route._plan(plan, bucket, dtype, 1.0, precision)
    acc, inter = getattr(torch, steps.acc), getattr(torch, steps.inter)
    ty = (lambda d: "*" + TYPES[d])
    lines = [f"{TYPES[dtype]} bucket {bucket}: {steps.describe()}"]

    def fwd(kind: str, passes, first, last, identity=False) -> None:
        for i, p in enumerate(passes):
            src = first if i == 0 else inter
            dst = last if i == len(passes) - 1 else inter
            args = {"x_ptr": ty(src), "y_ptr": ty(dst), "gates": tuple("*fp32" for _ in p.gates),
                    "n": "i32", "blocks": "i32"}
            consts = tk.forward_constants(p, acc, steps.precision, identity)
            lines.append(f"  {kind:9s} {list(p.gates)} x{p.tokens}t: "
                         + assemble(tk.pass_forward, args, consts, arch))
    fwd("forward", steps.forward, dtype, dtype)
    fwd("recompute", steps.recompute, dtype, inter)
    fwd("adjoint", steps.adjoint, dtype, dtype)
    for i, p in enumerate(steps.backward):
        src = dtype if i == 0 else inter
        cot = dtype if i == len(steps.backward) - 1 else inter
        args = {"x_ptr": ty(src), "c_ptr": ty(cot), "gx_ptr": ty(src), "part_ptr": ty(acc),
                "gates": tuple("*fp32" for _ in p.gates), "n": "i32", "blocks": "i32",
                "tiles": "i32"}
        consts = tk.backward_constants(p, acc, steps.precision, True)
        lines.append(f"  backward  {list(p.gates)} x{p.tokens}t: "
                     + assemble(tk.pass_backward, args, consts, arch))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--bucket", nargs="+", type=int, default=[16, 8192])
    args = ap.parse_args()
    plan = compile_circuit(Circuit(16, 8, 8, 4).all_pairs())
    print(f"# triton {triton.__version__}, sm_{args.arch}; paper circuit 16·8·8·4 all_pairs")
    for name in args.dtype:
        for bucket in args.bucket:
            dtype = getattr(torch, name)
            for precision in triton_route._precisions(dtype):
                print("\n".join(report(plan, dtype, bucket, args.arch, precision)), flush=True)
    for p in triton_route._plan(plan, plan.out_features, torch.float32, 1.0, "bf16x3").adjoint:
        args_ = {"x_ptr": "*fp32", "y_ptr": "*fp32", "gates": tuple("*fp32" for _ in p.gates),
                 "n": "i32", "blocks": "i32"}
        print(f"dense fp32 {list(p.gates)} x{p.tokens}t: " + assemble(
            tk.pass_forward, args_, tk.forward_constants(p, torch.float32, "bf16x3", True),
            args.arch), flush=True)


if __name__ == "__main__":
    main()
