"""The dense matrix ``T`` by the light cone of the identity.

``T = G_K⋯G_1`` applied to the identity. The identity is sparse: a dependency-closed prefix of
gates acting only on a qudit subset ``S`` (commuting gates reordered) multiplies out to a small
dense matrix ``A`` on ``S``, so after the prefix the operator is ``A ⊗ I_rest``, written out once
(or, when the next gate covers every rest qudit, that gate applied to ``A ⊗ I`` is written
directly: one batched GEMM whose inner dimension is only the gate's part inside ``S``).
Every remaining gate acts on the row (output) axes only, so it is a loop of GEMMs over the rows
before its block, each writing straight into the row order the next gate wants (a strided
``out=`` view: the rows before the block may move around it for free). The row orders are
chosen by dynamic programming so the last gate leaves the natural order and no permute is
ever paid. Both sides are tried (``T`` and ``Tᵀ`` from the transposed circuit); the cost model
picks. Forward only: with autograd on, callers use a differentiable route.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from qcircuit.ir import Circuit

from . import costmodel as cm
from .schedule import TOKEN, Step, dims_after, transpose_circuit
from .caps import LIGHTCONE_MAX_PREFIX, LIGHTCONE_MAX_QUDITS
from .step_matrices import fused_matrix, gate_matrix, transposed_gates
from .workspace import Workspace

Rows = tuple[int, ...]


@dataclass(frozen=True)
class GateStep:
    """One remaining gate: rows ``rows_in`` (block contiguous at ``start``) -> ``rows_out``."""

    gate: int
    rows_in: Rows
    rows_out: Rows
    start: int
    block_in: Rows      # the gate's qudits in ``rows_in`` order
    block_out: Rows     # the gate's qudits in ``rows_out`` order


@dataclass(frozen=True)
class Lightcone:
    """A light-cone plan for one orientation of the circuit; ``cost`` in predicted seconds."""

    circuit: Circuit            # the oriented circuit (transposed when ``transposed``)
    transposed: bool
    prefix: tuple[int, ...]     # gate indices multiplied into A, in order
    support: Rows               # S, in the row order of the first layout
    rows0: Rows                 # row order the first write (A ⊗ I, or the fold) produces
    steps: tuple[GateStep, ...]
    cost: float
    fold: int | None = None     # the first remaining gate, written straight from A (see _fold)


def _prefix(circuit: Circuit, s: set[int]) -> list[int]:
    """The longest dependency-closed prefix of gates acting only inside ``s``."""
    blocked: set[int] = set()
    out = []
    for i, g in enumerate(circuit.gates):
        q = set(g.qudits)
        if q <= s and not q & blocked:
            out.append(i)
        else:
            blocked |= q
    return out


def _moves(rows: Rows, block: set[int]) -> list[tuple[int, Rows, Rows, Rows]]:
    """(start, block order in, block order out, rows out) for every free move of a gate."""
    pos = [rows.index(q) for q in block]
    a, b = min(pos), max(pos) + 1
    if b - a != len(block):
        return []
    pre, inner, suf = rows[:a], rows[a:b], rows[b:]
    out = []
    for order in itertools.permutations(inner):
        for at in range(len(pre) + 1):
            out.append((a, inner, order, pre[:at] + order + pre[at:] + suf))
    return out


STRIDED_OUT = 1.1   # a loop of GEMMs writing strided rows vs one batched GEMM


def _row_gemm_cost(mc: cm.Machine, p: int, k2: int, s: int, k: int, in_place: bool,
                   isz: int) -> float:
    """``M @ X[p]`` for every row prefix ``p``: one batched GEMM when the output keeps the row
    order (or there is one prefix), else a loop of GEMMs into strided views."""
    base = p * cm.gemm(mc, k2, s, k, isz, transposed_out=True)
    return base * (1.0 if in_place or p == 1 else STRIDED_OUT)


def _search(mc: cm.Machine, circuit: Circuit, gates: Sequence[int], dims0: tuple[int, ...],
            starts: dict[Rows, float]) -> tuple[float, tuple[GateStep, ...], Rows] | None:
    """Cheapest row orders for ``gates`` from any start (rows -> cost so far) to the natural
    order: (cost, steps, start rows), or None when no permute-free path exists."""
    n_cols, isz = circuit.in_features, 4
    dims_at = [dims0]
    for i in gates:
        dims_at.append(dims_after(circuit, dims_at[-1], [i]))
    frontier = {rows: (c, (), rows) for rows, c in starts.items()}
    for t, i in enumerate(gates):
        g = circuit.gates[i]
        nxt: dict[Rows, tuple] = {}
        for rows, (c0, path, first) in frontier.items():
            for a, b_in, b_out, rows_out in _moves(rows, set(g.qudits)):
                p = math.prod(dims_at[t][q] for q in rows[:a])
                s_ = math.prod(dims_at[t][q] for q in rows[a + len(b_in):]) * n_cols
                c = c0 + _row_gemm_cost(mc, p, g.out_size, s_, g.in_size, rows_out[:a] == rows[:a], isz)
                if rows_out not in nxt or c < nxt[rows_out][0]:
                    nxt[rows_out] = (c, path + (GateStep(i, rows, rows_out, a, b_in, b_out),), first)
        frontier = nxt
    return frontier.get(tuple(range(len(dims0))))


FOLD = 2.0   # the fold's batched GEMM (its narrow side is the rest's size) vs one contiguous copy


def _fold_starts(mc: cm.Machine, circuit: Circuit, sup: Rows, gate: int,
                 dims0) -> dict[Rows, float] | None:
    """Start row orders when ``gate`` (the first after the prefix) is written straight from
    ``A`` (:func:`_fold_write`): it must cover every qudit outside ``sup``, and those must be
    the last column axes. Rows come out as (the gate's qudits, the rest of ``sup``)."""
    n = len(circuit.in_dims)
    rest = [q for q in range(n) if q not in sup]
    g = circuit.gates[gate]
    if not rest or not set(rest) <= set(g.qudits) or max(sup) > min(rest):
        return None
    others = [q for q in sup if q not in g.qudits]
    numel = math.prod(dims_after(circuit, dims0, [gate])) * circuit.in_features
    k = math.prod(dims0[q] for q in g.qudits if q in sup)
    cost = FOLD * cm.copy(mc, numel, 4, 1.0) + 2.0 * numel * k / mc.peak_flops
    return {qo + ro: cost for qo in itertools.permutations(g.qudits)
            for ro in itertools.permutations(others)}


def _plan_side(mc: cm.Machine, circuit: Circuit, transposed: bool,
               max_prefix: int = LIGHTCONE_MAX_PREFIX, fold: bool | None = None) -> Lightcone | None:
    """The light-cone plan of one orientation. ``fold``: None lets the cost model choose,
    True folds whenever the first remaining gate allows it, False never (tests use both)."""
    n = len(circuit.in_dims)
    if n > LIGHTCONE_MAX_QUDITS or not circuit.gates:
        return None
    best = None
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            pre = _prefix(circuit, set(s))
            if not pre:
                continue
            sup = tuple(sorted({q for i in pre for q in circuit.gates[i].qudits}))
            k_in = math.prod(circuit.in_dims[q] for q in sup)
            dims = dims_after(circuit, circuit.in_dims, pre)
            if max(k_in, math.prod(dims[q] for q in sup)) > max_prefix:
                continue
            key = (-len(pre), k_in)
            if best is None or key < best[0]:
                best = (key, tuple(pre), sup, dims)
    if best is None:
        return None
    _, pre, sup, dims0 = best
    rest = [i for i in range(len(circuit.gates)) if i not in pre]
    # A ⊗ I: memset + diagonal copy into a recycled buffer (the result's fresh memory below)
    plain = _search(mc, circuit, rest, dims0, dict.fromkeys(
        itertools.permutations(range(n)),
        cm.copy(mc, math.prod(dims0) * circuit.in_features, 4, 1.0)))
    options = [(plain, None)]
    starts = _fold_starts(mc, circuit, sup, rest[0], dims0) if rest and fold is not False else None
    if starts is not None:
        found = _search(mc, circuit, rest[1:], dims_after(circuit, dims0, rest[:1]), starts)
        options = [(found, rest[0])] if fold and found is not None else options + [(found, rest[0])]
    options = [(found, f) for found, f in options if found is not None]
    if not options:
        return None
    (cost, steps, rows0), folded = min(options, key=lambda o: o[0][0])
    support = sup if folded is not None else tuple(q for q in rows0 if q in sup)
    return Lightcone(circuit, transposed, pre, support, rows0, steps,
                     cost + cm.fresh(mc, circuit.out_features * circuit.in_features, 4), folded)


def search_lightcone(circuit: Circuit, machine: cm.Machine = cm.SHIPPED,
                     max_prefix: int = LIGHTCONE_MAX_PREFIX) -> Lightcone | None:
    """The cheaper of the two orientations priced with ``machine``, or None when none exists
    (more than ``LIGHTCONE_MAX_QUDITS`` qudits, or no prefix whose matrix fits ``max_prefix``)."""
    plans = [p for p in (_plan_side(machine, circuit, False, max_prefix),
                         _plan_side(machine, transpose_circuit(circuit), True, max_prefix))
             if p is not None]
    return min(plans, key=lambda p: p.cost) if plans else None


def _identity_product(plan: Lightcone, a: Tensor, in_dims: tuple[int, ...], dims,
                      ws: Workspace) -> Tensor:
    """``A ⊗ I_rest`` (rows in ``plan.rows0`` order, columns natural), written as one memset
    plus one strided copy of ``A`` onto the diagonal of the rest qudits."""
    rows, n = plan.rows0, len(in_dims)
    numel = math.prod(dims) * math.prod(in_dims)
    out = ws.take(numel, a)
    out.zero_()
    shape = [dims[q] for q in rows] + list(in_dims)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    col = {q: strides[n + q] for q in range(n)}
    v_shape, v_stride = [], []
    for i, q in enumerate(rows):  # a rest qudit's row and column axes walk its diagonal
        v_shape.append(shape[i])
        v_stride.append(strides[i] + (0 if q in plan.support else col[q]))
    for q in plan.support:
        v_shape.append(in_dims[q])
        v_stride.append(col[q])
    view = out.as_strided(v_shape, v_stride)
    src = a.reshape([dims[q] for q in plan.support] + [in_dims[q] for q in plan.support])
    k = len(plan.support)
    src = src.permute([plan.support.index(q) for q in rows if q in plan.support]
                      + list(range(k, 2 * k)))
    src = src.reshape([dims[q] if q in plan.support else 1 for q in rows]
                      + [in_dims[q] for q in plan.support])
    view.copy_(src.expand(v_shape))
    return out


def _fold_write(plan: Lightcone, a: Tensor, gate: Tensor, dims0: Sequence[int],
                ws: Workspace) -> Tensor:
    """``(G ⊗ I)(A ⊗ I_rest)`` written at once, for a gate ``G`` covering every rest qudit:
    ``E[q', r, s, c] = Σ_k A[k, r, s] · G[q', k, c]`` with ``k`` the gate's qudits inside the
    support, ``r`` the support's other rows, ``s`` the support's columns and ``c`` the rest's
    columns (the last axes). One batched GEMM, no memset, and the gate's inner dimension is
    only its part inside the support."""
    c = plan.circuit
    g = c.gates[plan.fold]
    sup, in_dims, nq = plan.support, c.in_dims, len(g.qudits)
    q_out, others = plan.rows0[:nq], plan.rows0[nq:]
    inside = [q for q in g.qudits if q in sup]
    rest = [q for q in range(len(in_dims)) if q not in sup]
    k = len(sup)
    a = a.reshape([dims0[q] for q in sup] + [in_dims[q] for q in sup])
    a = a.permute([sup.index(q) for q in inside + list(others)] + list(range(k, 2 * k)))
    a = a.reshape(math.prod(dims0[q] for q in inside), -1)
    gm = gate.permute([g.qudits.index(q) for q in q_out]
                      + [nq + g.qudits.index(q) for q in inside + rest])
    gm = gm.reshape(g.out_size, a.shape[0], -1).contiguous()  # BLAS needs a unit stride
    numel = g.out_size * a.shape[1] * gm.shape[2]
    out = ws.take(numel, a)
    torch.matmul(a.t().unsqueeze(0), gm, out=out.view(g.out_size, a.shape[1], gm.shape[2]))
    return out


def run_lightcone(plan: Lightcone, gates: Sequence[Tensor],
                  workspace: Workspace | None = None) -> Tensor:
    """``T`` (out_features, in_features) of the original circuit (forward only, no autograd)."""
    c = plan.circuit
    if plan.transposed:
        gates = transposed_gates(gates)
    ws = workspace if workspace is not None else Workspace()
    n_cols = c.in_features
    qud = tuple(g.qudits for g in c.gates)
    sup = plan.support
    dims = list(dims_after(c, c.in_dims, plan.prefix))
    pstep = Step("materialize", (), plan.rows0 + (TOKEN,), (), (), 0.0, plan.prefix, sup,
                 tuple(c.in_dims[q] for q in sup), tuple(dims[q] for q in sup))
    a = fused_matrix(pstep, gates, qud)
    with torch.no_grad():
        if plan.fold is None:
            x = _identity_product(plan, a, tuple(c.in_dims), dims, ws)
        else:
            x = _fold_write(plan, a, gates[plan.fold], dims, ws)
            dims = list(dims_after(c, dims, [plan.fold]))
        for st in plan.steps:
            g = c.gates[st.gate]
            m = gate_matrix(gates[st.gate], g.qudits, st.block_out, st.block_in)
            rows_in_shape = [dims[q] for q in st.rows_in]
            dims = list(dims_after(c, dims, [st.gate]))
            out = ws.take(math.prod(dims) * n_cols, x)
            pre = st.rows_in[:st.start]
            xv = x.view(math.prod(rows_in_shape[:st.start]), g.in_size, -1)
            # out in rows_out order, axes moved to (prefix..., block..., suffix..., columns)
            ov = out.view(*[dims[q] for q in st.rows_out], n_cols)
            lead = [st.rows_out.index(q) for q in pre + st.block_out]
            ov = ov.permute(lead + [ax for ax in range(ov.dim()) if ax not in lead])
            if st.rows_out[:st.start] == pre:  # block stays put: one batched GEMM
                torch.matmul(m, xv, out=out.view(xv.shape[0], g.out_size, -1))
            else:
                for p, idx in enumerate(itertools.product(*[range(d) for d in ov.shape[:len(pre)]])):
                    torch.mm(m, xv[p], out=ov[idx].view(g.out_size, -1))
            ws.give(x)
            x = out
    t = x.view(c.out_features, n_cols)  # the last write leaves the pool for good: never given back
    return t.t() if plan.transposed else t
