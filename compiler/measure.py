"""Timing candidate routes on real tensors (what :func:`choice.decide` measures), apart from
the caller.

:func:`isolated` runs a function on a worker thread and waits for it. Autograd's grad mode,
saved-tensor hooks (gradient checkpointing), autocast, inference mode and ``torch.func``
transforms are all thread-local state, so a decision made inside a user's forward — a first
forward of a new token bucket — measures on tensors of its own that no recorded graph, hook
or autocast region of the caller ever sees, and the caller's forward then runs exactly what
was decided.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

import torch

from .lowered import Lowered

T = TypeVar("T")

MEASURE_BUDGET = 2.0        # seconds of timing for one choice, warm-ups included (they alone
                            # may pass it on huge inputs: then they are the measurement)
MIN_ROUNDS = 3              # rounds run even past the budget (unless the warm-ups passed it)
MAX_ROUNDS = 41


def isolated(fn: Callable[[], T], device: torch.device | None = None) -> T:
    """``fn()`` run on a fresh thread (with ``device`` current, for CUDA), its result or
    exception handed back: none of the calling thread's autograd, hook or autocast state
    applies inside."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            box["error"] = exc

    worker = threading.Thread(target=work, name="qcircuit-tuning", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def thunk(lowered: Lowered, kind: str, bucket: int | None, device: torch.device,
          dtype: torch.dtype, run: Callable, gate_dtype: torch.dtype | None = None
          ) -> Callable[[], None]:
    """One timed run of an executor on real tensors: a training step (forward, then backward
    into the input and every gate) for ``forward``, a no-grad matrix for ``dense``."""
    gen = torch.Generator().manual_seed(0)
    gates = [(torch.rand(g.shape, generator=gen, dtype=torch.float64) - 0.5).to(
        device, gate_dtype or dtype) for g in lowered.circuit.gates]
    if kind == "dense":
        def dense_run() -> None:
            with torch.no_grad():
                run(gates)
        return dense_run
    x = torch.randn(bucket, lowered.in_features, generator=gen).to(device, dtype).requires_grad_()
    gy = torch.randn(bucket, lowered.out_features, generator=gen).to(device, dtype)
    leaves = [g.requires_grad_() for g in gates]

    def step() -> None:
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
