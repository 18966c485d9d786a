"""The immutable IR: ``Circuit`` (also the builder). ``Gate`` and dims inference live in
``gates.py``; ``Program``, ``Pattern``, ``ApplyRule`` and the options in ``program.py``;
all are re-exported here.

Semantics (see DESIGN.md): a gate on qudits ``(a, b, …)`` maps their current dims
``in_dims`` to ``out_dims``; its tensor has shape ``out_dims + in_dims``. The circuit
operator is ``T = G_K ⋯ G_1`` (first gate applied first). Equality ignores source spans.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

from .errors import QCError, Span, quoted
from .gates import (Dims, Gate, GateSpec, all_pairs_qudits, as_int, build_gates,  # noqa: F401
                    check_params, parse_dims, split_gate_dims)
from .limits import (MAX_DIM, MAX_FEATURES, MAX_GATES, MAX_PARAMS, MAX_QUDITS,  # noqa: F401
                     MAX_REPEAT)
from .program import (INIT_MODES, OPTION_DEFAULTS, ApplyRule, Pattern, Program,  # noqa: F401
                      check_option)

__all__ = ["Gate", "GateSpec", "Circuit", "build_gates", "check_params", "parse_dims",
           "all_pairs_qudits", "balanced_factors", "Pattern", "ApplyRule", "Program",
           "OPTION_DEFAULTS", "INIT_MODES", "check_option", "MAX_DIM", "MAX_QUDITS", "MAX_GATES",
           "MAX_PARAMS", "Dims"]


def balanced_factors(n: int, parts: int) -> Dims:
    """Factorise ``n`` into ``parts`` factors as equal as possible, largest first."""
    if n <= 0 or parts <= 0:
        raise QCError(f"cannot factorise {n} into {parts} factors")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    factors = [1] * parts
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors, reverse=True))


def _auto_dims(features: int, n: int, span: Span | None) -> Dims:
    """``features`` split into ``n`` balanced qudits, each of dim at least 2: a dim-1 qudit
    carries nothing and only multiplies the gates (``auto 64`` on 4096 features would be
    12 qudits of dim 2 and 52 of dim 1)."""
    if as_int(features) is None or not 0 < features <= MAX_FEATURES:
        raise QCError(f"a layer size must be a positive integer up to {MAX_FEATURES}, "
                      f"got {features!r}", span)
    dims = balanced_factors(features, n)
    if n > 1 and dims[-1] == 1:
        most = sum(1 for d in balanced_factors(features, MAX_QUDITS) if d > 1)
        raise QCError(f"cannot split {features} features into {n} qudits of dim 2 or more "
                      f"({features} has {most} prime factors)", span,
                      expected=f"qudits auto {max(most, 1)} or fewer")
    return dims


def _check_gates(dims: tuple, gates: tuple, auto: int | None,
                 span: Span | None) -> tuple[int | None, ...]:
    """Gates given to ``Circuit(...)`` directly must fit its wires; return the final wires."""
    current = list(dims)
    n = auto if auto is not None else len(dims)
    for g in gates:
        if not isinstance(g, Gate):
            raise QCError(f"a circuit's gates must be Gate objects, got {g!r}", span)
        if max(g.qudits) >= n:
            raise QCError(f"gate on {g.qudits}: qudit out of range for {n} qudits", g.span or span)
        if (auto is not None) != (not g.in_dims):
            raise QCError("auto circuits take gates without dims, others gates with dims",
                          g.span or span)
        for q, i, o in zip(g.qudits, g.in_dims, g.out_dims):
            if current[q] is not None and current[q] != i:
                raise QCError(f"gate on {g.qudits} expects dim {i} on qudit {q}, "
                              f"which carries {current[q]}", g.span or span)
            current[q] = o
    return tuple(current)

def _check_auto_outputs(circuit: "Circuit", ins: Dims, outs: Dims, out_features: int) -> None:
    """In an auto circuit the last gate on a qudit gives it the layer's output dim: one that
    writes another, or a qudit that must change dim with no gate on it, is an error here."""
    last: dict[int, Gate] = {}
    for g in circuit.gates:
        last.update((q, g) for q in g.qudits)
    for q in range(circuit.num_qudits):
        g = last.get(q)
        if g is None and ins[q] != outs[q]:
            raise QCError(f"qudit {q} must go from dim {ins[q]} to {outs[q]} but no gate acts on "
                          "it", circuit.span, expected=f"a gate on qudit {q}")
        if g is not None and g.out_dims and g.out_dims[g.qudits.index(q)] != outs[q]:
            wrote = g.out_dims[g.qudits.index(q)]
            split = f" ({' x '.join(map(str, outs))})" if len(outs) > 1 else ""
            raise QCError(f"the last gate on qudit {q} writes output dim {wrote}, but the layer's "
                          f"{out_features} output features{split} give qudit {q} dim {outs[q]}",
                          g.span or circuit.span,
                          expected="no output dims on the last gate of each qudit")


def _one_dim(d: object, span: Span | None) -> int:
    dims = parse_dims(d, span)  # type: ignore[arg-type]
    if len(dims) != 1:
        raise QCError(f"one dim per qudit, got {d!r}", span)
    return dims[0]


def _specs_of(gates: Sequence[Gate]) -> list[GateSpec]:
    """Gates back as specs (dims kept where known), to replay through the builder."""
    return [GateSpec(g.qudits, g.in_dims or None, g.out_dims or None, g.span) for g in gates]


@dataclass(frozen=True, init=False)
class Circuit:
    """An immutable circuit, and its builder: every method returns a new ``Circuit``.

    ``Circuit(16, 8, 8, 4)`` fixes the input dims; ``Circuit()`` learns each qudit's dims
    from its first gate; ``Circuit.auto_dims(n)`` leaves them to be factorised from the layer
    it is bound to (``resolve``).
    """

    dims: tuple[int | None, ...]
    gates: tuple[Gate, ...]
    auto: int | None
    span: Span | None = field(compare=False, repr=False)
    learns: bool = field(compare=False, repr=False)
    _wires: tuple = field(compare=False, repr=False)  # dims after the last gate

    def __init__(self, *dims: int, gates: Sequence[Gate] = (), auto: int | None = None,
                 span: Span | None = None, learns: bool | None = None,
                 _wires: tuple | None = None):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if len(dims) > MAX_QUDITS:
            raise QCError(f"too many qudits: {len(dims)} (at most {MAX_QUDITS})", span)
        checked = tuple(None if d is None else _one_dim(d, span) for d in dims)
        if auto is not None and (dims or as_int(auto) is None or not 0 < auto <= MAX_QUDITS):
            raise QCError(f"an auto circuit takes a qudit count from 1 to {MAX_QUDITS} and no "
                          f"dims, got {quoted(auto)}", span)
        gates = tuple(gates)
        if _wires is None:  # builder methods pass the wires they already checked
            _wires = _check_gates(checked, gates, auto, span)
        if len(gates) > MAX_GATES:
            raise QCError(f"too many gates: {len(gates)} (at most {MAX_GATES} per circuit)",
                          gates[MAX_GATES].span or span)
        object.__setattr__(self, "_wires", _wires)
        object.__setattr__(self, "dims", checked)
        object.__setattr__(self, "gates", gates)
        object.__setattr__(self, "auto", auto)
        object.__setattr__(self, "span", span)
        object.__setattr__(self, "learns", (not dims and auto is None) if learns is None else learns)

    @classmethod
    def auto_dims(cls, n: int) -> "Circuit":
        """A circuit on ``n`` qudits (1 to ``MAX_QUDITS``) whose dims come from the layer at
        bind time."""
        if as_int(n) is None or not 0 < as_int(n) <= MAX_QUDITS:
            raise QCError(f"Circuit.auto_dims takes a qudit count from 1 to {MAX_QUDITS}, "
                          f"got {quoted(n)}")
        return cls(auto=as_int(n))

    # --- shape -----------------------------------------------------------------------
    @property
    def num_qudits(self) -> int:
        return self.auto if self.auto is not None else len(self.dims)

    @property
    def is_auto(self) -> bool:
        return self.auto is not None

    def check_complete(self) -> None:
        """Raise ``QCError`` unless every qudit has known dims (not auto, none unlearnt)."""
        if self.auto is not None:
            raise QCError(f"this circuit has 'qudits auto {self.auto}': bind it to a layer first "
                          "(Circuit.resolve(in_features, out_features))", self.span)
        for q, d in enumerate(self.dims):
            if d is None:
                raise QCError(f"qudit {q} has no dims: no gate gives them", self.span)

    @property
    def in_dims(self) -> Dims:
        self.check_complete()
        return self.dims  # type: ignore[return-value]

    @property
    def out_dims(self) -> Dims:
        self.check_complete()
        return self._wires

    @property
    def in_features(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_dims)

    @property
    def params_per_gate(self) -> tuple[int, ...]:
        self.check_complete()
        return tuple(g.num_params for g in self.gates)

    @property
    def num_params(self) -> int:
        return sum(self.params_per_gate)

    # --- builder -----------------------------------------------------------------------
    def _with(self, specs: Sequence[GateSpec]) -> "Circuit":
        if len(self.gates) + len(specs) > MAX_GATES:
            raise QCError(f"too many gates (at most {MAX_GATES} per circuit)")
        if self.auto is not None:
            for s in specs:
                if s.in_dims is not None:
                    raise QCError("an auto circuit takes its input dims from the layer: give a "
                                  "gate no dims, or output dims only (out=8)", s.span)
                build_gates([1] * self.auto, [s])  # checks qudits and the output dims' count
            new = tuple(Gate(tuple(s.qudits), (), s.out_dims or (), s.span) for s in specs)
            return Circuit(gates=self.gates + new, auto=self.auto, span=self.span, _wires=())
        wires = list(self.out_dims_partial())
        if self.learns:  # Circuit(): qudits appear as gates name them
            top = max((q for s in specs for q in s.qudits if isinstance(q, int)), default=-1)
            if top >= MAX_QUDITS:
                raise QCError(f"qudit {top} out of range (at most {MAX_QUDITS} qudits)")
            wires += [None] * (top + 1 - len(wires))
        learnt, gates = build_gates(wires, specs)
        dims = tuple(learnt[q] if q >= len(self.dims) or self.dims[q] is None else self.dims[q]
                     for q in range(len(learnt)))
        final = [learnt[q] if w is None else w for q, w in enumerate(wires)]
        for g in gates:
            for q, d in zip(g.qudits, g.out_dims):
                final[q] = d
        return Circuit(*dims, gates=self.gates + gates, span=self.span, learns=self.learns,
                       _wires=tuple(final))

    def out_dims_partial(self) -> tuple[int | None, ...]:
        """Current dims of every wire, ``None`` where not yet learnt (builder use)."""
        return self._wires

    def gate(self, qudits: Sequence[int] | int, dims: str | Sequence[int] | None = None,
             out: str | Sequence[int] | None = None) -> "Circuit":
        """Append a gate. ``dims`` (``"16x16"``, ``"16x16 -> 16x43"`` or a tuple) are
        checked against the wires; ``out`` gives new output dims (default: unchanged)."""
        if as_int(qudits) is not None:
            qudits = (as_int(qudits),)
        elif isinstance(qudits, (str, bytes)) or not hasattr(qudits, "__iter__"):
            raise QCError(f"a gate's qudits are a tuple of indices, got {quoted(qudits)}")
        given = tuple(itertools.islice(qudits, MAX_QUDITS + 1))
        if len(given) > MAX_QUDITS or any(as_int(q) is None or as_int(q) < 0 for q in given):
            raise QCError(f"a gate's qudits are up to {MAX_QUDITS} non-negative integer "
                          f"indices, got {quoted(given)}")
        qudits = tuple(as_int(q) for q in given)
        ins, outs = split_gate_dims(dims, out)
        return self._with([GateSpec(qudits, ins, outs)])

    def all_pairs(self) -> "Circuit":
        """One square gate on every pair of qudits, in the paper's reference order."""
        return self._with([GateSpec(p) for p in all_pairs_qudits(self.num_qudits)])

    def then(self, other: "Circuit") -> "Circuit":
        """This circuit followed by ``other``'s gates (on the same qudits)."""
        if not isinstance(other, Circuit):
            raise QCError(f"then() takes a Circuit, got {type(other).__name__}")
        return self._with(_specs_of(other.gates))

    def repeat(self, k: int) -> "Circuit":
        """The gate sequence played ``k`` times."""
        if as_int(k) is None or not 1 <= k <= MAX_REPEAT:
            raise QCError(f"repeat count must be an integer from 1 to {MAX_REPEAT}, got "
                          f"{quoted(k)}")
        if len(self.gates) * k > MAX_GATES:
            raise QCError(f"too many gates: {len(self.gates)} x {k} (at most {MAX_GATES})")
        return self._with(_specs_of(self.gates) * (k - 1))

    def resolve(self, in_features: int, out_features: int | None = None) -> "Circuit":
        """Bind to a layer of that size: auto dims are factorised (balanced); a concrete
        circuit is checked against the sizes. A qudit changes dim at its last gate."""
        out_features = in_features if out_features is None else out_features
        if self.auto is None:
            if (self.in_features, self.out_features) != (in_features, out_features):
                raise QCError(
                    f"circuit {' '.join(map(str, self.in_dims))} -> "
                    f"{' '.join(map(str, self.out_dims))} ({self.in_features} -> "
                    f"{self.out_features} features) does not fit a {in_features} -> "
                    f"{out_features} layer", self.span)
            return self
        ins = _auto_dims(in_features, self.auto, self.span)
        outs = _auto_dims(out_features, self.auto, self.span)
        _check_auto_outputs(self, ins, outs, out_features)
        specs = [GateSpec(g.qudits, None, g.out_dims or None, g.span) for g in self.gates]
        dims, gates = build_gates(list(ins), specs, outs)
        check_params(gates, self.span)
        return Circuit(*dims, gates=gates, span=self.span)

    @classmethod
    def low_rank(cls, rank: int, in_dim: int | None = None,
                 out_dim: int | None = None) -> "Circuit":
        """LoRA's form on one qudit: ``in -> rank -> out`` (``low_rank R`` in text). Without
        ``in_dim`` the dims come from the layer (``qudits auto 1``); ``out_dim`` defaults to
        ``in_dim``."""
        rank = _one_dim(rank, None)
        if in_dim is None:
            if out_dim is not None:
                raise QCError("Circuit.low_rank: give in_dim with out_dim (or neither)")
            return cls.auto_dims(1).gate(0, out=rank).gate(0)
        out_dim = in_dim if out_dim is None else out_dim
        return cls(in_dim).gate(0, out=rank).gate(0, out=out_dim)

    # --- views -------------------------------------------------------------------------
    def to_qc(self, name: str = "c") -> str:
        """Canonical ``.qc`` text that parses back to an equal circuit."""
        from .printer import circuit_to_qc
        return circuit_to_qc(self, name)

    def diagram(self, width: int = 100) -> str:
        """A terminal drawing: one wire per qudit, a box per gate, long circuits wrapped."""
        from .diagram import text_diagram
        return text_diagram(self, width=width)

    def draw(self, path: str) -> None:
        """Write the diagram as SVG or PNG (by the file's suffix)."""
        from .diagram import draw
        draw(self, path)

    def _repr_svg_(self) -> str:
        from .diagram import svg
        return svg(self)

    def summary(self, max_gates: int = 50) -> str:
        """Qudits, features, parameters per gate and in total."""
        from .printer import circuit_summary
        return circuit_summary(self, max_gates)
