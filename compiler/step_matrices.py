"""A schedule step's matrix: its gates on the step's block, as one (K', K) matrix.

A step's qudits (its block) sit adjacent in the activation's layout, so the step is one GEMM
with the product of its gates, lifted to the block and laid out in the block's physical
order. Everything here is differentiable (ordinary torch ops): the gates' gradients flow
through the step matrices.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from qcircuit.errors import QCError

from .schedule import Schedule, Step


def gate_matrix(gate: Tensor, qudits: Sequence[int], rows: Sequence[int],
                cols: Sequence[int] | None = None) -> Tensor:
    """The gate as a (K', K) matrix, its rows in qudit order ``rows`` and its columns in
    ``cols`` (default: the same order)."""
    n = len(qudits)
    cols = rows if cols is None else cols
    g = gate.permute([qudits.index(q) for q in rows] + [n + qudits.index(q) for q in cols])
    return g.reshape(math.prod(g.shape[:n]), math.prod(g.shape[n:]))


def _lift(gate: Tensor, qudits: tuple[int, ...], block: tuple[int, ...],
          block_in: tuple[int, ...]) -> Tensor:
    """``gate ⊗ I`` on ``block`` as a tensor (block dims after the gate..., ``block_in``...):
    one broadcast multiply of the gate and an identity on the block's other qudits."""
    n = len(block)
    at = sorted(block.index(q) for q in qudits)
    order = [qudits.index(block[p]) for p in at]
    g = gate.permute(order + [len(qudits) + j for j in order])
    outs = dict(zip(at, g.shape[:len(at)]))
    g = g.reshape([outs.get(p, 1) for p in range(n)] + [block_in[p] if p in outs else 1 for p in range(n)])
    others = [p for p in range(n) if p not in outs]
    eye = torch.eye(math.prod(block_in[p] for p in others), dtype=gate.dtype, device=gate.device)
    eye = eye.reshape([1 if p in outs else block_in[p] for p in range(n)] * 2)
    return g * eye


def fused_matrix(step: Step, gates: Sequence[Tensor], gate_qudits) -> Tensor:
    """The product of the step's gates on its block, as a (K', K) matrix (autograd-able):
    the first gate lifted to the block, the others contracted into it one by one."""
    first, *later = step.gates
    z = _lift(gates[first], gate_qudits[first], step.block, step.block_in)
    k = math.prod(step.block_in)
    z = z.reshape(*z.shape[:len(step.block)], k)
    for g in later:
        pos = [step.block.index(q) for q in gate_qudits[g]]
        n = len(pos)
        z = torch.tensordot(gates[g], z, dims=(list(range(n, 2 * n)), pos))
        z = torch.movedim(z, list(range(n)), pos)
    return z.reshape(math.prod(step.block_out), k)


def step_matrices(schedule: Schedule, gates: Sequence[Tensor]) -> list[Tensor]:
    """One (K', K) matrix per gate step, rows and columns in the block's physical order."""
    if len(gates) != len(schedule.gate_qudits):
        raise QCError(f"the circuit has {len(schedule.gate_qudits)} gates, got {len(gates)} tensors")
    mats = []
    for st in schedule.steps:
        if st.kind == "permute":
            continue
        if len(st.gates) == 1:
            g = st.gates[0]
            mats.append(gate_matrix(gates[g], schedule.gate_qudits[g], st.block))
        else:
            mats.append(fused_matrix(st, gates, schedule.gate_qudits))
    return mats


def transposed_gates(gates: Sequence[Tensor]) -> list[Tensor]:
    """The gate tensors of the transposed circuit (:func:`schedule.transpose_circuit`):
    reversed, each with its out and in axes swapped (views)."""
    return [g.permute(*range(g.dim() // 2, g.dim()), *range(g.dim() // 2)) for g in reversed(gates)]
