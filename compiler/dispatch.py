"""Dispatch: which executor a call runs, from its inputs and a :class:`~tuning.Tuning`.

Plain tensors on a device run the executor decided for their key (``tuning.py``: looked up,
or decided before anything is recorded). Inputs a decided route cannot take run the
reference one-expression path instead: traced code (``torch.compile``: a path planned once at
``TRACE_BUCKET`` tokens, valid for every token count, so tracing plans nothing), tensors that
are not plain (a ``DTensor`` gate is gathered with ``full_tensor()`` first; ``torch.func``
wrappers), and a dense matrix while autograd records through it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from qcircuit.errors import QCError

from .caps import DENSE_MAX_NUMEL
from .lowered import Lowered
from .networks import ContractionPath, contraction_path, run_steps, token_bucket
from .routes import REFERENCE
from .tuning import Tuning

TRACE_BUCKET = 512   # the traced path's planning size (any token count runs on it)

_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def plain(*tensors: Tensor) -> bool:
    """Whether these are ordinary tensors: not a subclass such as ``DTensor``, not wrapped
    by a ``torch.func`` transform (``vmap``, ``grad``)."""
    return all(type(t) in (Tensor, torch.nn.Parameter) and not _wrapped(t) for t in tensors)


def gathered(gates: Sequence[Tensor]) -> list[Tensor]:
    """The gates with every ``DTensor`` gathered into a plain tensor (differentiably)."""
    return [g.full_tensor() if hasattr(g, "full_tensor") and hasattr(g, "placements") else g
            for g in gates]


def trace_path(lowered: Lowered) -> ContractionPath:
    """The reference path planned at ``TRACE_BUCKET`` tokens: what traced code runs."""
    return contraction_path(lowered.forward_network, TRACE_BUCKET)


def uncast(lowered: Lowered, x2d: Tensor, gate_dtype: torch.dtype, tuning: Tuning,
           route: str | None = None):
    """The executor that takes ``x2d`` against ``gate_dtype`` gates without casting it
    (16-bit activations, float32 gates, a route that takes them: ``Route.activation_dtypes``),
    or None: then the activations are cast to the gates' dtype."""
    if x2d.dtype == gate_dtype or gate_dtype != torch.float32 or route is not None \
            or torch.compiler.is_compiling() or not plain(x2d) or x2d.shape[0] == 0:
        return None
    return tuning.uncast_executor(lowered, token_bucket(x2d.shape[0]), x2d.device, x2d.dtype)


def forward(lowered: Lowered, x2d: Tensor, gates: Sequence[Tensor], tuning: Tuning,
            traced: ContractionPath, route: str | None = None) -> Tensor:
    """``y2d = T·x2d`` for ``x2d`` (tokens ≥ 1, in_features): in the gates' dtype, or in
    ``x2d``'s where a route takes it uncast (:func:`uncast`); ``traced`` is
    :func:`trace_path` (kept by the caller); ``route`` names the route to run."""
    n = x2d.shape[0]
    like = gates[0].dtype if gates else x2d.dtype
    if x2d.dtype != like:
        run = uncast(lowered, x2d, like, tuning, route)
        if run is not None and plain(*gates):
            return run(x2d, gates)
        x2d = x2d.to(like)
    if torch.compiler.is_compiling() or not plain(x2d, *gates):
        y = run_steps(traced.steps, [x2d.reshape(n, *lowered.in_dims), *gathered(gates)])
        return y.reshape(n, lowered.out_features)
    run = tuning.executor(lowered, "forward", token_bucket(n), x2d.device, x2d.dtype, route)
    return run(x2d, gates)


def dense(lowered: Lowered, gates: Sequence[Tensor], tuning: Tuning) -> Tensor:
    """``T`` (out_features, in_features) from ``gates``: the decided dense route, or the
    reference while autograd records, under tracing, or for tensors that are not plain."""
    if len(gates) != lowered.num_gates:
        raise QCError(f"the circuit has {lowered.num_gates} gates, got {len(gates)} tensors")
    if lowered.out_features * lowered.in_features > DENSE_MAX_NUMEL:
        raise QCError(f"the dense matrix would have {lowered.out_features * lowered.in_features:,} "
                      f"entries; at most {DENSE_MAX_NUMEL:,} (DENSE_MAX_NUMEL)")
    gates = gathered(gates)
    if not gates:
        raise QCError("a circuit without gates has no gate to take dtype and device from: "
                      "its matrix is the identity")
    like = gates[0]
    recording = torch.is_grad_enabled() and any(g.requires_grad for g in gates)
    route = REFERENCE if recording or torch.compiler.is_compiling() or not plain(*gates) else None
    return _dense_executor(lowered, tuning, like.device, like.dtype, route)(gates)


@torch.compiler.disable
def _dense_executor(lowered: Lowered, tuning: Tuning, device: torch.device, dtype: torch.dtype,
                    route: str | None):
    """Looked up outside tracing; the executor it returns is traceable for the reference."""
    return tuning.executor(lowered, "dense", None, device, dtype, route)
