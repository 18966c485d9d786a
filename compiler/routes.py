"""Routes: the ways a circuit can run, where each can run, and the choice between them.

A *route* computes either the forward ``y = T·x`` (kind ``"forward"``, planned per token
bucket) or the dense matrix ``T`` (kind ``"dense"``):

``einsum``     the one-expression opt_einsum path, step by step with ``torch.einsum``: any
               device, any dtype, traceable, differentiable (the reference's method)
``schedule``   a cost-model GEMM schedule (``schedule.py``, run by ``schedule_exec.py``; the
               dense form by ``dense.py``): a custom autograd function over plain tensors
``lightcone``  the dense matrix through the identity's light cone (``lightcone.py``),
               forward only

:func:`choose` is the one decision. Every route that can run on the device and dtype is
planned within ``PLAN_BUDGET`` seconds of search; the cost model prunes those predicted far
slower than the best; the survivors — always including ``einsum`` — are timed on the device
with real tensors (:mod:`measure`: the fastest of interleaved runs, bounded time) and the
fastest wins. The
winner is remembered in :mod:`wisdom`. With ``QCIRCUIT_TUNE=0`` (read once), or for
activations too large to time, the cost model's prediction decides instead — on the CPU,
whose constants it was calibrated with. On any other device the CPU's model neither prunes
nor decides: every route that plans is timed, and where nothing can be timed the
device-neutral ``einsum`` route runs. The result is a :class:`RoutePlan`, a plain value; executors are
built from it by :func:`build` and cached at this edge, keyed by everything that changes them.

Inputs a chosen route cannot take go the ``einsum`` way: under ``torch.compile`` (a path
planned once at ``TRACE_BUCKET`` tokens, valid for every token count, so tracing plans
nothing), while autograd records a dense matrix, and for tensors that are not plain (a
``DTensor`` gate is gathered with ``full_tensor()`` first).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from qcircuit.errors import QCError

from . import calibrate
from . import costmodel as cm
from . import measure as measure_mod
from . import triton_route, wisdom
from .planning import (MAX_DENSE_NUMEL, einsum_dense_executor, einsum_executor, plan_path,
                       token_bucket)

if TYPE_CHECKING:
    from .planning import Plan

KINDS = ("forward", "dense")
TRACE_BUCKET = 512          # the traced path's planning size (any token count runs on it)
MAX_TUNED_GATES = 24        # above: opt_einsum's path only (greedy above 12 operands)
PLAN_BUDGET = 1.0           # seconds of search for one choice, every route together
MEASURE_MAX_NUMEL = 1 << 24  # larger activations (or dense matrices) are not timed: model only
PRUNE = 3.0                 # routes predicted this much slower than the best are not timed

Measure = Callable[[dict[str, Callable[[], None]]], dict[str, float]]


@dataclass(frozen=True)
class Candidate:
    """One route considered: its predicted and measured seconds (None: not available)."""

    route: str
    predicted: float | None
    measured: float | None = None
    note: str = ""


@dataclass(frozen=True)
class RoutePlan:
    """What runs one (circuit, kind, bucket, device type, dtype): the route and its steps
    (``PathPlan``, ``Schedule`` or ``LightconePlan``), the candidates and how it was chosen."""

    signature: str
    kind: str
    bucket: int | None
    device_type: str
    dtype: torch.dtype
    route: str
    steps: Any = field(repr=False)
    candidates: tuple[Candidate, ...] = ()
    how: str = "model"      # "measured", "wisdom", "model", "default" or "only"

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


# ----------------------------------------------------------------------------- the routes
@dataclass(frozen=True)
class Route:
    """A way to run a kind: where it runs, how it is planned, priced and built."""

    name: str
    kind: str
    devices: tuple[str, ...] | None        # device types it runs on (None: any)
    search: Callable[["Plan", int, torch.dtype, float], Any]   # -> steps, or None
    predict: Callable[["Plan", Any, int, torch.dtype], float]
    make: Callable[["Plan", Any], Callable]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _schedule_options(plan: "Plan") -> dict:
    """Narrower searches for longer circuits, so one stays well inside ``PLAN_BUDGET`` (for
    the paper circuit a beam of 8 finds the same schedules as the default 48)."""
    n = plan.num_gates
    if n <= 8:
        return dict(beam=8)
    return dict(beam=4, reorder=False) if n <= 16 else dict(beam=2, reorder=False)


def _einsum_search(plan, bucket, dtype, deadline):
    return plan_path(plan.forward_network, bucket)


def _schedule_search(plan, bucket, dtype, deadline, dense=False):
    from .schedule import build_schedule
    tokens = plan.in_features if dense else bucket
    return build_schedule(plan.circuit, tokens, dense=dense, dtype=dtype, deadline=deadline,
                          **_schedule_options(plan))


def _schedule_make(plan, sched):
    from .schedule_exec import Workspace, run_schedule
    ws = Workspace()
    return lambda x2d, gates: run_schedule(sched, x2d, gates, ws)


def _dense_schedule_make(plan, sched):
    from .dense import dense_matrix
    from .schedule_exec import Workspace
    ws = Workspace()
    return lambda gates: dense_matrix(sched, gates, ws)


def _lightcone_search(plan, bucket, dtype, deadline):
    from .lightcone import plan_lightcone
    return plan_lightcone(plan.circuit)


def _lightcone_make(plan, lc):
    from .lightcone import run_lightcone
    from .schedule_exec import Workspace
    ws = Workspace()
    return lambda gates: run_lightcone(lc, gates, ws)


ROUTES: tuple[Route, ...] = (
    Route("einsum", "forward", None, _einsum_search,
          lambda plan, steps, bucket, dtype: cm.einsum_reference(
              bucket, plan.in_dims, plan.circuit.gates, _itemsize(dtype)),
          lambda plan, path: einsum_executor(path, plan.in_dims, plan.out_features)),
    Route("schedule", "forward", ("cpu", "cuda"), _schedule_search,
          lambda plan, sched, bucket, dtype: sched.cost, _schedule_make),
    Route("einsum", "dense", None, lambda plan, bucket, dtype, deadline: plan.dense_path(),
          lambda plan, path, bucket, dtype: None,  # priced in choose(), see there
          lambda plan, path: _einsum_dense_make(plan, path)),
    Route("schedule", "dense", ("cpu", "cuda"),
          lambda plan, bucket, dtype, deadline: _schedule_search(plan, bucket, dtype, deadline, True),
          lambda plan, sched, bucket, dtype: sched.cost, _dense_schedule_make),
    Route("lightcone", "dense", ("cpu", "cuda"), _lightcone_search,
          lambda plan, lc, bucket, dtype: lc.cost, _lightcone_make),
    # fused Triton kernels (triton_route.py), measured on CUDA; no cost model prices them
    Route("triton", "forward", ("cuda",) if triton_route.available() else (),
          triton_route.search, lambda *args: None, triton_route.build),
    Route("triton", "dense", ("cuda",) if triton_route.available() else (),
          lambda plan, bucket, dtype, deadline: triton_route.dense_search(plan, dtype, deadline),
          lambda *args: None, triton_route.dense_build),
)


def routes_for(kind: str, device_type: str) -> list[Route]:
    """The routes of ``kind`` that run on ``device_type``, ``einsum`` first."""
    if kind not in KINDS:
        raise QCError(f"unknown kind {kind!r}", expected=" or ".join(KINDS))
    return [r for r in ROUTES if r.kind == kind and (r.devices is None or device_type in r.devices)]


# ----------------------------------------------------------------------------- the choice
@functools.cache
def tuning() -> bool:
    """Whether choices are measured (``QCIRCUIT_TUNE`` is not ``0``); read once."""
    return os.environ.get("QCIRCUIT_TUNE", "1") != "0"


def _search(plan: "Plan", kind: str, bucket: int | None, device_type: str,
            dtype: torch.dtype) -> tuple[dict[str, Any], list[Candidate], list[str]]:
    """Plan every route within ``PLAN_BUDGET``: (steps by route, candidates with their
    predictions and notes, the routes worth timing — ``einsum`` always; on the CPU only
    those the cost model keeps)."""
    routes = routes_for(kind, device_type)
    if plan.num_gates > MAX_TUNED_GATES:
        wisdom.warn_once(f"routes:big {plan.signature}", f"the circuit has {plan.num_gates} gates; "
                         f"above {MAX_TUNED_GATES} only opt_einsum's path is planned (greedy "
                         "above 12 operands)", 4)
        routes = routes[:1]
    deadline = time.monotonic() + PLAN_BUDGET
    found: dict[str, Any] = {}
    candidates: list[Candidate] = []
    for r in routes:
        note = ""
        try:
            steps = r.search(plan, bucket, dtype, deadline) if (
                r.name == "einsum" or time.monotonic() < deadline) else None
            note = "" if steps is not None else "no plan within the search budget"
        except QCError as exc:
            steps, note = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - schedule.OutOfTime, or a route that cannot plan this
            steps, note = None, f"not planned ({type(exc).__name__})"
        predicted = r.predict(plan, steps, bucket, dtype) if steps is not None else None
        if steps is not None:
            found[r.name] = steps
        candidates.append(Candidate(r.name, predicted, None, note))
    if kind == "dense" and "schedule" in found and "einsum" in found:
        # the cost model has no price for the gates-only expression: it stands at the dense
        # schedule's, so the model alone picks the light cone only when it is predicted
        # faster than that (measurement decides otherwise)
        candidates[0] = Candidate("einsum", found["schedule"].cost, None, "priced as the schedule")
    priced = [c.predicted for c in candidates if c.predicted is not None and c.route in found]
    best = min(priced) if priced else None
    alive = [c.route for c in candidates if c.route in found and (
        c.route == "einsum" or best is None or c.predicted is None or device_type != "cpu"
        or c.predicted <= PRUNE * best)]
    for i, c in enumerate(candidates):
        if c.route in found and c.route not in alive:
            candidates[i] = Candidate(c.route, c.predicted, None, "pruned by the cost model")
    return found, candidates, alive


def choose(plan: "Plan", kind: str, bucket: int | None, device_type: str, dtype: torch.dtype,
           *, tune: bool | None = None, measure: Measure | None = None) -> RoutePlan:
    """Plan every route of ``kind`` for this bucket, device type and dtype, and pick one
    (see the module docstring). ``tune`` overrides ``QCIRCUIT_TUNE``; ``measure`` replaces
    the timer (``{route: thunk} -> {route: seconds}``; tests)."""
    tune = tuning() if tune is None else tune
    if device_type == "cpu":
        calibrate.ensure(tune)  # the cost model's constants, measured once per machine
    switches = _switches()  # builds the CPU kernels first (once per machine): not search time
    found, candidates, alive = _search(plan, kind, bucket, device_type, dtype)

    def result(route: str, how: str, times: dict[str, float] | None = None) -> RoutePlan:
        cands = tuple(Candidate(c.route, c.predicted, (times or {}).get(c.route), c.note)
                      for c in candidates)
        return RoutePlan(plan.signature, kind, bucket, device_type, dtype, route, found[route],
                         cands, how)

    if len(alive) == 1:
        return result(alive[0], "only")
    numel = max(plan.in_features, plan.out_features) * (bucket if kind == "forward" else plan.in_features)
    if not tune or numel > MEASURE_MAX_NUMEL:
        if device_type != "cpu":   # the cost model knows the CPU only
            return result("einsum", "default")
        return result(min(alive, key=lambda n: _predicted(candidates, n)), "model")
    k = wisdom.key(plan.signature, kind, bucket, device_type, dtype, switches)
    known = wisdom.lookup(k)
    if known is not None and known["route"] in alive:
        return result(known["route"], "wisdom", known.get("times"))
    with wisdom.measuring() as locked:
        known = wisdom.lookup(k) if locked else None  # measured by another process meanwhile
        if known is not None and known["route"] in alive:
            return result(known["route"], "wisdom", known.get("times"))
        with torch.inference_mode(False):  # a first forward under inference_mode measures too
            thunks = {n: measure_mod.thunk(plan, kind, bucket, device_type, dtype,
                                           build(plan, result(n, "measuring"))) for n in alive}
            times = (measure or measure_mod.fastest_times)(thunks)
        winner = min(alive, key=lambda n: times.get(n, float("inf")))
        wisdom.record(k, {"route": winner, "times": {n: times[n] for n in alive if n in times}},
                      locked)
    return result(winner, "measured", times)


def forced(plan: "Plan", kind: str, route: str, bucket: int | None, device_type: str,
           dtype: torch.dtype) -> RoutePlan:
    """One named route's plan, no deadline, chosen by nobody (to compare routes)."""
    r = next((r for r in routes_for(kind, device_type) if r.name == route), None)
    if r is None:
        raise QCError(f"no {kind} route {route!r} on {device_type}",
                      expected=" or ".join(r.name for r in routes_for(kind, device_type)))
    steps = r.search(plan, bucket, dtype, float("inf"))
    if steps is None:
        raise QCError(f"route {route!r} has no plan for this circuit")
    predicted = r.predict(plan, steps, bucket, dtype)
    return RoutePlan(plan.signature, kind, bucket, device_type, dtype, route, steps,
                     (Candidate(route, predicted),), "forced")


def _predicted(candidates: Sequence[Candidate], name: str) -> float:
    p = next(c.predicted for c in candidates if c.route == name)
    return float("inf") if p is None else p


def _switches() -> str:
    from . import fused, kernels
    return f"kernels={int(kernels.enabled())} fused={int(fused.available())}"


# ----------------------------------------------------------------------------- executors
_chosen: dict[tuple, RoutePlan] = {}
_built: dict[tuple, Callable] = {}


def build(plan: "Plan", route_plan: RoutePlan) -> Callable:
    """A fresh executor for ``route_plan`` (``run(x2d, gates)`` or ``run(gates)``)."""
    route = next(r for r in ROUTES if r.kind == route_plan.kind and r.name == route_plan.route)
    return route.make(plan, route_plan.steps)


def _chosen_plan(plan: "Plan", kind: str, bucket: int | None, device_type: str,
                 dtype: torch.dtype) -> RoutePlan:
    k = (plan.signature, kind, bucket, device_type, dtype)
    rp = _chosen.get(k)
    if rp is None:
        rp = _chosen[k] = choose(plan, kind, bucket, device_type, dtype)
    return rp


def forward_plan(plan: "Plan", bucket: int, device_type: str, dtype: torch.dtype) -> RoutePlan:
    """The (cached) choice for a forward bucket."""
    return _chosen_plan(plan, "forward", bucket, device_type, dtype)


def dense_plan(plan: "Plan", device_type: str, dtype: torch.dtype) -> RoutePlan:
    """The (cached) choice for the dense matrix."""
    return _chosen_plan(plan, "dense", None, device_type, dtype)


@torch.compiler.disable
def _executor(plan: "Plan", kind: str, bucket: int | None, device_type: str,
              dtype: torch.dtype) -> Callable:
    k = (plan.signature, kind, bucket, device_type, dtype)
    run = _built.get(k)
    if run is None:
        run = _built[k] = build(plan, _chosen_plan(plan, kind, bucket, device_type, dtype))
    return run


def _einsum_dense_make(plan: "Plan", path) -> Callable:
    return einsum_dense_executor(plan.dense_network, path, plan.out_features, plan.in_features)


@torch.compiler.disable
def _dense_einsum(plan: "Plan") -> Callable:
    run = _built[(plan.signature, "dense einsum")] = _einsum_dense_make(plan, plan.dense_path())
    return run


def _cached_executor(plan: "Plan", kind: str, bucket: int | None, device_type: str,
                     dtype: torch.dtype) -> Callable:
    """The built executor: a dict lookup once built (the hot path), else :func:`_executor`."""
    run = _built.get((plan.signature, kind, bucket, device_type, dtype))
    return run if run is not None else _executor(plan, kind, bucket, device_type, dtype)


def forward_executor(plan: "Plan", tokens: int, device_type: str, dtype: torch.dtype) -> Callable:
    """``run(x2d, gates)`` for ``tokens`` rows (chosen for its bucket at the first call)."""
    return _cached_executor(plan, "forward", token_bucket(tokens), device_type, dtype)


_traced: dict[str, object] = {}


def trace_path(plan: "Plan"):
    """The ``einsum`` path planned at ``TRACE_BUCKET`` tokens: what traced code runs (one
    per circuit: every module of that circuit shares it)."""
    path = _traced.get(plan.signature)
    if path is None:
        path = _traced[plan.signature] = plan_path(plan.forward_network, TRACE_BUCKET)
    return path


_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def plain(*tensors: Tensor) -> bool:
    """Whether these are ordinary tensors: not a subclass such as ``DTensor``, not wrapped
    by a ``torch.func`` transform (``vmap``, ``grad``)."""
    return all(type(t) in (Tensor, torch.nn.Parameter) and not _wrapped(t) for t in tensors)


def gathered(gates: Sequence[Tensor]) -> list[Tensor]:
    """The gates with every ``DTensor`` gathered into a plain tensor (differentiably)."""
    return [g.full_tensor() if hasattr(g, "full_tensor") and hasattr(g, "placements") else g
            for g in gates]


def dense(plan: "Plan", gates: Sequence[Tensor]) -> Tensor:
    """``T`` (out_features, in_features) from ``gates``: the chosen dense route, or ``einsum``
    while autograd records, under tracing, or for tensors that are not plain."""
    if len(gates) != plan.num_gates:
        raise QCError(f"the circuit has {plan.num_gates} gates, got {len(gates)} tensors")
    if plan.out_features * plan.in_features > MAX_DENSE_NUMEL:
        raise QCError(f"the dense matrix would have {plan.out_features * plan.in_features:,} "
                      f"entries; at most {MAX_DENSE_NUMEL:,} (MAX_DENSE_NUMEL)")
    gates = gathered(gates)
    if not gates:
        raise QCError("a circuit without gates has no gate to take dtype and device from: "
                      "its matrix is the identity")
    like = gates[0]
    recording = torch.is_grad_enabled() and any(g.requires_grad for g in gates)
    if recording or torch.compiler.is_compiling() or not plain(*gates):
        run = _built.get((plan.signature, "dense einsum"))
        return (run if run is not None else _dense_einsum(plan))(gates)
    return _cached_executor(plan, "dense", None, like.device.type, like.dtype)(gates)
