"""Timing candidate routes on real tensors (what :func:`routes.choose` measures)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .planning import Plan

MEASURE_BUDGET = 2.0        # seconds of timing for one choice, warm-ups included (they alone
                            # may pass it on huge inputs: then they are the measurement)
MIN_ROUNDS = 3              # rounds run even past the budget (unless the warm-ups passed it)
MAX_ROUNDS = 41


def thunk(plan: "Plan", kind: str, bucket: int | None, device_type: str, dtype: torch.dtype,
          run: Callable) -> Callable[[], None]:
    """One timed run of an executor on real tensors: a training step (forward, then backward
    into the input and every gate) for ``forward``, a no-grad matrix for ``dense``."""
    gen = torch.Generator().manual_seed(0)
    device = torch.device(device_type)
    gates = [(torch.rand(g.shape, generator=gen, dtype=torch.float64) - 0.5).to(device, dtype)
             for g in plan.circuit.gates]
    off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else None
    if kind == "dense":
        def dense_run() -> None:
            with torch.no_grad(), off or torch.no_grad():
                run(gates)
        return dense_run
    x = torch.randn(bucket, plan.in_features, generator=gen).to(device, dtype).requires_grad_()
    gy = torch.randn(bucket, plan.out_features, generator=gen).to(device, dtype)
    leaves = [g.requires_grad_() for g in gates]

    def step() -> None:
        with torch.enable_grad(), off or torch.enable_grad():
            run(x, leaves).backward(gy)
        for t in (x, *leaves):
            t.grad = None
    return step


def _sync(device_types: set[str]) -> None:
    if "cuda" in device_types and torch.cuda.is_available():
        torch.cuda.synchronize()


def fastest_times(thunks: dict[str, Callable[[], None]]) -> dict[str, float]:
    """The fastest run of each thunk over interleaved rounds, after one warm-up each. Noise on
    a shared machine only ever adds time, so the minimum ranks candidates best (as ``timeit``
    advises). Rounds run while the next is predicted to end within ``MEASURE_BUDGET``, at
    least ``MIN_ROUNDS`` and at most ``MAX_ROUNDS``; where the warm-ups alone passed the
    budget, they are the measurement."""
    times: dict[str, list[float]] = {n: [] for n in thunks}
    device_types = {"cuda"} if torch.cuda.is_available() else set()

    def timed(fn: Callable[[], None]) -> float:
        _sync(device_types)
        t0 = time.perf_counter()
        fn()
        _sync(device_types)
        return time.perf_counter() - t0

    start = time.perf_counter()
    with torch.inference_mode(False):
        warm = {n: timed(fn) for n, fn in thunks.items()}
        round_time, rounds = sum(warm.values()), 0
        if round_time > MEASURE_BUDGET:
            return warm
        while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or time.perf_counter() - start
                                       + round_time <= MEASURE_BUDGET):
            t0 = time.perf_counter()
            order = list(thunks.items())
            for n, fn in order[rounds % len(order):] + order[:rounds % len(order)]:
                times[n].append(timed(fn))
            round_time, rounds = time.perf_counter() - t0, rounds + 1
    return {n: min(ts) for n, ts in times.items()}
