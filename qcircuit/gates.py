"""Gates and how their dims follow from the wires: ``Gate``, ``GateSpec`` (a gate as
written), ``build_gates`` (infer and check every gate's dims), ``parse_dims``,
``check_params`` and the ``all_pairs`` order. ``Circuit`` (in ``ir.py``) is built on these.
"""
from __future__ import annotations

import itertools
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .errors import QCError, Span, quoted
from .limits import MAX_DIM, MAX_PARAMS, MAX_QUDITS

__all__ = ["Dims", "Gate", "GateSpec", "build_gates", "check_params", "parse_dims",
           "all_pairs_qudits"]

Dims = tuple[int, ...]

def as_int(value: object) -> int | None:
    """``value`` as an int (numpy ints too), or None; bools are not ints here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class Gate:
    """A dense gate on ``qudits``. In an auto circuit (dims unknown until bound) ``in_dims`` is
    ``()``, and so is ``out_dims`` unless the gate names its output dims (``gate (0) -> 8``)."""

    qudits: tuple[int, ...]
    in_dims: Dims
    out_dims: Dims
    span: Span | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        qs = self.qudits
        if (not isinstance(qs, tuple) or not qs or len(set(qs)) != len(qs)
                or any(as_int(q) is None or q < 0 for q in qs)):
            raise QCError(f"a gate needs distinct non-negative qudit indices, got {qs!r}", self.span)
        for dims in (self.in_dims, self.out_dims):
            if (not isinstance(dims, tuple) or len(dims) not in (0, len(qs))
                    or any(as_int(d) is None or d <= 0 for d in dims)
                    or (self.in_dims and len(self.in_dims) != len(self.out_dims))):
                raise QCError(f"gate on {qs} has bad dims {self.in_dims!r} -> {self.out_dims!r}",
                              self.span, expected=f"{len(qs)} positive dims in and out")

    @property
    def arity(self) -> int:
        return len(self.qudits)

    @property
    def shape(self) -> Dims:
        """Tensor shape: outputs first, then inputs, both in ``qudits`` order."""
        return self.out_dims + self.in_dims

    @property
    def in_size(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_dims)

    @property
    def num_params(self) -> int:
        return self.in_size * self.out_size

    @property
    def is_square(self) -> bool:
        return self.in_dims == self.out_dims


def parse_dims(text: str | Sequence[int] | int, span: Span | None = None) -> Dims:
    """``"16x43"`` or ``(16, 43)`` or ``16`` -> ``(16, 43)``; every dim must be positive."""
    if isinstance(text, str):
        parts = text.strip().lower().split("x")
        if len(parts) > 2 * MAX_QUDITS or not all(re.fullmatch(r"\s*-?\d{1,9}\s*", p) for p in parts):
            raise QCError(f"bad dims {quoted(text)}", span, expected="dims like 16x8")
        values: tuple = tuple(int(p) for p in parts)
    elif as_int(text) is not None:
        values = (as_int(text),)
    else:
        try:
            values = tuple(itertools.islice(text, 2 * MAX_QUDITS + 1))  # type: ignore[arg-type]
        except TypeError:
            raise QCError(f"bad dims {quoted(text)}", span,
                          expected="dims like 16x8 or (16, 8)") from None
        if len(values) > 2 * MAX_QUDITS:
            raise QCError(f"too many dims (at most {MAX_QUDITS} per side)", span)
    dims = tuple(as_int(d) for d in values)
    for d, v in zip(dims, values):
        if d is None or d <= 0:
            raise QCError(f"dims must be positive integers, got {quoted(v)}", span)
        if d > MAX_DIM:
            raise QCError(f"dim {d} is too large (at most {MAX_DIM})", span)
    return dims  # type: ignore[return-value]


def split_gate_dims(dims, out) -> tuple[Dims | None, Dims | None]:
    if isinstance(dims, str) and "->" in dims:
        if out is not None:
            raise QCError("give output dims either after '->' or as out=, not both")
        left, right = dims.split("->", 1)
        return parse_dims(left), parse_dims(right)
    return (None if dims is None else parse_dims(dims)), (None if out is None else parse_dims(out))


@dataclass(frozen=True)
class GateSpec:
    """A gate as written: qudits, and dims only where the author wrote them."""

    qudits: tuple[int, ...]
    in_dims: Dims | None = None
    out_dims: Dims | None = None
    span: Span | None = field(default=None, compare=False)
    dims_span: Span | None = field(default=None, compare=False)  # where dims were written


def build_gates(
    wires: Sequence[int | None],
    specs: Iterable[GateSpec],
    out_dims: Sequence[int] | None = None,
    out_spans: Sequence[Span] | None = None,
) -> tuple[tuple[int | None, ...], tuple[Gate, ...]]:
    """Infer and check every gate's dims from the wires; return ``(in_dims, gates)``.

    A dim left unwritten is taken from the wire. A wire with unknown dim (``None``)
    learns it from the first gate that names it. With declared ``out_dims``, the last
    gate on a qudit maps it to its declared output dim unless that gate says otherwise;
    the circuit's final dims must equal ``out_dims`` (errors point at ``out_spans``).
    """
    specs = list(specs)
    in_dims = list(wires)
    current = list(wires)
    last_on: dict[int, int] = {}
    for k, spec in enumerate(specs):
        if not spec.qudits:
            raise QCError("a gate needs at least one qudit", spec.span)
        if len(set(spec.qudits)) != len(spec.qudits):
            raise QCError(f"qudit repeated in gate {spec.qudits}", spec.span, expected="distinct qudits")
        for q in spec.qudits:
            if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                raise QCError(f"qudit index must be a non-negative integer, got {q!r}", spec.span)
            last_on[q] = k
    gates = []
    for k, spec in enumerate(specs):
        for name, written in (("input", spec.in_dims), ("output", spec.out_dims)):
            if written is not None and len(written) != len(spec.qudits):
                raise QCError(
                    f"gate on {len(spec.qudits)} qudits written with {len(written)} {name} dims",
                    spec.dims_span or spec.span, expected=f"{len(spec.qudits)} dims")
        for q in spec.qudits:
            if q >= len(current):
                raise QCError(f"qudit {q} out of range: the circuit has {len(current)} qudits "
                              f"(0..{len(current) - 1})", spec.span)
        ins = []
        for i, q in enumerate(spec.qudits):
            written = spec.in_dims[i] if spec.in_dims is not None else None
            if current[q] is None:
                if written is None:
                    raise QCError(f"qudit {q} has no dims yet: write them on its first gate", spec.span,
                                  expected="dims like 16x16")
                current[q] = in_dims[q] = written
            elif written is not None and written != current[q]:
                raise QCError(
                    f"gate dims {'x'.join(map(str, spec.in_dims))} disagree with the wires: "
                    f"qudit {q} carries dim {current[q]}", spec.dims_span or spec.span,
                    expected="x".join(str(current[p]) for p in spec.qudits))
            ins.append(current[q])
        if spec.out_dims is not None:
            outs = list(spec.out_dims)
        elif out_dims is not None:
            outs = [out_dims[q] if last_on[q] == k else current[q] for q in spec.qudits]
        else:
            outs = list(ins)
        for q, d in zip(spec.qudits, outs):
            current[q] = d
        gates.append(Gate(tuple(spec.qudits), tuple(ins), tuple(outs), spec.span))
    if out_dims is not None and tuple(current) != tuple(out_dims):
        bad = [q for q in range(len(current)) if current[q] != out_dims[q]]
        span = out_spans[bad[0]] if out_spans else (specs[-1].span if specs else None)
        raise QCError(
            f"declared output dims {' '.join(map(str, out_dims))} are not reached: the gates end "
            f"with {' '.join(map(str, current))} (qudit {bad[0]})", span)
    return tuple(in_dims), tuple(gates)


def all_pairs_qudits(n: int) -> list[tuple[int, int]]:
    """The paper's reference order: ``(i, j)``, ``i < j``, by ``j`` then ``i`` descending."""
    return [(i, j) for j in range(n - 1, 0, -1) for i in range(j - 1, -1, -1)]


def check_params(gates: Sequence[Gate], span: Span | None = None) -> None:
    """At most ``MAX_PARAMS`` parameters in all; the error points at the gate that crosses
    the limit. Checked where text or a layer decides the dims (parsing, ``resolve``) and
    before anything is allocated; the builder itself draws circuits of any size."""
    total = 0
    for g in gates:
        total += g.num_params
        if total > MAX_PARAMS:
            shape = f"{'x'.join(map(str, g.in_dims))} -> {'x'.join(map(str, g.out_dims))}"
            raise QCError(f"too many parameters: the gate on {g.qudits} ({shape}) brings the "
                          f"circuit to {total}, over the limit of {MAX_PARAMS} "
                          f"(2**{MAX_PARAMS.bit_length() - 1})", g.span or span)
