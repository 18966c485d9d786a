"""The dense operator ``T`` from a dense schedule (``build_schedule(dense=True)``): the circuit
applied to the identity, its first step written out directly; differentiable. One of the
dense routes :mod:`routes` measures against the light cone (``lightcone.py``) and the one
expression."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from qcircuit.errors import QCError
from qcircuit.ir import Circuit

from .schedule import TOKEN, Schedule, Step, cached_schedule
from .schedule_exec import bound_steps, run_bound
from .step_matrices import step_matrices, transposed_gates
from .workspace import Workspace


def _materialize(step: Step, m: Tensor, in_dims: tuple[int, ...], ws: Workspace) -> Tensor:
    """The first step applied to the identity, written straight into its output layout:
    ``E[i; q] = M[q_block; i_block] · δ(i_rest, q_rest)``, one broadcast multiply of the block
    matrix and an identity on the other qudits (every element written once, contiguously)."""
    n_q = len(in_dims)
    rest = [q for q in range(n_q) if q not in step.block]
    labels, shape = [], []
    for a in step.layout_out:
        if a == TOKEN:
            labels += [("i", q) for q in range(n_q)]
            shape += list(in_dims)
        else:
            labels.append(("o", a))
            shape.append(in_dims[a] if a not in step.block else step.block_out[step.block.index(a)])

    def place(t: Tensor, own: list) -> Tensor:  # t's axes (labels ``own``) into ``labels`` order
        t = t.permute([own.index(x) for x in labels if x in own])
        return t.reshape([d if x in own else 1 for x, d in zip(labels, shape)])
    mt = place(m.reshape(*step.block_out, *step.block_in),
               [("o", q) for q in step.block] + [("i", q) for q in step.block])
    k_rest = math.prod(in_dims[q] for q in rest)
    eye = torch.eye(k_rest, dtype=m.dtype, device=m.device).reshape(
        [in_dims[q] for q in rest] * 2)
    eye = place(eye, [("o", q) for q in rest] + [("i", q) for q in rest])
    if torch.is_grad_enabled() and m.requires_grad:
        return torch.mul(mt, eye).reshape(-1)
    e = ws.take(math.prod(shape), m)
    torch.mul(mt, eye, out=e.view(shape))
    return e


def dense_matrix(circuit: Circuit | Schedule, gates: Sequence[Tensor],
                 workspace: Workspace | None = None) -> Tensor:
    """The dense operator ``T`` (out_features, in_features), differentiable: the circuit applied
    to the identity in the cheapest layout, its first step written out directly."""
    sched = circuit if isinstance(circuit, Schedule) else cached_schedule(circuit, circuit.in_features, True)
    if not sched.dense:
        raise QCError("dense_matrix needs a schedule planned with dense=True")
    if sched.transposed:  # the schedule applies Tᵀ: gates reversed and transposed
        gates = transposed_gates(gates)
    tokens = sched.in_features  # the identity the schedule is applied to
    token_first = sched.steps[-1].layout_out[0] == TOKEN if sched.steps else True
    shape = (tokens, sched.out_features) if token_first else (sched.out_features, tokens)
    flip = token_first != sched.transposed  # the result holds Tᵀ: return its transpose (a view)
    ref = gates[0] if len(gates) else None
    if not sched.steps:
        return torch.eye(tokens, dtype=ref.dtype if ref is not None else torch.float32)
    ws = workspace if workspace is not None else Workspace()
    mats = step_matrices(sched, gates)
    rest = sched.steps[1:]
    e = _materialize(sched.steps[0], mats[0], sched.in_dims, ws if rest else Workspace())
    if not rest:
        return e.view(shape).t() if flip else e.view(shape)
    mats, bound = mats[1:], bound_steps(sched, tokens)[1:]
    y = run_bound(bound, e, mats, ws)
    if y.grad_fn is None:  # no autograd node holds ``e``: its buffer goes back to the pool
        ws.give(e)
    return y.view(shape).t() if flip else y.view(shape)
