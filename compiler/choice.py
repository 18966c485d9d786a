"""The choice of a route: for one (circuit, kind, bucket, device, dtype), which route runs.

:func:`decide` plans every route the registry offers on the device within ``PLAN_BUDGET``
seconds of search; on the CPU the cost model (priced with the machine's calibrated constants)
prunes those predicted ``PRUNE`` times slower than the best; the survivors — always including
the reference — are timed with real tensors (:mod:`measure`: the fastest of interleaved runs,
bounded time) and the fastest wins; the winner is remembered in the wisdom store. Without
measurement (``QCIRCUIT_TUNE=0``), or for activations too large to time
(``MEASURE_MAX_NUMEL``), the cost model decides on the CPU, and on other devices — which the
CPU's model does not describe — the reference runs. The result is a :class:`Decision`, a
plain value; executors are built from it (:func:`build`). Who calls :func:`decide`, when,
and where the result is kept is :mod:`tuning`'s business.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from qcircuit.errors import QCError

from . import cachefiles
from . import costmodel as cm
from . import measure as measure_mod
from .caps import MEASURE_MAX_NUMEL, TUNE_MAX_GATES
from .lowered import Lowered
from .routes import REFERENCE, Route, route_named, routes_for, uncast_routes
from .wisdom import Entry, WisdomStore

PLAN_BUDGET = 1.0           # seconds of search for one choice, every route together
PRUNE = 3.0                 # routes predicted this much slower than the best are not timed

Timer = Callable[[dict[str, Callable[[], None]]], dict[str, float]]


@dataclass(frozen=True)
class Candidate:
    """One route considered: its predicted and measured seconds (None: not available)."""

    route: str
    predicted: float | None
    measured: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Decision:
    """What runs one (circuit, kind, bucket, device type, dtype): the route and its steps
    (a ``ContractionPath``, ``Schedule``, ``Lightcone``…), the candidates and how it was
    chosen: "measured", "wisdom", "model", "default", "only" or "named"."""

    signature: str
    kind: str
    bucket: int | None
    device_type: str
    dtype: torch.dtype
    route: str
    steps: Any = field(repr=False)
    candidates: tuple[Candidate, ...] = ()
    how: str = "model"

    def explain(self) -> str:
        """The candidates, their predicted and measured times, and the winner, as text."""
        where = f"bucket {self.bucket} tokens" if self.kind == "forward" else "dense matrix"
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [f"circuit {self.signature}: {self.kind}, {where}, {self.device_type} {dtype}",
                 f"  {'route':10s} {'predicted ms':>13s} {'measured ms':>12s}"]
        for c in self.candidates:
            fmt = (lambda t: f"{t * 1e3:.3f}" if t is not None else "-")
            mark = " *" if c.route == self.route else "  "
            lines.append(f"{mark}{c.route:10s} {fmt(c.predicted):>13s} {fmt(c.measured):>12s}"
                         + (f"  {c.note}" if c.note else ""))
        lines.append(f"  chosen: {self.route} ({self.how})")
        return "\n".join(lines)


def build(lowered: Lowered, decision: Decision) -> Callable:
    """A fresh executor for ``decision`` (``run(x2d, gates)`` or ``run(gates)``)."""
    return route_named(decision.kind, decision.route).build(lowered, decision.steps)


def _plan_one(r: Route, lowered: Lowered, bucket: int | None, dtype: torch.dtype,
              deadline: float, machine: cm.Machine, priced: bool) -> tuple[Any, Candidate]:
    """``r``'s steps (None: none) and its candidate row."""
    try:
        steps = r.search(lowered, bucket, dtype, deadline, machine) if (
            r.name == REFERENCE or time.monotonic() < deadline) else None
        note = "" if steps is not None else "no plan within the search budget"
    except QCError as exc:
        steps, note = None, str(exc)
    except Exception as exc:  # noqa: BLE001 - schedule.OutOfTime, or a route that cannot plan this
        steps, note = None, f"not planned ({type(exc).__name__})"
    predicted = r.predict(lowered, steps, bucket, dtype, machine) if (
        steps is not None and priced) else None
    return steps, Candidate(r.name, predicted, None, note)


def search(lowered: Lowered, kind: str, bucket: int | None, device_type: str, dtype: torch.dtype,
           machine: cm.Machine, routes: Sequence[Route] | None = None
           ) -> tuple[dict[str, Any], list[Candidate], list[str]]:
    """Plan every offered route (or ``routes``) within ``PLAN_BUDGET``: (steps by route,
    candidates with their predictions and notes, the routes worth timing — the reference
    always; on the CPU only those the cost model keeps)."""
    routes = routes_for(kind, device_type, offered=True) if routes is None else list(routes)
    if lowered.num_gates > TUNE_MAX_GATES:
        cachefiles.warn_once(f"choice:big {lowered.signature}", f"the circuit has "
                             f"{lowered.num_gates} gates; above TUNE_MAX_GATES = {TUNE_MAX_GATES} "
                             "only opt_einsum's path is planned (greedy above 12 operands)", 6)
        routes = [r for r in routes if r.name == REFERENCE]
    deadline = time.monotonic() + PLAN_BUDGET
    priced = device_type == "cpu"   # the cost model knows the CPU only
    found: dict[str, Any] = {}
    candidates: list[Candidate] = []
    for r in routes:
        steps, cand = _plan_one(r, lowered, bucket, dtype, deadline, machine, priced)
        if steps is not None:
            found[r.name] = steps
        candidates.append(cand)
    prices = [c.predicted for c in candidates if c.predicted is not None and c.route in found]
    best = min(prices) if prices else None
    alive = [c.route for c in candidates if c.route in found and (
        c.route == REFERENCE or best is None or c.predicted is None or c.predicted <= PRUNE * best)]
    candidates = [Candidate(c.route, c.predicted, None, "pruned by the cost model")
                  if c.route in found and c.route not in alive else c for c in candidates]
    return found, candidates, alive


def decide(lowered: Lowered, kind: str, bucket: int | None, device: torch.device,
           dtype: torch.dtype, *, machine: cm.Machine, measure: bool, timer: Timer,
           wisdom: WisdomStore, key: str, gate_dtype: torch.dtype | None = None
           ) -> Decision | None:
    """Choose the route for this key (see the module docstring); ``key`` names it in the
    wisdom store. Runs measurements: call it where no autograd records (``tuning`` does).
    With a ``gate_dtype`` other than ``dtype``, only routes that take ``dtype`` activations
    against such gates uncast compete, and None says that none can run them."""
    uncast = gate_dtype is not None and gate_dtype != dtype
    routes = uncast_routes(device.type, dtype) if uncast else None
    found, candidates, alive = search(lowered, kind, bucket, device.type, dtype, machine, routes)
    if not alive:
        return None

    def result(route: str, how: str, times: dict[str, float] | None = None) -> Decision:
        cands = tuple(Candidate(c.route, c.predicted, (times or {}).get(c.route), c.note)
                      for c in candidates)
        return Decision(lowered.signature, kind, bucket, device.type, dtype, route,
                        found[route], cands, how)

    if len(alive) == 1:
        return result(alive[0], "only")
    numel = max(lowered.in_features, lowered.out_features) * (
        bucket if kind == "forward" else lowered.in_features)
    if not measure or numel > MEASURE_MAX_NUMEL:
        if device.type != "cpu":
            return result(REFERENCE if REFERENCE in alive else alive[0], "default")
        return result(min(alive, key=lambda n: _predicted(candidates, n)), "model")
    known = wisdom.lookup(key)
    if known is not None and known.route in alive:
        return result(known.route, "wisdom", dict(known.times))
    with wisdom.measuring() as locked:
        known = wisdom.lookup(key) if locked else None  # measured by another process meanwhile
        if known is not None and known.route in alive:
            return result(known.route, "wisdom", dict(known.times))
        thunks = {n: measure_mod.thunk(lowered, kind, bucket, device, dtype,
                                       build(lowered, result(n, "measuring")), gate_dtype)
                  for n in alive}
        times = timer(thunks)
        winner = min(alive, key=lambda n: times.get(n, float("inf")))
        wisdom.record(key, Entry(winner, {n: times[n] for n in alive if n in times}), locked)
    return result(winner, "measured", times)


def named(lowered: Lowered, kind: str, route: str, bucket: int | None, device_type: str,
          dtype: torch.dtype, machine: cm.Machine) -> Decision:
    """The decision that runs ``route`` (no deadline, no measurement): what
    ``module(route=...)`` and comparisons of routes run."""
    r = route_named(kind, route, device_type)
    steps, cand = _plan_one(r, lowered, bucket, dtype, float("inf"), machine, device_type == "cpu")
    if steps is None:
        raise QCError(f"route {route!r} cannot run this circuit: {cand.note}")
    return Decision(lowered.signature, kind, bucket, device_type, dtype, route, steps, (cand,),
                    "named")


def _predicted(candidates: Sequence[Candidate], name: str) -> float:
    p = next(c.predicted for c in candidates if c.route == name)
    return float("inf") if p is None else p
