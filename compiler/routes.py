"""Routes: the ways a circuit can run, as entries of one registry.

A *route* computes either the forward ``y = T·x`` (kind ``"forward"``, planned per token
bucket) or the dense matrix ``T`` (kind ``"dense"``). Each is a :class:`Route` value: a name,
where it runs, how it searches for its steps, how the cost model prices them and how an
executor is built from them — plain functions, found by name in one registry (as
opt_einsum's path optimisers are). A new route, such as a GPU kernel, is one
:func:`register` call; nothing else names routes. The built-in ones:

``einsum``     the one-expression opt_einsum path, step by step: any device, any dtype,
               traceable, differentiable (the reference's method). Every kind has it: it is
               the ``REFERENCE`` route, what runs where nothing else may (tracing, autograd
               through a dense matrix, tensors that are not plain, nothing timed off the CPU).
``schedule``   a cost-model GEMM schedule (``schedule.py``, run by ``schedule_exec.py``; the
               dense form by ``dense.py``): a custom autograd function over plain tensors
``lightcone``  the dense matrix through the identity's light cone (``lightcone.py``),
               forward only
``triton``     fused Triton kernels on CUDA (``triton_route.py``), the only route that takes
               16-bit activations against float32 gates uncast (``activation_dtypes``)

Searching is pure given its arguments (the circuit, the bucket, the dtype, a deadline and the
cost model's :class:`~costmodel.Machine`); which route wins is decided above, in
:mod:`choice`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from qcircuit.errors import QCError, with_article

from . import costmodel as cm
from . import triton_route
from .dense import dense_matrix
from .lightcone import run_lightcone, search_lightcone
from .lowered import Lowered
from .networks import contraction_path, einsum_dense_executor, einsum_executor
from .schedule import build_schedule
from .schedule_exec import run_schedule
from .workspace import Workspace

KINDS = ("forward", "dense")
REFERENCE = "einsum"

Search = Callable[[Lowered, "int | None", torch.dtype, float, cm.Machine], Any]
Predict = Callable[[Lowered, Any, "int | None", torch.dtype, cm.Machine], "float | None"]
Build = Callable[[Lowered, Any], Callable]


@dataclass(frozen=True)
class Route:
    """A way to run a kind. ``search(lowered, bucket, dtype, deadline, machine)`` returns the
    steps (plain data), None when it found none in time, or raises ``QCError`` saying why the
    circuit cannot run this way; ``predict(lowered, steps, bucket, dtype, machine)`` prices
    them in seconds on the CPU (None: not priced, only measured); ``build(lowered, steps)``
    makes the executor: ``run(x2d, gates)`` for ``forward``, ``run(gates)`` for ``dense``.
    ``runs_on(device_type)``: where it can run when named; ``offered_on(device_type)``: where
    the automatic choice considers it (default: wherever it runs); ``activation_dtypes``:
    activation dtypes it takes against float32 gates uncast, its output in theirs."""

    name: str
    kind: str
    runs_on: Callable[[str], bool]
    search: Search
    predict: Predict
    build: Build
    offered_on: Callable[[str], bool] | None = None
    activation_dtypes: tuple[torch.dtype, ...] = ()

    def offered(self, device_type: str) -> bool:
        return (self.offered_on or self.runs_on)(device_type)


_registry: dict[tuple[str, str], Route] = {}   # (kind, name) -> route, in registration order


def register(route: Route, *, replace: bool = False) -> Route:
    """Add ``route`` to the registry (``replace``: over one of the same kind and name)."""
    if route.kind not in KINDS:
        raise QCError(f"unknown kind {route.kind!r}", expected=" or ".join(KINDS))
    if (route.kind, route.name) in _registry and not replace:
        raise QCError(f"{with_article(route.kind)} route named {route.name!r} is already "
                      "registered")
    _registry[route.kind, route.name] = route
    return route


def routes_for(kind: str, device_type: str, *, offered: bool = False) -> list[Route]:
    """The routes of ``kind`` that run on ``device_type`` (``offered``: that the automatic
    choice considers there), the reference first."""
    if kind not in KINDS:
        raise QCError(f"unknown kind {kind!r}", expected=" or ".join(KINDS))
    return [r for (k, _), r in _registry.items() if k == kind and (
        r.offered(device_type) if offered else r.runs_on(device_type))]


def uncast_routes(device_type: str, dtype: torch.dtype) -> list[Route]:
    """The forward routes offered on ``device_type`` that take ``dtype`` activations against
    float32 gates without a cast."""
    return [r for (k, _), r in _registry.items()
            if k == "forward" and dtype in r.activation_dtypes and r.offered(device_type)]


def route_named(kind: str, name: str, device_type: str | None = None) -> Route:
    """The registered route ``name`` of ``kind`` (that runs on ``device_type``, if given), or a
    ``QCError`` naming the ones there are."""
    found = _registry.get((kind, name))
    if found is None or (device_type is not None and not found.runs_on(device_type)):
        there = [r.name for r in routes_for(kind, device_type or "cpu")] if device_type else \
            [n for k, n in _registry if k == kind]
        where = f" on {device_type}" if device_type else ""
        raise QCError(f"no {kind} route {name!r}{where}", expected=" or ".join(there))
    return found


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- built-ins
def _anywhere(device_type: str) -> bool:
    return True


def _cpu_or_cuda(device_type: str) -> bool:
    return device_type in ("cpu", "cuda")


def _schedule_options(lowered: Lowered) -> dict:
    """Narrower searches for longer circuits, so one stays well inside the planning budget
    (for the paper circuit a beam of 8 finds the same schedules as the default 48)."""
    n = lowered.num_gates
    if n <= 8:
        return dict(beam=8)
    return dict(beam=4, reorder=False) if n <= 16 else dict(beam=2, reorder=False)


def _schedule_search(lowered, bucket, dtype, deadline, machine, dense=False):
    tokens = lowered.in_features if dense else bucket
    return build_schedule(lowered.circuit, tokens, dense=dense, dtype=dtype, deadline=deadline,
                          machine=machine, **_schedule_options(lowered))


def _schedule_forward(lowered, sched):
    ws = Workspace()
    return lambda x2d, gates: run_schedule(sched, x2d, gates, ws)


def _schedule_dense(lowered, sched):
    ws = Workspace()
    return lambda gates: dense_matrix(sched, gates, ws)


def _lightcone_search(lowered, bucket, dtype, deadline, machine):
    found = search_lightcone(lowered.circuit, machine)
    if found is None:
        raise QCError("no light cone: too many qudits, or no prefix small enough")
    return found


def _lightcone_build(lowered, lc):
    ws = Workspace()
    return lambda gates: run_lightcone(lc, gates, ws)


register(Route(
    REFERENCE, "forward", _anywhere,
    search=lambda lowered, bucket, dtype, deadline, machine: contraction_path(
        lowered.forward_network, bucket),
    predict=lambda lowered, path, bucket, dtype, machine: cm.einsum_reference(
        machine, bucket, lowered.in_dims, lowered.circuit.gates, itemsize(dtype)),
    build=lambda lowered, path: einsum_executor(path, lowered.in_dims, lowered.out_features)))
register(Route(
    REFERENCE, "dense", _anywhere,
    search=lambda lowered, bucket, dtype, deadline, machine: lowered.dense_path(),
    # not priced: the gates-only expression's intermediates are beyond the cost model, and
    # a price that is too low would prune the routes that beat it (it is always timed)
    predict=lambda lowered, path, bucket, dtype, machine: None,
    build=lambda lowered, path: einsum_dense_executor(
        lowered.dense_network, path, lowered.out_features, lowered.in_features)))
register(Route(
    "schedule", "forward", _cpu_or_cuda, _schedule_search,
    predict=lambda lowered, sched, bucket, dtype, machine: sched.cost, build=_schedule_forward))
register(Route(
    "schedule", "dense", _cpu_or_cuda,
    search=lambda lowered, bucket, dtype, deadline, machine: _schedule_search(
        lowered, bucket, dtype, deadline, machine, dense=True),
    predict=lambda lowered, sched, bucket, dtype, machine: sched.cost, build=_schedule_dense))
register(Route(
    "lightcone", "dense", _cpu_or_cuda, _lightcone_search,
    predict=lambda lowered, lc, bucket, dtype, machine: lc.cost, build=_lightcone_build))
# looked up at each call, so a test can stand the interpreter in for a GPU
register(Route(
    "triton", "forward", lambda device_type: triton_route.runs_on(device_type),
    search=lambda lowered, bucket, dtype, deadline, machine: triton_route.search(
        lowered, bucket, dtype, deadline),
    predict=lambda *args: None, build=triton_route.build,
    offered_on=lambda device_type: triton_route.offered_on(device_type),
    activation_dtypes=triton_route.HALF))
register(Route(
    "triton", "dense", lambda device_type: triton_route.runs_on(device_type),
    search=lambda lowered, bucket, dtype, deadline, machine: triton_route.dense_search(
        lowered, dtype, deadline),
    predict=lambda *args: None, build=triton_route.dense_build,
    offered_on=lambda device_type: triton_route.offered_on(device_type)))
