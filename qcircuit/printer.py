"""IR -> canonical ``.qc`` text (parses back to an equal object) and one-screen summaries.

Canonical form: a gate's dims are written exactly when it changes dims (``16x16 ->
16x43``); square gates take theirs from the wires. A circuit whose dims change declares
its output dims on the ``qudits`` line. Runs of gates equal to ``all_pairs`` print as
``all_pairs``, and repeated sequences of statements as ``repeat K { … }``. A one-qudit
circuit ``gate (0) -> R``, ``gate (0)`` on ``qudits auto 1`` prints as ``low_rank R``, and so
does a concrete ``D -> R -> E`` with ``R < min(D, E)``. Rule options print as
`` with KEY = VALUE, …`` in ``OPTION_DEFAULTS`` order.
"""
from __future__ import annotations

import math
import re

from .errors import QCError
from .ir import OPTION_DEFAULTS, Circuit, Gate, Pattern, Program, all_pairs_qudits
from .limits import MAX_REPEAT

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
INDENT = "    "


def _dims(dims) -> str:
    return "x".join(map(str, dims))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise QCError(f"cannot print circuit name {name!r}", expected="a name like attn or up_proj")


def _gate_line(g: Gate) -> str:
    line = f"gate ({', '.join(map(str, g.qudits))})"
    if g.in_dims and not g.is_square:
        line += f" {_dims(g.in_dims)} -> {_dims(g.out_dims)}"
    elif not g.in_dims and g.out_dims:  # auto circuit: output dims only
        line += f" -> {_dims(g.out_dims)}"
    return line


def _low_rank(circuit: Circuit) -> int | None:
    """R when the circuit is what ``low_rank R`` means: one qudit, ``gate (0) -> R`` then
    ``gate (0)`` on ``qudits auto 1``, or ``D -> R -> E`` with ``R`` below both ``D`` and ``E``."""
    gates = circuit.gates
    if circuit.num_qudits != 1 or len(gates) != 2:
        return None
    first, last = gates
    if circuit.is_auto:
        return first.out_dims[0] if first.out_dims and not last.out_dims else None
    rank = first.out_dims[0]
    return rank if rank < min(first.in_dims[0], last.out_dims[0]) else None


def _statements(circuit: Circuit) -> list[str]:
    """One statement per gate, except that runs equal to ``all_pairs`` become one."""
    gates, n = circuit.gates, circuit.num_qudits
    pairs = all_pairs_qudits(n) if n >= 2 else []
    out, k = [], 0
    while k < len(gates):
        block = gates[k:k + len(pairs)]
        if (pairs and len(block) == len(pairs)
                and all(g.qudits == p and g.is_square for g, p in zip(block, pairs))):
            out.append("all_pairs")
            k += len(pairs)
        else:
            out.append(_gate_line(gates[k]))
            k += 1
    return out


def _fold(stmts: list[str], max_period: int = 32) -> list[str]:
    """Fold runs of a repeated statement sequence into ``repeat K { … }`` (nested too).

    Any grouping parses back to the same gates: a square gate takes its dims from the
    wires and a gate that changes dims has them written."""
    lines, k = [], 0
    while k < len(stmts):
        best = (1, 1)  # (period, count)
        for p in range(1, min(max_period, (len(stmts) - k) // 2) + 1):
            m = 1
            while m < MAX_REPEAT and stmts[k + m * p:k + (m + 1) * p] == stmts[k:k + p]:
                m += 1
            if m > 1 and p * m > best[0] * best[1]:
                best = (p, m)
        p, m = best
        if m == 1:
            lines.append(stmts[k])
        else:
            body = _fold(stmts[k:k + p], max_period)
            if len(body) == 1:
                lines.append(f"repeat {m} {{ {body[0]} }}")
            else:
                lines += [f"repeat {m} {{"] + [INDENT + line for line in body] + ["}"]
        k += p * m
    return lines


def circuit_to_qc(circuit: Circuit, name: str = "c") -> str:
    """The circuit as a canonical ``circuit NAME { … }`` block."""
    _check_name(name)
    if not circuit.gates:
        raise QCError(f"circuit {name!r} has no gates: a .qc circuit needs at least one",
                      expected="a circuit with gates")
    rank = _low_rank(circuit)
    if circuit.is_auto:
        header = f"qudits auto {circuit.auto}"
    else:
        ins, outs = circuit.in_dims, circuit.out_dims
        header = "qudits " + " ".join(map(str, ins))
        if outs != ins:
            header += " -> " + " ".join(map(str, outs))
    if rank is not None:
        body = [f"low_rank {rank}"] if circuit.is_auto else [header, f"low_rank {rank}"]
        return "\n".join([f"circuit {name} {{"] + [INDENT + line for line in body] + ["}"]) + "\n"
    lines = [f"circuit {name} {{", INDENT + header]
    lines += [INDENT + line for line in _fold(_statements(circuit))]
    return "\n".join(lines + ["}"]) + "\n"


def _pattern(p: Pattern) -> str:
    if not p.regex:
        if not _PATH.fullmatch(p.text):
            raise QCError(f"cannot print module-name pattern {p.text!r}",
                          expected="a dotted name like self_attn.q_proj, or a regex")
        return p.text
    if "\n" in p.text or "\r" in p.text:
        raise QCError(f"cannot print regex pattern {p.text!r} (it spans lines)")
    try:
        re.compile(p.text)
    except re.error as err:
        raise QCError(f"bad regex {p.text!r}: {err.msg}") from None
    # escape every '/' that is not already part of a backslash pair
    return "/" + re.sub(r"\\.|/", lambda m: "\\/" if m.group(0) == "/" else m.group(0),
                        p.text, flags=re.DOTALL) + "/"


def _value(value: object) -> str:
    if isinstance(value, str):
        if not _NAME.fullmatch(value):
            raise QCError(f"cannot print option value {value!r}")
        return value
    return repr(value)


def _options(options) -> str:
    """`` with KEY = VALUE, …`` in ``OPTION_DEFAULTS`` order, or nothing."""
    pairs = [f"{k} = {_value(options[k])}" for k in OPTION_DEFAULTS if k in options]
    return " with " + ", ".join(pairs) if pairs else ""


def program_to_qc(program: Program) -> str:
    """The program as canonical text: circuits, apply rules, one ``train`` line, options."""
    blocks = [circuit_to_qc(c, name) for name, c in program.circuits.items()]
    tail = [f"apply {r.circuit} to " + ", ".join(_pattern(p) for p in r.patterns)
            + _options(r.options) for r in program.rules]
    if program.trained:
        tail.append("train " + ", ".join(_pattern(p) for p in program.trained))
    tail += [f"option {k} = {_value(v)}" for k, v in program.options.items()]
    if tail:
        blocks.append("\n".join(tail) + "\n")
    return "\n".join(blocks)


def circuit_summary(circuit: Circuit, max_gates: int = 50) -> str:
    """Qudits, in/out dims and features, parameters per gate and in total (gates listed
    one per line, the middle elided past ``max_gates``)."""
    n = circuit.num_qudits
    if circuit.is_auto:
        return (f"qudits      {n} (auto: dims factorised from the bound layer)\n"
                f"gates       {len(circuit.gates)}: "
                + " ".join(f"({','.join(map(str, g.qudits))})" for g in circuit.gates) + "\n"
                "parameters  known once bound to a layer")
    ins, outs = circuit.in_dims, circuit.out_dims
    lines = [f"qudits      {n}: {' '.join(map(str, ins))} -> {' '.join(map(str, outs))}",
             f"features    {math.prod(ins)} -> {math.prod(outs)}",
             f"gates       {len(circuit.gates)}"]
    width = max((len(_dims(g.in_dims)) + len(_dims(g.out_dims)) for g in circuit.gates), default=0)
    shown = list(enumerate(circuit.gates))
    if len(shown) > max_gates:
        head = max_gates - max_gates // 5
        shown = shown[:head] + [None] + shown[len(shown) - (max_gates - head):]
    for item in shown:
        if item is None:
            lines.append(f"  … {len(circuit.gates) - max_gates} more gates …")
            continue
        k, g = item
        where = f"({', '.join(map(str, g.qudits))})"
        shape = f"{_dims(g.in_dims)} -> {_dims(g.out_dims)}"
        lines.append(f"  #{k:<3} {where:<12} {shape:<{width + 4}} {g.num_params:>12,} params")
    lines.append(f"parameters  {circuit.num_params:,}")
    return "\n".join(lines)
