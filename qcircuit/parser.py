"""``.qc`` text -> ``Program``: syntax (``syntax.py``), then meaning, checked here.

Decisions worth knowing:

- A circuit must have a ``qudits`` line (the grammar requires it) and at least one gate.
- Names are unique: a circuit or an option defined twice (also across includes) is an error.
- ``apply`` may name a circuit defined later in the program.
- ``include "f.qc"`` is read relative to the including file (or ``base_dir``/cwd for a
  string); its circuits, rules and options join the program where it is written.
- Limits, each a clear error: dims 1..2**20, at most 64 qudits, repeat counts 1..10000,
  repeat nesting 32 deep, 100000 gates per circuit, includes 32 deep.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import QCError, Span
from .ir import OPTION_DEFAULTS, Circuit, ApplyRule, Gate, GateSpec, Pattern, Program
from .ir import MAX_DIM, MAX_GATES, MAX_QUDITS, all_pairs_qudits, build_gates, check_option
from .syntax import (AllPairsNode, ApplyNode, CircuitNode, GateNode, IncludeNode, OptionNode,
                     QuditsAuto, RepeatNode, Tok, parse_ast)

MAX_REPEAT = 10_000
MAX_DEPTH = 32
MAX_INCLUDE_DEPTH = 32

__all__ = ["parse", "parse_file", "MAX_DIM", "MAX_QUDITS", "MAX_REPEAT", "MAX_GATES"]


def parse(text: str, file: str | None = None, base_dir: str | os.PathLike | None = None) -> Program:
    """Parse ``.qc`` text. ``file`` names it in errors; includes resolve against
    ``base_dir``, else the directory of ``file``, else the current directory."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text), file, None)
    if not isinstance(text, str):
        raise QCError(f"parse() takes .qc text, got {type(text).__name__}")
    if base_dir is None:
        base_dir = os.path.dirname(file) if file else os.getcwd()
    state = _State()
    if file:
        state.stack.append(os.path.realpath(file))
    state.add_items(parse_ast(text, file), str(base_dir))
    return state.program()


def parse_file(path: str | os.PathLike) -> Program:
    """Read and parse a ``.qc`` file (UTF-8)."""
    path = os.fspath(path)
    return parse(_read(path, None), file=path)


def _read(path: str, span: Span | None) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise QCError(f"cannot read {path!r}: {err.strerror or err}", span) from None
    return _decode(data, path, span)


def _decode(data: bytes, file: str | None, span: Span | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start].decode("utf-8")
        line_start = before.rfind("\n") + 1
        source = data.split(b"\n")[before.count("\n")].decode("utf-8", "replace")
        where = Span(file, before.count("\n") + 1, len(before) - line_start + 1, source)
        raise QCError("the file is not UTF-8 text", where, expected="UTF-8 text") from None


def _int(tok: Tok, what: str, low: int, high: int, text: str | None = None,
         column: int | None = None) -> int:
    """A bounded integer from (part of) a token, with an error pointing at it."""
    text = tok.text if text is None else text
    span = tok.span if column is None else Span(tok.span.file, tok.span.line, column,
                                                 tok.span.source_line)
    digits = text.lstrip("-")
    if not digits.isdigit():
        raise QCError(f"{what} must be an integer, got {text!r}", span, expected="an integer")
    if len(digits) > 9:
        raise QCError(f"{what} {text[:12]}… is too large (at most {high})", span)
    value = int(text)
    if value < low:
        raise QCError(f"{what} must be at least {low}, got {value}", span)
    if value > high:
        raise QCError(f"{what} {value} is too large (at most {high})", span)
    return value


def _dims(tok: Tok) -> tuple[int, ...]:
    """``16x43`` -> ``(16, 43)``, each dim checked where it is written."""
    dims, offset = [], 0
    for part in re.split("[xX]", tok.text):
        dims.append(_int(tok, "a dim", 1, MAX_DIM, part, tok.span.column + offset))
        offset += len(part) + 1
    return tuple(dims)


def _wire(tok: Tok) -> int:
    dims = _dims(tok)
    if len(dims) != 1:
        raise QCError("a qudits line takes one dim per qudit", tok.span,
                      expected=" ".join(map(str, dims)))
    return dims[0]


def _circuit(node: CircuitNode) -> Circuit:
    name = node.name.text
    if isinstance(node.qudits, QuditsAuto):
        n = _int(node.qudits.count, "the qudit count", 1, MAX_QUDITS)
        ins = outs = out_spans = None
    else:
        if len(node.qudits.ins) > MAX_QUDITS:
            raise QCError(f"too many qudits (at most {MAX_QUDITS})", node.qudits.ins[MAX_QUDITS].span)
        ins = [_wire(t) for t in node.qudits.ins]
        outs, out_spans, n = None, None, len(ins)
        if node.qudits.outs is not None:
            out_toks = node.qudits.outs
            if len(out_toks) != n:
                where = out_toks[min(n, len(out_toks) - 1)].span
                raise QCError(f"{len(out_toks)} output dims declared for {n} qudits", where,
                              expected=f"{n} output dims")
            outs = [_wire(t) for t in out_toks]
            out_spans = [t.span for t in out_toks]
    specs = _expand(node.body, n, ins is None, 0)
    if not specs:
        raise QCError(f"circuit {name!r} has no gates", node.name.span,
                      expected="'gate', 'all_pairs' or 'repeat' in its body")
    if ins is None:
        gates = tuple(Gate(s.qudits, (), (), s.span) for s in specs)
        return Circuit(gates=gates, auto=n, span=node.span)
    dims, gates = build_gates(ins, specs, outs, out_spans)
    return Circuit(*dims, gates=gates, span=node.span)


def _expand(body: tuple, n: int, auto: bool, depth: int) -> list[GateSpec]:
    """The statements of a circuit body as a flat list of gate specs."""
    specs: list[GateSpec] = []
    for stmt in body:
        if isinstance(stmt, GateNode):
            specs.append(_gate(stmt, n, auto))
        elif isinstance(stmt, AllPairsNode):
            if n < 2:
                raise QCError("all_pairs needs at least 2 qudits", stmt.span)
            specs += [GateSpec(p, span=stmt.span) for p in all_pairs_qudits(n)]
        elif isinstance(stmt, RepeatNode):
            k = _int(stmt.count, "the repeat count", 1, MAX_REPEAT)
            if depth + 1 > MAX_DEPTH:
                raise QCError(f"repeat nested too deep (at most {MAX_DEPTH})", stmt.span)
            inner = _expand(stmt.body, n, auto, depth + 1)
            if not inner:
                raise QCError("repeat has no gates in its body", stmt.span,
                              expected="'gate', 'all_pairs' or 'repeat'")
            if len(specs) + k * len(inner) > MAX_GATES:
                raise QCError(f"too many gates (at most {MAX_GATES} per circuit)", stmt.span)
            specs += inner * k
        if len(specs) > MAX_GATES:
            raise QCError(f"too many gates (at most {MAX_GATES} per circuit)", stmt.span)
    return specs


def _gate(node: GateNode, n: int, auto: bool) -> GateSpec:
    qudits: list[int] = []
    for tok in node.qudits:
        q = _int(tok, "a qudit index", 0, MAX_QUDITS)
        if q >= n:
            raise QCError(f"qudit {q} out of range: the circuit has {n} qudits", tok.span,
                          expected=f"a qudit index 0..{n - 1}")
        if q in qudits:
            raise QCError(f"qudit {q} repeated in one gate", tok.span, expected="distinct qudits")
        qudits.append(q)
    written = [t for t in (node.ins, node.outs) if t is not None]
    if auto and written:
        raise QCError("a 'qudits auto' circuit takes its dims from the layer: write the gate "
                      "without dims", written[0].span)
    dims = []
    for tok in (node.ins, node.outs):
        d = None if tok is None else _dims(tok)
        if d is not None and len(d) != len(qudits):
            raise QCError(f"{len(d)} dims written for a gate on {len(qudits)} qudits", tok.span,
                          expected=f"{len(qudits)} dims like " + "x".join(["16"] * len(qudits)))
        dims.append(d)
    return GateSpec(tuple(qudits), dims[0], dims[1], node.span,
                    dims_span=written[0].span if written else None)


class _State:
    """What the program has so far, while items (and includes) are added in order."""

    def __init__(self):
        self.circuits: dict[str, tuple[Circuit, Span]] = {}
        self.rules: list[ApplyRule] = []
        self.options: dict[str, tuple[object, Span]] = {}
        self.stack: list[str] = []  # real paths of the files being read (include cycles)

    def add_items(self, items: tuple, base_dir: str) -> None:
        for item in items:
            if isinstance(item, CircuitNode):
                self.add_circuit(item)
            elif isinstance(item, ApplyNode):
                self.rules.append(ApplyRule(item.name.text,
                                            tuple(_pattern(p) for p in item.patterns), item.span))
            elif isinstance(item, OptionNode):
                self.add_option(item)
            elif isinstance(item, IncludeNode):
                self.include(item, base_dir)

    def add_circuit(self, node: CircuitNode) -> None:
        name = node.name.text
        if name in self.circuits:
            raise QCError(f"circuit {name!r} is already defined (at "
                          f"{self.circuits[name][1].at()})", node.name.span,
                          expected="a new circuit name")
        self.circuits[name] = (_circuit(node), node.name.span)

    def add_option(self, node: OptionNode) -> None:
        key = node.key.text
        if key not in OPTION_DEFAULTS:
            raise QCError(f"unknown option {key!r}", node.key.span,
                          expected=" or ".join(OPTION_DEFAULTS))
        if key in self.options:
            raise QCError(f"option {key!r} is already set (at {self.options[key][1].at()})",
                          node.key.span)
        value: object = float(node.value.text) if node.numeric else node.value.text
        self.options[key] = (check_option(key, value, node.value.span), node.key.span)

    def include(self, node: IncludeNode, base_dir: str) -> None:
        path = os.path.normpath(os.path.join(base_dir, node.path.text))
        real = os.path.realpath(path)
        if real in self.stack:
            chain = " -> ".join(os.path.basename(p) for p in self.stack[self.stack.index(real):])
            raise QCError(f"include cycle: {chain} -> {os.path.basename(real)}", node.path.span)
        if len(self.stack) >= MAX_INCLUDE_DEPTH:
            raise QCError(f"includes nested too deep (at most {MAX_INCLUDE_DEPTH})", node.path.span)
        if not os.path.isfile(path):
            raise QCError(f"include file {node.path.text!r} not found (looked for {path})",
                          node.path.span)
        text = _read(path, node.path.span)
        self.stack.append(real)
        self.add_items(parse_ast(text, path), os.path.dirname(path))
        self.stack.pop()

    def program(self) -> Program:
        return Program({k: c for k, (c, _) in self.circuits.items()}, tuple(self.rules),
                       {k: v for k, (v, _) in self.options.items()})


def _pattern(tok: Tok) -> Pattern:
    if not tok.text.startswith("/"):
        return Pattern(tok.text, span=tok.span)
    pattern = Pattern(tok.text[1:-1], regex=True, span=tok.span)
    try:
        re.compile(pattern.text)
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        why = "nested too deep" if isinstance(err, RecursionError) else getattr(err, "msg", err)
        raise QCError(f"bad regex: {why}", tok.span,
                      expected="a Python regular expression") from None
    return pattern
