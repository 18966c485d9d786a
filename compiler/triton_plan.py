"""Plans for the ``triton`` route: a circuit's gates cut into fused passes, each with its tile.

A *pass* applies consecutive gates to tiles that stay on-chip from load to store. Its
qudit set ``S`` is the union of its gates' qudits; a tile holds ``S`` whole (dims padded to
powers of two, the padding loaded as zeros and never stored), some of the other qudits
("in-block", trailing ones first: contiguous memory) and ``tokens`` tokens; the remaining
qudits ("outer") are fixed per program. A tile is a register tensor with one axis per
token block and in-block qudit; each gate permutes those axes in registers so that its
qudits come first, multiplies by its ``(out, in)`` matrix and keeps the resulting order
(the next gate permutes from there; the store writes whatever order the last gate left).
No permute is ever materialised in memory.

Passes are grown greedily, gate by gate, while the tile still fits the on-chip budget, in
fp32 elements per program: a forward pass holds the state, a product and one gate; a
backward pass also holds the state before each of its gates (recomputed from the pass
input), the cotangent, and one gate-gradient accumulator per gate. A circuit is
*unsupported* (:func:`unsupported`) when one gate alone cannot fit.

Everything here is plain frozen data (the kernels take it as compile-time constants).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from qcircuit.ir import Circuit

FWD_BUDGET = 1 << 15     # fp32 elements on-chip per program, forward pass
BWD_BUDGET = 3 << 14     # the same for a backward pass (states, cotangent, gradients)
MAX_GATE = 1 << 14       # padded entries of one gate matrix (128 x 128)
MIN_DOT = 16             # tl.dot needs every side >= 16; smaller products multiply-add
MIN_TILES = 16           # a small bucket is cut into at least this many token blocks
MAX_TOKENS = 256         # tokens per tile, at most
MAX_AXES = 8             # register tensor rank: the token axis and up to 7 qudits
TOKEN = -1               # the token axis' label in an axis order


def pow2(n: int) -> int:
    """The next power of two (at least 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _strides(dims: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(dims):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


@dataclass(frozen=True)
class App:
    """One gate applied: ``gate`` indexes the run's gate list; a ``transposed`` application
    (the adjoint circuit) multiplies by the stored gate's transpose."""

    gate: int
    qudits: tuple[int, ...]
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    transposed: bool = False


def applications(circuit: Circuit) -> tuple[App, ...]:
    """The circuit's gates in order, as applications."""
    return tuple(App(k, g.qudits, g.in_dims, g.out_dims) for k, g in enumerate(circuit.gates))


def adjoint(apps: Sequence[App]) -> tuple[App, ...]:
    """The transposed circuit: gates reversed, each transposed (``Tᵀ = G_1ᵀ ⋯ G_Kᵀ``)."""
    return tuple(App(a.gate, a.qudits, a.out_dims, a.in_dims, not a.transposed)
                 for a in reversed(apps))


@dataclass(frozen=True)
class Axes:
    """Axes of a register tile or gate matrix, in order: extents (powers of two), real dims
    (0 on the token axis: the token count is known at run time) and element strides."""

    ext: tuple[int, ...]
    dim: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def unit(self) -> tuple[tuple[int, ...], ...]:
        """For each axis, the shape that broadcasts it along the others."""
        r = len(self.ext)
        return tuple(tuple(e if i == a else 1 for i in range(r)) for a, e in enumerate(self.ext))

    @property
    def size(self) -> int:
        return math.prod(self.ext)


def _gate_axes(dims: Sequence[int], scale: int) -> Axes:
    return Axes(tuple(pow2(d) for d in dims), tuple(dims),
                tuple(s * scale for s in _strides(dims)))


@dataclass(frozen=True)
class Fused:
    """One gate inside a pass: the register permute that brings its qudits first (``perm``;
    ``inv`` undoes it), the product's sides ``(pout, pin) @ (pin, n)``, the shapes before
    and after it, and the gate matrix's row and column axes in the stored tensor."""

    gate: int
    perm: tuple[int, ...]
    inv: tuple[int, ...]
    pin: int
    pout: int
    n: int
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    rows: Axes
    cols: Axes
    dot: bool
    size: int          # entries of the stored gate (its gradient's size)


@dataclass(frozen=True)
class Pass:
    """Fused gates over one tile shape: ``tokens`` per tile, the ``outer`` qudits' dims and
    strides in the input and output buffers, the load and store axes, the rows' lengths."""

    fused: tuple[Fused, ...]
    tokens: int
    outer: tuple[int, ...]
    outer_in: tuple[int, ...]
    outer_out: tuple[int, ...]
    load: Axes
    store: Axes
    in_features: int
    out_features: int
    elems: int         # largest state tile (elements)
    warps: int

    @property
    def blocks(self) -> int:
        """Tiles per token block (the outer qudits' index range)."""
        return math.prod(self.outer)

    def tiles(self, n: int) -> int:
        """Tiles for ``n`` tokens."""
        return -(-n // self.tokens) * self.blocks

    @property
    def gates(self) -> tuple[int, ...]:
        return tuple(f.gate for f in self.fused)


def _cost(tile: int, sizes: Sequence[int], temps: Sequence[int], backward: bool) -> int:
    """On-chip elements of a pass with state tiles of ``tile`` elements."""
    if backward:
        return (len(sizes) + 2) * tile + sum(sizes) + max(sizes) + max(temps)
    return 2 * tile + max(sizes) + max(temps)


def plan_pass(apps: Sequence[App], dims: Sequence[int], bucket: int, backward: bool,
              budget: int | None = None) -> Pass | None:
    """The pass applying ``apps`` to states of per-token ``dims``, for ``bucket`` tokens;
    ``None`` when no tile fits ``budget`` (default: the forward or backward budget)."""
    budget = budget or (BWD_BUDGET if backward else FWD_BUDGET)
    n_q = len(dims)
    stages = [tuple(dims)]
    for a in apps:
        d = list(stages[-1])
        for q, o in zip(a.qudits, a.out_dims):
            d[q] = o
        stages.append(tuple(d))
    on = sorted({q for a in apps for q in a.qudits})
    per_s = [math.prod(pow2(st[q]) for q in on) for st in stages]
    sizes = [math.prod(pow2(d) for d in a.out_dims) * math.prod(pow2(d) for d in a.in_dims)
             for a in apps]
    if max(sizes) > MAX_GATE:
        return None

    def fits(rows: int) -> bool:
        return _cost(max(per_s) * rows, sizes, temps(rows), backward) <= budget

    def temps(rows: int) -> list[int]:
        """Multiply-add temporaries of the small products (``pout·pin·n``)."""
        out = []
        for a, s_in, sz in zip(apps, per_s, sizes):
            pin = math.prod(pow2(d) for d in a.in_dims)
            n = s_in * rows // pin
            small = min(pin, sz // pin, n) < MIN_DOT
            out.append(sz * n if small else 0)
        return out

    # in-block candidates: qudits off the pass with power-of-two dims, trailing ones first
    cands = [q for q in reversed(range(n_q)) if q not in on and dims[q] == pow2(dims[q])]
    cands = cands[:MAX_AXES - 1 - len(on)]
    cap = min(MAX_TOKENS, max(1, pow2(bucket) // MIN_TILES))
    choices = []
    for k in range(len(cands) + 1):
        rest = math.prod(dims[q] for q in cands[:k])
        tokens = 1
        while tokens <= MAX_TOKENS:
            if fits(rest * tokens):
                small = sum(1 for t in temps(rest * tokens) if t)
                choices.append((tokens <= cap, -small, rest * tokens if tokens <= cap else -tokens,
                                k, tokens))
            tokens *= 2
    if len(on) + 1 > MAX_AXES or not choices:
        return None
    *_, k, tokens = max(choices)
    inblock = cands[:k]
    return _layout(apps, stages, on, sorted(inblock), tokens, sizes)


def _layout(apps: Sequence[App], stages: list[tuple[int, ...]], on: list[int],
            inblock: list[int], tokens: int, sizes: list[int]) -> Pass:
    """Register axis orders through the pass, gate descriptors, load and store axes."""
    first, last = stages[0], stages[-1]
    s_first, s_last = _strides(first), _strides(last)
    order = [TOKEN] + sorted(on + inblock)
    ext = {TOKEN: tokens, **{q: pow2(first[q]) for q in order[1:]}}
    load = Axes(tuple(ext[a] for a in order),
                tuple(0 if a == TOKEN else first[a] for a in order),
                tuple(math.prod(first) if a == TOKEN else s_first[a] for a in order))
    fused, elems = [], math.prod(ext.values())
    for a, size in zip(apps, sizes):
        perm = tuple(order.index(q) for q in a.qudits) + tuple(
            i for i, lab in enumerate(order) if lab not in a.qudits)
        others = [order[i] for i in perm[len(a.qudits):]]
        rest = math.prod(ext[o] for o in others)
        pin = math.prod(pow2(d) for d in a.in_dims)
        pout = math.prod(pow2(d) for d in a.out_dims)
        stored_out, stored_in = (a.in_dims, a.out_dims) if a.transposed else (a.out_dims, a.in_dims)
        out_axes = _gate_axes(stored_out, math.prod(stored_in))
        in_axes = _gate_axes(stored_in, 1)
        rows, cols = (in_axes, out_axes) if a.transposed else (out_axes, in_axes)
        small = min(pin, pout, rest) < MIN_DOT
        inv = tuple(perm.index(i) for i in range(len(perm)))
        shape_in = tuple(pow2(d) for d in a.in_dims) + tuple(ext[o] for o in others)
        for q, d in zip(a.qudits, a.out_dims):
            ext[q] = pow2(d)
        order = list(a.qudits) + others
        shape_out = tuple(ext[o] for o in order)
        fused.append(Fused(a.gate, perm, inv, pin, pout, rest, shape_in, shape_out, rows, cols,
                           not small, math.prod(a.in_dims) * math.prod(a.out_dims)))
        elems = max(elems, math.prod(shape_out))
    store = Axes(tuple(ext[o] for o in order),
                 tuple(0 if o == TOKEN else last[o] for o in order),
                 tuple(math.prod(last) if o == TOKEN else s_last[o] for o in order))
    outer = [q for q in range(len(first)) if q not in on and q not in inblock]
    warps = 8 if elems >= 4096 else 4
    return Pass(tuple(fused), tokens, tuple(first[q] for q in outer),
                tuple(s_first[q] for q in outer), tuple(s_last[q] for q in outer), load, store,
                math.prod(first), math.prod(last), elems, warps)


def partition(apps: Sequence[App], dims: Sequence[int], bucket: int,
              backward: bool, budget: int | None = None) -> tuple[Pass, ...]:
    """Consecutive gates grouped greedily into passes (each as long as its tile fits);
    raises ``ValueError`` when one gate alone does not fit."""
    passes: list[Pass] = []
    dims = list(dims)
    group: list[App] = []
    best: Pass | None = None
    for a in apps:
        trial = plan_pass(group + [a], dims, bucket, backward, budget)
        if trial is None and group:
            passes.append(best)
            for g in group:
                for q, o in zip(g.qudits, g.out_dims):
                    dims[q] = o
            group, trial = [], plan_pass([a], dims, bucket, backward, budget)
        if trial is None:
            raise ValueError(f"gate {a.gate} on qudits {a.qudits} does not fit the on-chip budget")
        group.append(a)
        best = trial
    if group:
        passes.append(best)
    return tuple(passes)


def unsupported(circuit: Circuit) -> str | None:
    """Why the triton route cannot run ``circuit``, or ``None`` when it can: every gate's
    matrix, dims padded to powers of two, must hold at most ``MAX_GATE`` entries (128×128)
    and fit a backward tile; a gate may touch at most ``MAX_AXES - 1`` qudits."""
    if not circuit.gates:
        return "a circuit without gates"
    dims = list(circuit.in_dims)
    for a in applications(circuit):
        size = math.prod(pow2(d) for d in a.out_dims) * math.prod(pow2(d) for d in a.in_dims)
        if size > MAX_GATE:
            return (f"gate {a.gate} on qudits {a.qudits} maps {'x'.join(map(str, a.in_dims))} -> "
                    f"{'x'.join(map(str, a.out_dims))}: its matrix (dims padded to powers of two) "
                    f"has {size} entries, more than the {MAX_GATE} that fit on-chip")
        if len(a.qudits) + 1 > MAX_AXES:
            return f"gate {a.gate} touches {len(a.qudits)} qudits (at most {MAX_AXES - 1})"
        if plan_pass([a], dims, 1, backward=True) is None:
            return f"gate {a.gate} on qudits {a.qudits} does not fit a backward tile on-chip"
        for q, o in zip(a.qudits, a.out_dims):
            dims[q] = o
    return None
