"""The dense matrix ``T`` by the light cone of the identity.

``T = G_K⋯G_1`` applied to the identity. The identity is sparse: a dependency-closed prefix of
gates acting only on a qudit subset ``S`` (commuting gates reordered) multiplies out to a small
dense matrix ``A`` on ``S``, so after the prefix the operator is ``A ⊗ I_rest``, written out once.
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
from typing import Callable, Sequence

import torch
from torch import Tensor

from qcircuit.ir import Circuit

from . import costmodel as cm
from .schedule import TOKEN, Step, transpose_circuit
from .schedule_exec import Workspace, _fused_matrix, transposed_gates

Rows = tuple[int, ...]
MAX_QUDITS = 6      # the layout search enumerates row orders
MAX_PREFIX = 1024   # largest side of the prefix matrix A


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
class LightconePlan:
    """A light-cone plan for one orientation of the circuit; ``cost`` in predicted seconds."""

    circuit: Circuit            # the oriented circuit (transposed when ``transposed``)
    transposed: bool
    prefix: tuple[int, ...]     # gate indices multiplied into A, in order
    support: Rows               # S, in the row order of the first layout
    rows0: Rows                 # row order A ⊗ I is written in
    steps: tuple[GateStep, ...]
    cost: float


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
ONE_WIDE = 1.0      # one GEMM over a single very wide operand vs batched (same on a quiet run)


def _row_gemm_cost(p: int, k2: int, s: int, k: int, in_place: bool, isz: int) -> float:
    """``M @ X[p]`` for every row prefix ``p``: one batched GEMM when the output keeps the row
    order, else a loop of GEMMs into strided views; measured factors, see the constants."""
    base = p * cm.gemm(k2, s, k, isz, transposed_out=True)
    if p == 1:
        return base * ONE_WIDE
    return base * (1.0 if in_place else STRIDED_OUT)


def _plan_side(circuit: Circuit, transposed: bool,
               max_prefix: int = MAX_PREFIX) -> LightconePlan | None:
    n = len(circuit.in_dims)
    if n > MAX_QUDITS or not circuit.gates:
        return None
    best = None
    for r in range(1, n + 1):
        for s in itertools.combinations(range(n), r):
            pre = _prefix(circuit, set(s))
            if not pre:
                continue
            sup = tuple(sorted({q for i in pre for q in circuit.gates[i].qudits}))
            k_in = math.prod(circuit.in_dims[q] for q in sup)
            dims = list(circuit.in_dims)
            for i in pre:
                for q, d in zip(circuit.gates[i].qudits, circuit.gates[i].out_dims):
                    dims[q] = d
            if max(k_in, math.prod(dims[q] for q in sup)) > max_prefix:
                continue
            key = (-len(pre), k_in)
            if best is None or key < best[0]:
                best = (key, tuple(pre), sup, tuple(dims))
    if best is None:
        return None
    _, pre, sup, dims0 = best
    rest = [i for i in range(len(circuit.gates)) if i not in pre]
    n_cols = circuit.in_features
    isz = 4
    # dims after each remaining gate
    dims_at = [dims0]
    for i in rest:
        d = list(dims_at[-1])
        for q, v in zip(circuit.gates[i].qudits, circuit.gates[i].out_dims):
            d[q] = v
        dims_at.append(tuple(d))
    numel0 = math.prod(dims0) * n_cols
    # memset + diagonal copy into a recycled buffer (the result's fresh memory is added below)
    start = cm.copy(numel0, isz, 1.0)
    frontier: dict[Rows, tuple[float, tuple]] = {
        rows: (start, ()) for rows in itertools.permutations(range(n))}
    for t, i in enumerate(rest):
        g = circuit.gates[i]
        nxt: dict[Rows, tuple[float, tuple]] = {}
        for rows, (c0, path) in frontier.items():
            for a, b_in, b_out, rows_out in _moves(rows, set(g.qudits)):
                p = math.prod(dims_at[t][q] for q in rows[:a])
                s_ = math.prod(dims_at[t][q] for q in rows[a + len(b_in):]) * n_cols
                c = c0 + _row_gemm_cost(p, g.out_size, s_, g.in_size, rows_out == rows, isz)
                if rows_out not in nxt or c < nxt[rows_out][0]:
                    nxt[rows_out] = (c, path + (GateStep(i, rows, rows_out, a, b_in, b_out),))
        frontier = nxt
    natural = tuple(range(n))
    if natural not in frontier:
        return None
    cost, steps = frontier[natural]
    rows0 = steps[0].rows_in if steps else natural
    support = tuple(q for q in rows0 if q in sup)
    return LightconePlan(circuit, transposed, pre, support, rows0, steps,
                         cost + cm.fresh(circuit.out_features * n_cols, isz))


def plan_lightcone(circuit: Circuit, max_prefix: int = MAX_PREFIX) -> LightconePlan | None:
    """The cheaper of the two orientations, or None when no light-cone plan exists
    (more than ``MAX_QUDITS`` qudits, or no prefix whose matrix fits ``max_prefix``)."""
    plans = [p for p in (_plan_side(circuit, False, max_prefix),
                         _plan_side(transpose_circuit(circuit), True, max_prefix))
             if p is not None]
    return min(plans, key=lambda p: p.cost) if plans else None


def _matrix(gate: Tensor, qudits: Sequence[int], rows: Rows, cols: Rows) -> Tensor:
    """The gate as a (K', K) matrix, rows in order ``rows``, columns in order ``cols``."""
    n = len(qudits)
    perm = [qudits.index(q) for q in rows] + [n + qudits.index(q) for q in cols]
    g = gate.permute(perm)
    return g.reshape(math.prod(g.shape[:n]), math.prod(g.shape[n:]))


def _identity_product(plan: LightconePlan, a: Tensor, in_dims: tuple[int, ...], dims,
                      ws: Workspace, fresh: bool) -> Tensor:
    """``A ⊗ I_rest`` (rows in ``plan.rows0`` order, columns natural), written as one memset
    plus one strided copy of ``A`` onto the diagonal of the rest qudits."""
    rows, n = plan.rows0, len(in_dims)
    numel = math.prod(dims) * math.prod(in_dims)
    out = torch.empty(numel, dtype=a.dtype, device=a.device) if fresh else ws.take(numel, a)
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


def run_lightcone(plan: LightconePlan, gates: Sequence[Tensor],
                  workspace: Workspace | None = None) -> Tensor:
    """``T`` (out_features, in_features) of the original circuit (forward only, no autograd)."""
    c = plan.circuit
    if plan.transposed:
        gates = transposed_gates(gates)
    ws = workspace if workspace is not None else Workspace()
    n_cols = c.in_features
    qud = tuple(g.qudits for g in c.gates)
    sup = plan.support
    dims = list(c.in_dims)
    for i in plan.prefix:
        for q, d in zip(c.gates[i].qudits, c.gates[i].out_dims):
            dims[q] = d
    pstep = Step("materialize", (), plan.rows0 + (TOKEN,), (), (), 0.0, plan.prefix, sup,
                 tuple(c.in_dims[q] for q in sup), tuple(dims[q] for q in sup))
    a = _fused_matrix(pstep, gates, qud)
    with torch.no_grad():
        x = _identity_product(plan, a, tuple(c.in_dims), dims, ws, not plan.steps)
        for n, st in enumerate(plan.steps):
            g = c.gates[st.gate]
            m = _matrix(gates[st.gate], g.qudits, st.block_out, st.block_in)
            rows_in_shape = [dims[q] for q in st.rows_in]
            for q, d in zip(g.qudits, g.out_dims):
                dims[q] = d
            numel = math.prod(dims) * n_cols
            last = n == len(plan.steps) - 1
            out = torch.empty(numel, dtype=x.dtype, device=x.device) if last else ws.take(numel, x)
            pre = st.rows_in[:st.start]
            xv = x.view(math.prod(rows_in_shape[:st.start]), g.in_size, -1)
            # out in rows_out order, axes moved to (prefix..., block..., suffix..., columns)
            ov = out.view(*[dims[q] for q in st.rows_out], n_cols)
            lead = [st.rows_out.index(q) for q in pre + st.block_out]
            ov = ov.permute(lead + [ax for ax in range(ov.dim()) if ax not in lead])
            if st.rows_out == st.rows_in and st.block_out == st.block_in:
                torch.matmul(m, xv, out=out.view(xv.shape[0], g.out_size, -1))
            else:
                for p, idx in enumerate(itertools.product(*[range(d) for d in ov.shape[:len(pre)]])):
                    torch.mm(m, xv[p], out=ov[idx].view(g.out_size, -1))
            ws.give(x)
            x = out
    t = x.view(c.out_features, n_cols)
    return t.t() if plan.transposed else t


def make_lightcone_executor(circuit: Circuit, fallback: Callable[[Sequence[Tensor]], Tensor],
                            reference_cost: float) -> Callable[[Sequence[Tensor]], Tensor]:
    """``f(gates) -> T``: the light-cone route when it exists and the cost model predicts it
    beats ``reference_cost``; ``fallback`` otherwise and whenever autograd is recording."""
    plan = plan_lightcone(circuit)
    if plan is None or plan.cost >= reference_cost:
        return fallback
    ws = Workspace()

    def run(gates: Sequence[Tensor]) -> Tensor:
        if (torch.is_grad_enabled() and any(g.requires_grad for g in gates)) \
                or torch.compiler.is_compiling():
            return fallback(gates)
        return run_lightcone(plan, gates, ws)
    return run
