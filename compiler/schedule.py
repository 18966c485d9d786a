"""Execution schedules: a circuit as a short list of GEMMs and copies, chosen by a cost model.

The activation is kept as one contiguous tensor whose *physical axis order* (the layout: the
token axis ``TOKEN`` and the qudits, in memory order) is tracked across gates, the way quantum
compilers track qubit placement. A gate step needs its qudits adjacent in the layout; it is
then one GEMM with no transpose:

``suffix``     block last:  ``(P, K) @ Mᵀ -> (P, K')``
``prefix``     block first: ``M @ (K, S) -> (K', S)``
``rot_front``  block last, output written block-first  ``M @ (P, K)ᵀ -> (K', P)``
``rot_back``   block first, output written block-last  ``(K, S)ᵀ @ Mᵀ -> (S, K')``
``batched``    block in the middle: ``M @ (P, K, S)`` as a batched GEMM
``permute``    a copy into a new layout, paid only where the cost model says it buys something.

Consecutive gates (after moving commuting gates together) may be fused into one step whose
matrix ``M`` is their product on the union of their qudits. :func:`build_schedule` searches
orders, fusions and layouts with dynamic programming over layouts (pruned to a beam) and
``costmodel``; :func:`run_schedule` executes a schedule with a custom autograd function that
keeps one buffer per step, computes ``grad_x`` and every ``grad_M`` as GEMMs, reuses the saved
buffers for gradients, and recycles them through a :class:`Workspace` between training steps
(fresh large allocations cost page faults comparable to a GEMM on this machine).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from qcircuit.errors import QCError
from qcircuit.ir import Circuit, Gate

from . import costmodel as cm
from . import fused, kernels

TOKEN = -1


class OutOfTime(Exception):
    """A search passed its deadline (the caller drops the route, see ``routes.py``)."""

FORMS = ("suffix", "prefix", "rot_front", "rot_back", "batched")
Layout = tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One kernel. Shapes are physical (layout order), with ``-1`` standing for the tokens."""

    kind: str                       # "permute", "materialize" or one of FORMS
    layout_in: Layout
    layout_out: Layout
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    cost: float                     # predicted seconds (forward, plus backward when training)
    gates: tuple[int, ...] = ()     # circuit gate indices fused into this step, in order
    block: tuple[int, ...] = ()     # the step's qudits in physical order
    block_in: tuple[int, ...] = ()  # their dims before / after the step
    block_out: tuple[int, ...] = ()
    start: int = 0                  # position of the block in layout_in
    bmm_gram: bool = False          # batched, training: its gate gradient as a batched product
                                    # summed over the batch (else one tensordot), see
                                    # costmodel.batched_gram


@dataclass(frozen=True)
class Schedule:
    """Steps for a circuit at a token count; ``cost`` is the predicted time in seconds."""

    tokens: int
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    gate_qudits: tuple[tuple[int, ...], ...]
    steps: tuple[Step, ...]
    cost: float
    dense: bool = False
    transposed: bool = False        # dense only: planned on the transposed circuit (Tᵀ)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_dims)

    def describe(self) -> str:
        """One line per step: kind, qudits, layout after, predicted ms."""
        rows = []
        for s in self.steps:
            what = f"gates {list(s.gates)} on {s.block}" if s.gates else ""
            lay = " ".join("t" if a == TOKEN else str(a) for a in s.layout_out)
            rows.append(f"{s.kind:11s} {what:28s} -> [{lay}]  {s.cost * 1e3:8.3f} ms")
        return "\n".join(rows + [f"total {self.cost * 1e3:.3f} ms"])


# ----------------------------------------------------------------------------- planning
def _orders(gates) -> list[tuple[int, ...]]:
    """The circuit order and two reorderings that only swap commuting (disjoint) gates:
    each gate moved as early (as late) as possible, next to the gate it depends on."""
    def asap(idx):
        out: list[int] = []
        for i in idx:
            deps = [p for p, j in enumerate(out) if set(gates[j].qudits) & set(gates[i].qudits)]
            out.insert(deps[-1] + 1 if deps else 0, i)
        return out
    n = len(gates)
    early = tuple(asap(range(n)))
    late = tuple(reversed(asap(range(n - 1, -1, -1))))
    return list(dict.fromkeys([tuple(range(n)), early, late]))


def dims_after(circuit: Circuit, dims: Sequence[int], gates: Sequence[int]) -> tuple[int, ...]:
    """Qudit dims after applying the gates with indices ``gates`` to wires of dims ``dims``."""
    d = list(dims)
    for i in gates:
        for q, v in zip(circuit.gates[i].qudits, circuit.gates[i].out_dims):
            d[q] = v
    return tuple(d)


def _size(layout: Layout, dims: Sequence[int], tokens: int) -> list[int]:
    return [tokens if a == TOKEN else dims[a] for a in layout]


def _candidates(layout: Layout, block: tuple[int, ...], free_layout: bool) -> list[Layout]:
    """Layouts reachable by one permute that make ``block`` contiguous (insert it anywhere,
    in either internal order); the layout itself first when the block is already contiguous."""
    pos = sorted(layout.index(q) for q in block)
    inner = tuple(layout[p] for p in pos)
    rest = tuple(a for a in layout if a not in block)
    out = []
    if pos[-1] - pos[0] == len(pos) - 1:
        out.append(layout)
    if not free_layout:
        out.append(rest + inner)
        return list(dict.fromkeys(out))
    for order in dict.fromkeys([inner, inner[::-1]]):
        out.extend(rest[:i] + order + rest[i:] for i in range(len(rest) + 1))
    return list(dict.fromkeys(out))


def _gate_step_cost(mc: cm.Machine, form, p, k, k2, s, isz, backward) -> float:
    if form == "suffix":
        gram = cm.gemm(mc, k2, k, p, isz) * cm.gram_factor(max(k, k2), p)
        f, b = cm.gemm(mc, p, k2, k, isz), cm.gemm(mc, p, k, k2, isz) + gram
    elif form == "prefix":
        f = cm.gemm(mc, k2, s, k, isz, transposed_out=True)
        b = cm.gemm(mc, k, s, k2, isz, transposed_out=True) + cm.gemm(mc, k2, k, s, isz)
    elif form == "rot_front":
        f = cm.gemm(mc, k2, p, k, isz, transposed_out=True)
        b = cm.gemm(mc, p, k, k2, isz, transposed_out=True) + cm.gemm(mc, k2, k, p, isz)
    elif form == "rot_back":
        f = cm.gemm(mc, s, k2, k, isz, transposed_out=True)
        b = cm.gemm(mc, k, s, k2, isz, transposed_out=True) + cm.gemm(mc, k2, k, s, isz)
    else:
        f = cm.batched_gemm(mc, p, k2, s, k, isz)
        b = cm.batched_gemm(mc, p, k, s, k2, isz) + cm.batched_gram(mc, p, k2, k, s, isz)[0]
    return f + (b if backward else 0.0)


def _forms(layout: Layout, block, sizes) -> list[tuple[str, Layout]]:
    a = min(layout.index(q) for q in block)
    b = a + len(block)
    p, s = math.prod(sizes[:a]), math.prod(sizes[b:])
    out = []
    if s == 1:
        out += [("suffix", layout), ("rot_front", layout[a:] + layout[:a])]
    if p == 1:
        out += [("prefix", layout), ("rot_back", layout[b:] + layout[:b])]
    if p > 1 and s > 1:
        out.append(("batched", layout))
    return out


def _plan(mc: cm.Machine, circuit: Circuit, order, tokens, isz, *, fuse, free_layout, dense,
          backward,
          max_block, max_group, beam, transposed=False, forms=FORMS,
          max_gate_steps: int | None = None, gather: bool = False,
          deadline: float | None = None) -> tuple[float, list[Step]]:
    gates = circuit.gates
    kernel = kernels.enabled()
    n_q = len(circuit.in_dims)
    dims_at = [tuple(circuit.in_dims)]
    for i in order:
        dims_at.append(dims_after(circuit, dims_at[-1], [i]))
    first: Layout = (TOKEN,) + tuple(range(n_q))
    # the forward result is tokens-first; the dense plan may end either way (see below)
    last: Layout = tuple(range(n_q)) + (TOKEN,) if dense and not transposed else first
    starts = [first, last] if dense else [first]
    # frontier[i][(layout, gate steps so far)] = (cost, back-pointer (i0, key0), steps added);
    # counting gate steps lets the end respect a memory budget (each keeps its input)
    frontier: list[dict] = [dict() for _ in range(len(order) + 1)]
    for lay in starts:
        frontier[0][(lay, 0)] = (0.0, None, ())
    for i in range(len(order)):
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime(f"schedule search stopped at gate {i} of {len(order)}")
        states, kept = [], {}
        for key, v in sorted(frontier[i].items(), key=lambda kv: kv[1][0]):
            if kept.setdefault(key[1], 0) < beam:  # a beam per gate-step count
                kept[key[1]] += 1
                states.append((key, v))
        for j in range(i + 1, min(len(order), i + (max_group if fuse else 1)) + 1):
            group = order[i:j]
            block = tuple(dict.fromkeys(q for g in group for q in gates[g].qudits))
            k = math.prod(dims_at[i][q] for q in block)
            k2 = math.prod(dims_at[j][q] for q in block)
            if len(group) > 1 and max(k, k2) > (2 * max_block if dense and i == 0 else max_block):
                break
            build = 0.0
            if len(group) > 1:
                sizes, cur = [], k
                for g in group:
                    sizes.append((gates[g].out_size, k * cur // gates[g].in_size, gates[g].in_size))
                    cur = cur // gates[g].in_size * gates[g].out_size
                build = cm.small_matmuls(mc, sizes) * (1.0 if backward else 1.0 / 3.0)
            for (lay, used), (cost0, _, _) in states:
                if deadline is not None and time.monotonic() > deadline:
                    raise OutOfTime(f"schedule search stopped at gate {i} of {len(order)}")
                for pre in _candidates(lay, block, free_layout):
                    pre_sizes = _size(pre, dims_at[i], tokens)
                    numel = math.prod(pre_sizes)
                    perm_cost = fused_cost = 0.0
                    if pre != lay and not (dense and i == 0):
                        perm_cost = _permute_cost(mc, lay, pre, dims_at[i], tokens, isz, backward,
                                                  kernel)
                        fused_cost = _permute_cost(mc, lay, pre, dims_at[i], tokens, isz, backward,
                                                   kernel, gather) if gather else perm_cost
                    for form, out_lay in _forms(pre, block, pre_sizes):
                        if form not in forms or (not free_layout and form != "suffix"):
                            continue
                        a = min(pre.index(q) for q in block)
                        if dense and i == 0:
                            kind = "materialize"
                            c = (cm.copy(mc, numel // k * k2, isz, 1.0)
                                 + cm.fresh(mc, numel // k * k2, isz))
                        else:
                            kind = form
                            p = math.prod(pre_sizes[:a])
                            s = math.prod(pre_sizes[a + len(block):])
                            c = _gate_step_cost(mc, form, p, k, k2, s, isz, backward)
                        c += build
                        # a permute before a suffix GEMM runs fused with it (fused.py)
                        pc = fused_cost if form == "suffix" else perm_cost
                        total = cost0 + pc + c
                        key = (out_lay, used + 1)
                        old = frontier[j].get(key)
                        if old is not None and total >= old[0]:
                            continue
                        # the steps themselves are made only for the winner (see below)
                        added = (kind, lay, pre, out_lay, c, pc if perm_cost else 0.0,
                                 group, block, a)
                        frontier[j][key] = (total, (i, (lay, used)), added)
    n = len(order)
    best, best_lay, best_tail = math.inf, None, ()
    out_numel = tokens * circuit.out_features
    # dense: ending tokens-first or tokens-last gives T or Tᵀ contiguous; either is fine
    # (dense_matrix returns a transposed view), so no final permute is forced
    ends = [last, first, tuple(range(n_q)) + (TOKEN,)] if dense else [last]
    finals = frontier[n].items()
    if max_gate_steps is not None and any(used <= max_gate_steps for (_, used), _ in finals):
        finals = [(key, v) for key, v in finals if key[1] <= max_gate_steps]
    for (lay, used), (cost0, _, _) in finals:
        for end in dict.fromkeys(ends):
            tail: tuple[Step, ...] = ()
            cost = cost0
            if lay != end:
                c = _permute_cost(mc, lay, end, dims_at[n], tokens, isz, backward, kernel)
                tail = (Step("permute", lay, end, _tok(lay, dims_at[n]), _tok(end, dims_at[n]), c),)
                cost += c
            if cost < best:
                best, best_lay, best_tail = cost, (lay, used), tail
    if best_lay is None:
        raise QCError(f"no schedule uses only the forms {forms} for this circuit")
    steps: list[Step] = list(best_tail)
    i, lay = n, best_lay
    while frontier[i][lay][1] is not None:
        _, (i0, lay0), (kind, lay_in, pre, out_lay, c, pc, group, block, a) = frontier[i][lay]
        inner = tuple(q for q in pre if q in block)
        block_in = tuple(dims_at[i0][q] for q in inner)
        block_out = tuple(dims_at[i][q] for q in inner)
        bmm_gram = False
        if kind == "batched" and backward:
            sizes = _size(pre, dims_at[i0], tokens)
            p, s = math.prod(sizes[:a]), math.prod(sizes[a + len(block):])
            bmm_gram = cm.batched_gram(mc, p, math.prod(block_out), math.prod(block_in), s, isz)[1]
        added = [Step(kind, pre, out_lay, _tok(pre, dims_at[i0]), _tok(out_lay, dims_at[i]), c,
                      tuple(group), inner, block_in, block_out, a, bmm_gram)]
        if pc:
            added.insert(0, Step("permute", lay_in, pre, _tok(lay_in, dims_at[i0]),
                                 _tok(pre, dims_at[i0]), pc))
        steps[:0] = added
        i, lay = i0, lay0
    fresh = cm.fresh(mc, out_numel, isz) + (cm.fresh(mc, tokens * circuit.in_features, isz)
                                            if backward else 0)
    return best + fresh, steps


def _permute_cost(mc: cm.Machine, src: Layout, dst: Layout, dims, tokens: int, isz: int,
                  backward: bool, kernel: bool = False, gather: bool = False) -> float:
    """Forward copy ``src -> dst``; backward copies the gradient ``dst -> src``. ``kernel``:
    copies within token slabs run as the C kernel (:mod:`kernels`), priced apart; ``gather``:
    they run inside the fused gate kernel after them (:mod:`fused`). Memoised per
    machine (the constants it prices with)."""
    return _priced_permute(src, dst, dims, tokens, isz, backward, kernel, gather, mc)


@functools.lru_cache(maxsize=1 << 16)
def _priced_permute(src: Layout, dst: Layout, dims, tokens: int, isz: int, backward: bool,
                    kernel: bool, gather: bool, machine: cm.Machine) -> float:
    def one(shape, perm) -> float:
        if kernel and kernels.in_slabs(shape, perm):
            n = math.prod(shape)
            return cm.fused_copy(machine, n, isz) if gather else cm.kernel_copy(machine, n, isz)
        return cm.copy(machine, math.prod(shape), isz, cm.permute_factor(shape, perm, isz))
    cost = one(_size(src, dims, tokens), tuple(src.index(a) for a in dst))
    if backward:
        cost += one(_size(dst, dims, tokens), tuple(dst.index(a) for a in src))
    return cost


def _tok(layout: Layout, dims) -> tuple[int, ...]:
    return tuple(-1 if a == TOKEN else dims[a] for a in layout)


MEMORY_NUMEL = 1 << 22  # activations this large (16 MiB in float32) make memory the concern


def gate_step_budget(circuit: Circuit, tokens: int) -> int | None:
    """Most gate steps a training schedule may have so that its peak holds fewer
    activation-sized buffers than the one-expression reference. A schedule keeps every gate
    step's input but ``x`` (steps − 1) plus a forward scratch buffer, the output and one
    backward ping-pong buffer: steps + 2. Torch autograd on one opt_einsum expression keeps
    about one activation per gate plus the output and its gradient: gates + 2 (measured: 8
    buffers for the 6-gate paper circuit at 2048 tokens). None (no budget) when one
    activation is under ``MEMORY_NUMEL`` elements."""
    if tokens * max(circuit.in_features, circuit.out_features) < MEMORY_NUMEL:
        return None
    return max(len(circuit.gates) - 1, 1)


def build_schedule(circuit: Circuit, tokens: int, *, fuse: bool = True, layout: bool = True,
                   reorder: bool = True, dense: bool = False, backward: bool | None = None,
                   dtype: torch.dtype = torch.float32, max_block: int = 512, max_group: int = 4,
                   beam: int = 48, forms: Sequence[str] = FORMS, memory: bool = True,
                   deadline: float | None = None, machine: cm.Machine = cm.SHIPPED) -> Schedule:
    """Plan ``circuit`` for ``tokens`` rows. ``layout=False`` keeps the naive plan (every
    gate's qudits permuted to the end, one suffix GEMM); ``fuse``/``reorder`` switch fusion
    and commuting reorders; ``forms`` restricts the GEMM forms (tests use it). ``dense`` plans
    the dense matrix (identity input, forward only). ``memory``: a training plan keeps within
    :func:`gate_step_budget` when some plan can (the fastest such plan wins). ``deadline``
    (a ``time.monotonic()`` value): raise :class:`OutOfTime` once the search passes it.
    ``machine``: the cost model's constants to price with."""
    if set(forms) - set(FORMS) or not forms:
        raise QCError(f"unknown GEMM forms {sorted(set(forms) - set(FORMS))}", expected=" or ".join(FORMS))
    if not isinstance(tokens, int) or tokens < 1:
        raise QCError(f"tokens must be a positive integer, got {tokens!r}")
    circuit.check_complete()
    backward = (not dense) if backward is None else backward
    isz = torch.empty((), dtype=dtype).element_size()
    gather = dtype in (torch.float32, torch.float64) and fused.available()
    budget = gate_step_budget(circuit, tokens) if memory and backward and not dense else None
    best = None
    for transposed in ((False, True) if dense else (False,)):
        circ = transpose_circuit(circuit) if transposed else circuit
        for order in (_orders(circ.gates) if reorder else [tuple(range(len(circ.gates)))]):
            cost, steps = _plan(machine, circ, order, circ.in_features if dense else tokens, isz, fuse=fuse,
                                free_layout=layout, dense=dense, backward=backward,
                                max_block=max_block, max_group=max_group, beam=beam,
                                transposed=transposed, forms=tuple(forms), max_gate_steps=budget,
                                gather=gather, deadline=deadline)
            if best is None or cost < best[0]:
                best = (cost, steps, circ, transposed)
    cost, steps, circ, transposed = best
    return Schedule(tokens, tuple(circ.in_dims), tuple(circ.out_dims),
                    tuple(g.qudits for g in circ.gates), tuple(steps), cost, dense, transposed)


def transpose_circuit(circuit: Circuit) -> Circuit:
    """The circuit of Tᵀ: gates reversed, each transposed (its in and out dims swapped)."""
    gates = tuple(Gate(g.qudits, g.out_dims, g.in_dims) for g in reversed(circuit.gates))
    return Circuit(*circuit.out_dims, gates=gates)


def cached_schedule(circuit: Circuit, tokens: int, dense: bool = False,
                    dtype: torch.dtype = torch.float32,
                    machine: cm.Machine = cm.SHIPPED) -> Schedule:
    """:func:`build_schedule` with default options, memoised (a pure function)."""
    return _cached_schedule(circuit, tokens, dense, dtype, machine)


@functools.lru_cache(maxsize=256)
def _cached_schedule(circuit: Circuit, tokens: int, dense: bool, dtype: torch.dtype,
                     machine: cm.Machine) -> Schedule:
    return build_schedule(circuit, tokens, dense=dense, dtype=dtype, machine=machine)


def predicted_cost(circuit: Circuit, tokens: int, **options) -> float:
    """Predicted seconds of the best schedule (forward+backward unless ``dense``)."""
    return build_schedule(circuit, tokens, **options).cost

