"""Forward+backward of the paper's circuit (16·8·8·4, all_pairs, 4096 wide) three ways.

(a) the compiled module (``compile(c).module()``, path planned per token bucket),
(b) a plain loop applying each gate with ``torch.einsum``,
(c) one opt_einsum expression over the whole network, its path fixed once at 100 tokens
    (the reference implementation's approach).

Run: ``python benchmarks/compare_paths.py [--repeats 15] [--tokens 16 512 2048]``.
Interleaved repeats (a, b, c, a, b, c, …), medians, 2 threads, float32, CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import opt_einsum
import torch

from qcircuit import Circuit
from qcircuit.compiler import compile

def einsum_loop(circuit: Circuit) -> Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]:
    """(b): one ``torch.einsum`` per gate on the ``(tokens, *dims)`` view. Each step names
    the qudit axes a, b, c, … and the gate's new axes A, B, …, so no letters run out."""
    lower = "abcdefghijklmnopqrstuvwxy"[:circuit.num_qudits]
    equations = []
    for gate in circuit.gates:
        outs = "".join(lower[q].upper() for q in gate.qudits)
        ins = "".join(lower[q] for q in gate.qudits)
        result = "".join(c.upper() if i in gate.qudits else c for i, c in enumerate(lower))
        equations.append(f"z{lower},{outs}{ins}->z{result}")
    in_dims, out_features = circuit.in_dims, circuit.out_features

    def run(x2d: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        h = x2d.reshape(x2d.shape[0], *in_dims)
        for eq, g in zip(equations, gates):
            h = torch.einsum(eq, h, g)
        return h.reshape(x2d.shape[0], out_features)

    return run


def one_expression(circuit: Circuit, plan_tokens: int = 100):
    """(c): opt_einsum over the whole network, path planned once at ``plan_tokens``."""
    net = compile(circuit).forward_network
    expr = opt_einsum.contract_expression(net.equation, *net.shapes(plan_tokens),
                                          optimize="optimal")
    in_dims, out_features = circuit.in_dims, circuit.out_features

    def run(x2d: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        y = expr(x2d.reshape(x2d.shape[0], *in_dims), *gates, backend="torch")
        return y.reshape(x2d.shape[0], out_features)

    return run


def time_step(fn, x: torch.Tensor, gates: Sequence[torch.Tensor], grad: torch.Tensor) -> float:
    """Seconds for one forward+backward (gradients w.r.t. the input and every gate)."""
    for t in (x, *gates):
        t.grad = None
    start = time.perf_counter()
    fn(x, gates).backward(grad)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    circuit = Circuit(16, 8, 8, 4).all_pairs()
    plan = compile(circuit)
    module = plan.module(seed=0)
    gates = list(module.gates)
    variants = {
        "module": lambda x, gs: module(x),
        "einsum loop": einsum_loop(circuit),
        "one expression": one_expression(circuit),
    }
    print(f"paper circuit 16x8x8x4 all_pairs, {plan.num_params} params, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats")
    header = (f"{'tokens':>7} | {'module ms':>10} | {'loop ms':>9} | {'1-expr ms':>9} | "
              f"{'loop/module':>11} | {'1-expr/module':>13} | {'GFLOP':>6}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        x = torch.randn(tokens, circuit.in_features, generator=gen).requires_grad_()
        grad = torch.randn(tokens, circuit.out_features, generator=gen)
        outputs = {name: fn(x, gates).detach() for name, fn in variants.items()}
        ref = outputs["module"]
        for name, y in outputs.items():  # the three agree before anything is timed
            err = ((y - ref).norm() / ref.norm()).item()
            assert err < 1e-4, f"{name} disagrees with the module: relative error {err:.2e}"
        for fn in variants.values():
            time_step(fn, x, gates, grad)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(time_step(fn, x, gates, grad))
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        print(f"{tokens:>7} | {med['module']:>10.2f} | {med['einsum loop']:>9.2f} | "
              f"{med['one expression']:>9.2f} | {med['einsum loop'] / med['module']:>11.2f} | "
              f"{med['one expression'] / med['module']:>13.2f} | {plan.flops(tokens) / 1e9:>6.2f}")
    print("ratios > 1: the module is faster; GFLOP: the module's forward path (x2 multiply-adds)")


if __name__ == "__main__":
    main()
