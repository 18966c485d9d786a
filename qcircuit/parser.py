"""``.qc`` text -> ``Program``: syntax (``syntax.py``), then meaning, checked here.

Decisions worth knowing:

- A circuit must have a ``qudits`` line (the grammar requires it, unless the circuit is a
  bare ``low_rank R``) and at least one gate.
- ``low_rank R`` is a whole circuit of one qudit (``gate (0) -> R``, ``gate (0)``); with other
  statements, or on several qudits, it is an error (no sum or product is guessed).
- An apply rule's ``with`` options are checked like ``option`` ones; a key twice in one
  ``with`` is an error.
- Names are unique: a circuit or an option defined twice (also across includes) is an error.
- ``apply`` may name a circuit defined later in the program.
- ``train PATTERN, …`` names modules trained whole beside the circuits (a task head), with
  ``apply``'s patterns; a pattern trained twice is an error.
- ``include "f.qc"`` is read relative to the including file (or ``base_dir``/cwd for a
  string); its circuits, rules and options join the program where it is written.
- ``include "f.qc"`` reads only regular ``.qc`` files, each real path once (its syntax tree
  is kept: an include diamond costs one read per file); cycles are refused. ``includes=False``
  (a program stored in a checkpoint) refuses every ``include``.
- Limits (``limits.py``), each a located error naming the limit, checked before the work it
  bounds: text size, includes, qudits, gates after expansion, repeat counts and nesting.
"""
from __future__ import annotations

import os
import re

from .errors import QCError, Span, quoted
from .ir import OPTION_DEFAULTS, Circuit, ApplyRule, Gate, GateSpec, Pattern, Program
from .ir import all_pairs_qudits, build_gates, check_option, check_params
from .limits import (MAX_DIM, MAX_GATES, MAX_INCLUDE_DEPTH, MAX_INCLUDES, MAX_QUDITS, MAX_REPEAT,
                     MAX_REPEAT_DEPTH, MAX_TOTAL_BYTES)
from .sources import check_size, decode, read_file
from .syntax import (AllPairsNode, ApplyNode, CircuitNode, GateNode, IncludeNode, LowRankNode,
                     OptionNode, QuditsAuto, QuditsFixed, RepeatNode, Tok, TrainNode, parse_ast)

__all__ = ["parse", "parse_file", "as_program", "MAX_DIM", "MAX_QUDITS", "MAX_REPEAT", "MAX_GATES"]


def parse(text: str, file: str | None = None, base_dir: str | os.PathLike | None = None, *,
          includes: bool = True) -> Program:
    """Parse ``.qc`` text. ``file`` names it in errors; includes resolve against
    ``base_dir``, else the directory of ``file``, else the current directory.
    ``includes=False`` is for text nobody vouches for (a program stored in a checkpoint):
    any ``include`` in it is an error, so it can never make the parser read a file."""
    if isinstance(text, (bytes, bytearray)):
        text = decode(bytes(text), file)
    if not isinstance(text, str):
        raise QCError(f"parse() takes .qc text, got {type(text).__name__}")
    check_size(text, file)
    if "\x00" in f"{file or ''}{os.fspath(base_dir or '')}":
        raise QCError("a file name cannot hold a NUL character")
    if base_dir is None:
        base_dir = os.path.dirname(file) if file else os.getcwd()
    state = _State(includes, len(text))
    if file:
        state.stack.append(os.path.realpath(file))
    state.add_items(parse_ast(text, file), str(base_dir))
    return state.program()


def parse_file(path: str | os.PathLike) -> Program:
    """Read and parse a ``.qc`` file (UTF-8, a regular file of at most ``MAX_TEXT_BYTES``)."""
    path = os.fspath(path)
    return parse(read_file(path, None), file=path)


def as_program(source: Program | str | os.PathLike, what: str = "a program") -> Program:
    """A ``Program`` from a ``Program``, a ``.qc`` path or ``.qc`` text, by one rule for
    every front door (``attach``, ``QuanTAConfig``): a ``PathLike``, or a string of one
    line that ends in ``.qc`` and holds no ``{``, is a path; any other string is text.
    ``what`` names the caller in the error for another type."""
    if isinstance(source, Program):
        return source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith(".qc")
                                           and not any(c in source for c in "\n\r{")):
        return parse_file(source)
    if isinstance(source, str):
        return parse(source)
    raise QCError(f"{what} takes a Program, a .qc path or .qc text, got "
                  f"{type(source).__name__}")


def _int(tok: Tok, what: str, low: int, high: int, text: str | None = None,
         column: int | None = None) -> int:
    """A bounded integer from (part of) a token, with an error pointing at it."""
    text = tok.text if text is None else text
    span = tok.span if column is None else Span(tok.span.file, tok.span.line, column,
                                                 tok.span.source_line)
    digits = text.lstrip("-")
    if not digits.isdigit():
        raise QCError(f"{what} must be an integer, got {quoted(text)}", span, expected="an integer")
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
    if isinstance(node.qudits, LowRankNode) or any(isinstance(s, LowRankNode) for s in node.body):
        return _low_rank(node)
    n, ins, outs, out_spans = _qudits(node.qudits)
    specs = _expand(node.body, n, ins is None, 0)
    if not specs:
        raise QCError(f"circuit {quoted(name)} has no gates", node.name.span,
                      expected="'gate', 'all_pairs', 'repeat' or 'low_rank' in its body")
    if ins is None:
        gates = tuple(Gate(s.qudits, (), s.out_dims or (), s.span) for s in specs)
        return Circuit(gates=gates, auto=n, span=node.span)
    dims, gates = build_gates(ins, specs, outs, out_spans)
    check_params(gates, node.span)
    return Circuit(*dims, gates=gates, span=node.span)


def _qudits(node: QuditsFixed | QuditsAuto) -> tuple[int, list | None, list | None, list | None]:
    """The qudits line: ``(count, input dims, output dims, spans of the output dims)``;
    dims are ``None`` for ``qudits auto N`` (and outputs when none are declared)."""
    if isinstance(node, QuditsAuto):
        return _int(node.count, "the qudit count", 1, MAX_QUDITS), None, None, None
    if len(node.ins) > MAX_QUDITS:
        raise QCError(f"too many qudits (at most {MAX_QUDITS})", node.ins[MAX_QUDITS].span)
    ins = [_wire(t) for t in node.ins]
    n = len(ins)
    if node.outs is None:
        return n, ins, None, None
    if len(node.outs) != n:
        where = node.outs[min(n, len(node.outs) - 1)].span
        raise QCError(f"{len(node.outs)} output dims declared for {n} qudits", where,
                      expected=f"{n} output dims")
    return n, ins, [_wire(t) for t in node.outs], [t.span for t in node.outs]


def _low_rank(node: CircuitNode) -> Circuit:
    """``low_rank R``: one qudit, ``gate (0) -> R`` then ``gate (0)`` (in -> R -> out). It is
    the whole circuit: alone, or after ``qudits auto 1`` or a one-qudit ``qudits D [-> E]``."""
    if isinstance(node.qudits, LowRankNode):
        stmt, others, head = node.qudits, node.body, None
    else:
        stmt = next(s for s in node.body if isinstance(s, LowRankNode))
        others, head = tuple(s for s in node.body if s is not stmt), node.qudits
    if others:
        raise QCError("low_rank is a whole circuit (gate (0) -> R, then gate (0)) and cannot be "
                      "mixed with other statements", others[0].span,
                      expected="'}' after 'low_rank R', or the gates written out on "
                               "'qudits auto 1'")
    n, ins, outs, out_spans = (1, None, None, None) if head is None else _qudits(head)
    if n != 1:
        raise QCError(f"low_rank needs a circuit of one qudit (the whole layer), this one has "
                      f"{n}", stmt.span, expected="no qudits line, 'qudits auto 1' or "
                      "'qudits D -> E' before 'low_rank R'")
    rank = _int(stmt.rank, "the rank", 1, MAX_DIM)
    specs = [GateSpec((0,), None, (rank,), stmt.span), GateSpec((0,), None, None, stmt.span)]
    if ins is None:
        return Circuit(gates=[Gate((0,), (), (rank,), stmt.span), Gate((0,), (), (), stmt.span)],
                       auto=1, span=node.span)
    dims, gates = build_gates(ins, specs, outs or ins, out_spans)
    check_params(gates, node.span)
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
            if len(specs) + n * (n - 1) // 2 > MAX_GATES:
                raise QCError(f"too many gates: all_pairs on {n} qudits after {len(specs)} gates "
                              f"(at most {MAX_GATES} per circuit)", stmt.span)
            specs += [GateSpec(p, span=stmt.span) for p in all_pairs_qudits(n)]
        elif isinstance(stmt, RepeatNode):
            k = _int(stmt.count, "the repeat count", 1, MAX_REPEAT)
            if depth + 1 > MAX_REPEAT_DEPTH:
                raise QCError(f"repeat nested too deep (at most {MAX_REPEAT_DEPTH})", stmt.span)
            inner = _expand(stmt.body, n, auto, depth + 1)
            if not inner:
                raise QCError("repeat has no gates in its body", stmt.span,
                              expected="'gate', 'all_pairs' or 'repeat'")
            if len(specs) + k * len(inner) > MAX_GATES:
                raise QCError(f"too many gates: {len(specs)} + {k} x {len(inner)} (at most "
                              f"{MAX_GATES} per circuit after repeat)", stmt.count.span)
            specs += inner * k
        elif isinstance(stmt, LowRankNode):
            raise QCError("low_rank is a whole circuit and cannot go inside repeat", stmt.span,
                          expected="'gate', 'all_pairs' or 'repeat'")
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
    if auto and node.ins is not None:
        raise QCError("a 'qudits auto' circuit takes its input dims from the layer: write the "
                      "gate without dims, or with output dims only ('-> 8')", node.ins.span)
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

    def __init__(self, includes: bool, text_bytes: int):
        self.circuits: dict[str, tuple[Circuit, Span]] = {}
        self.rules: list[ApplyRule] = []
        self.trained: list[Pattern] = []
        self.options: dict[str, tuple[object, Span]] = {}
        self.includes = includes
        self.stack: list[str] = []  # real paths of the files being read (include cycles)
        self.trees: dict[str, tuple[tuple, int]] = {}  # real path -> (syntax tree, its length)
        self.expanded = 0  # include statements expanded so far
        self.total = text_bytes  # text read so far, each include counted every time

    def add_items(self, items: tuple, base_dir: str) -> None:
        for item in items:
            if isinstance(item, CircuitNode):
                self.add_circuit(item)
            elif isinstance(item, ApplyNode):
                self.rules.append(ApplyRule(item.name.text,
                                            tuple(_pattern(p) for p in item.patterns), item.span,
                                            _rule_options(item.options)))
            elif isinstance(item, TrainNode):
                self.trained += [_pattern(p) for p in item.patterns]
            elif isinstance(item, OptionNode):
                self.add_option(item)
            elif isinstance(item, IncludeNode):
                self.include(item, base_dir)

    def add_circuit(self, node: CircuitNode) -> None:
        name = node.name.text
        if name in self.circuits:
            raise QCError(f"circuit {quoted(name)} is already defined (at "
                          f"{self.circuits[name][1].at()})", node.name.span,
                          expected="a new circuit name")
        self.circuits[name] = (_circuit(node), node.name.span)

    def add_option(self, node: OptionNode) -> None:
        key = node.key.text
        if key in self.options:
            raise QCError(f"option {quoted(key)} is already set (at {self.options[key][1].at()})",
                          node.key.span)
        self.options[key] = (_option_value(node), node.key.span)

    def include(self, node: IncludeNode, base_dir: str) -> None:
        span = node.path.span
        if not self.includes:
            raise QCError("includes are disabled for this text (e.g. a program stored in a "
                          "checkpoint)", span, expected="the included file's text in its place")
        if "\x00" in node.path.text:
            raise QCError("a file name cannot hold a NUL character", span)
        path = os.path.normpath(os.path.join(base_dir, node.path.text))
        real = os.path.realpath(path)
        if real in self.stack:
            chain = " -> ".join(os.path.basename(p) for p in self.stack[self.stack.index(real):])
            raise QCError(f"include cycle: {chain} -> {os.path.basename(real)}", span)
        if len(self.stack) >= MAX_INCLUDE_DEPTH:
            raise QCError(f"includes nested too deep (at most {MAX_INCLUDE_DEPTH})", span)
        self.expanded += 1
        if self.expanded > MAX_INCLUDES:
            raise QCError(f"more than {MAX_INCLUDES} includes expanded in one program (each "
                          "path through the includes counts)", span)
        if not os.path.lexists(path):
            raise QCError(f"include file {quoted(node.path.text)} not found (looked for {path})",
                          span)
        if not real.endswith(".qc"):
            shown = "" if real == os.path.abspath(path) else f" (it resolves to {real})"
            raise QCError(f"include reads only .qc files, not {quoted(node.path.text)}{shown}",
                          span, expected='a file name ending in ".qc"')
        if real not in self.trees:
            text = read_file(path, span)
            self.trees[real] = (parse_ast(text, path), len(text))
        tree, size = self.trees[real]
        self.total += size
        if self.total > MAX_TOTAL_BYTES:
            raise QCError(f"the program and its includes exceed {MAX_TOTAL_BYTES} characters "
                          f"({MAX_TOTAL_BYTES // 2**20} MiB) in all", span)
        self.stack.append(real)
        self.add_items(tree, os.path.dirname(path))
        self.stack.pop()

    def program(self) -> Program:
        return Program({k: c for k, (c, _) in self.circuits.items()}, tuple(self.rules),
                       {k: v for k, (v, _) in self.options.items()}, tuple(self.trained))


def _option_value(node: OptionNode) -> object:
    """``KEY = VALUE`` checked: errors point at the key (unknown) or at the value (bad)."""
    key = node.key.text
    if key not in OPTION_DEFAULTS:
        raise QCError(f"unknown option {quoted(key)}", node.key.span,
                      expected=" or ".join(OPTION_DEFAULTS))
    text = node.value.text
    value: object = float(text) if node.numeric and key != "init" else text
    return check_option(key, value, node.value.span)


def _rule_options(nodes: tuple[OptionNode, ...]) -> dict[str, object]:
    """An apply rule's ``with KEY = VALUE, …``: each key once."""
    options: dict[str, object] = {}
    first: dict[str, Span] = {}
    for node in nodes:
        key = node.key.text
        if key in first:
            raise QCError(f"option {quoted(key)} is given twice in this rule (first at "
                          f"{first[key].at()})", node.key.span, expected="each key once")
        options[key] = _option_value(node)
        first[key] = node.key.span
    return options


def _pattern(tok: Tok) -> Pattern:
    """A pattern token; a ``/regex/`` is checked (valid, in the safe subset) by ``Pattern``."""
    if not tok.text.startswith("/"):
        return Pattern(tok.text, span=tok.span)
    return Pattern(tok.text[1:-1], regex=True, span=tok.span)
