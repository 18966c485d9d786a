"""What an adapter costs on a model: per-target rows, totals, a text table and JSON.

Targets (from ``bind``) are grouped into rows by ``(pattern, circuit, in, out, kind)``.
Each row's figures come from the compiled circuit (``qcircuit.compiler.compile``):
``params`` is the circuit's parameter count per module; ``flops_per_token`` is
``plan.flops(1)`` — 2 × the multiply-adds of the forward contraction path for one
token, per module (the adapter's extra cost over the base layer; the frozen copy of
``freeze_one`` is folded into the base weight and costs nothing); ``rank_bound`` is the
min-cut bound on rank(T). Trainable parameters are the circuits' parameters summed over
all matched modules, and their percentage is of the base model's parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from qcircuit.compiler import compile as compile_circuit
from qcircuit.ir import Circuit

from .bind import Target


@dataclass(frozen=True)
class CircuitStats:
    """Compiled figures of one concrete circuit (per module)."""

    params: int
    flops_per_token: int
    rank_bound: int
    universal: bool


@dataclass(frozen=True)
class Row:
    """One table row: the modules a pattern matched with one layer shape."""

    pattern: str
    circuit_name: str
    circuit: Circuit
    kind: str
    modules: tuple[str, ...]
    in_features: int
    out_features: int
    stats: CircuitStats

    @property
    def params_total(self) -> int:
        return self.stats.params * len(self.modules)

    @property
    def flops_per_token_total(self) -> int:
        return self.stats.flops_per_token * len(self.modules)

    @property
    def full_rank(self) -> bool:
        return self.stats.rank_bound >= min(self.in_features, self.out_features)


@dataclass(frozen=True)
class Report:
    """The whole picture for one program on one model."""

    model: str
    model_class: str
    total_params: int
    rows: tuple[Row, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return sum(r.params_total for r in self.rows)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def flops_per_token(self) -> int:
        return sum(r.flops_per_token_total for r in self.rows)


def checkpoint_bytes(report: Report, gate_bytes: int) -> int:
    """Bytes of the tensors an initialised checkpoint of ``report``'s adapter holds: every
    gate (``gate_bytes`` per entry), twice unless ``init = zero_last`` (the frozen copy)."""
    copies = 1 if report.options.get("init") == "zero_last" else 2
    return copies * gate_bytes * report.trainable_params


def circuit_stats(circuit: Circuit) -> CircuitStats:
    """Compile ``circuit`` and read its figures (per module, one token)."""
    plan = compile_circuit(circuit)
    return CircuitStats(int(plan.num_params), int(plan.flops(1)), int(plan.rank_bound),
                        bool(plan.universal))


def build_report(model: str, model_class: str, total_params: int, targets: Iterable[Target],
                 options: Mapping[str, Any] | None = None) -> Report:
    """Group ``targets`` into rows (first-appearance order), each circuit compiled once."""
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        groups.setdefault((t.pattern, t.circuit_name, t.in_features, t.out_features, t.kind),
                          []).append(t)
    cache: dict[Circuit, CircuitStats] = {}
    rows = []
    for (pattern, name, n_in, n_out, kind), members in groups.items():
        circuit = members[0].circuit
        if circuit not in cache:
            cache[circuit] = circuit_stats(circuit)
        rows.append(Row(pattern, name, circuit, kind, tuple(t.module_name for t in members),
                        n_in, n_out, cache[circuit]))
    return Report(model, model_class, total_params, tuple(rows), dict(options or {}))


def not_universal(report: Report) -> list[str]:
    """One warning per circuit (by name and dims) whose qudits are not all connected."""
    seen, out = set(), []
    for r in report.rows:
        if not r.stats.universal and (r.circuit_name, r.circuit) not in seen:
            seen.add((r.circuit_name, r.circuit))
            out.append(f"circuit {r.circuit_name!r} ({dims_text(r.circuit)}, on {r.pattern}) is "
                       "not universal: its gates do not connect every qudit")
    return out


# --- formatting ---------------------------------------------------------------------------
def dims_text(circuit: Circuit) -> str:
    ins, outs = circuit.in_dims, circuit.out_dims
    text = " ".join(map(str, ins))
    return text if ins == outs else f"{text} -> {' '.join(map(str, outs))}"


def percent_text(percent: float) -> str:
    """``0.041`` for the paper's figure; small values keep two significant digits."""
    return f"{percent:.3f}" if percent >= 0.001 or percent == 0 else f"{percent:.2g}"


def names_text(names: tuple[str, ...]) -> str:
    """Module names in short: ``model.layers.{0-31}.self_attn.q_proj`` or
    ``encoder.layer.{0-11}.attention.self.{query,key,value}`` when the names are exactly
    every combination of their varying parts; else the first name and the count."""
    if len(names) == 1:
        return names[0]
    split = [n.split(".") for n in names]
    if len({len(s) for s in split}) == 1 and len(set(names)) == len(names):
        columns = [list(dict.fromkeys(s[i] for s in split)) for i in range(len(split[0]))]
        if math.prod(len(c) for c in columns) == len(names):
            return ".".join(c[0] if len(c) == 1 else _choice(c) for c in columns)
    return f"{names[0]}, … ({len(names)} modules)"


def _choice(values: list[str]) -> str:
    if all(v.isdigit() for v in values):
        numbers = sorted(int(v) for v in values)
        if numbers == list(range(numbers[0], numbers[-1] + 1)):
            return f"{{{numbers[0]}-{numbers[-1]}}}"
        values = [str(n) for n in numbers]
    return "{" + ",".join(values) + "}"


def rank_text(row: Row) -> str:
    return f"{row.stats.rank_bound:,}" + (" (full)" if row.full_rank else "")


def format_table(report: Report) -> str:
    """The human-readable report: one row per target group, then totals."""
    head = ("pattern", "circuit", "modules", "in -> out", "qudits", "params/module",
            "params", "FLOPs/token", "rank bound")
    body = [(r.pattern, r.circuit_name, f"{len(r.modules)}",
             f"{r.in_features} -> {r.out_features}", dims_text(r.circuit),
             f"{r.stats.params:,}", f"{r.params_total:,}", f"{r.stats.flops_per_token:,}",
             rank_text(r)) for r in report.rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    right = {2, 5, 6, 7}

    def fmt(line):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    lines = [f"model: {report.model} ({report.model_class}), {report.total_params:,} parameters",
             ""]
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    lines.append("")
    lines += [f"  {r.pattern}: {names_text(r.modules)}" for r in report.rows]
    if report.options:
        lines += ["", "options: " + ", ".join(f"{k} = {v}" for k, v in report.options.items())]
    lines += ["",
              f"trainable parameters: {report.trainable_params:,} of {report.total_params:,} "
              f"({percent_text(report.trainable_percent)} %)",
              f"adapter FLOPs per token: {report.flops_per_token:,} (all modules)"]
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    """The ``--json`` object (plain JSON types only)."""
    return {
        "model": report.model,
        "model_class": report.model_class,
        "total_params": report.total_params,
        "trainable_params": report.trainable_params,
        "trainable_percent": report.trainable_percent,
        "flops_per_token": report.flops_per_token,
        "options": dict(report.options),
        "targets": [{
            "pattern": r.pattern,
            "circuit": r.circuit_name,
            "kind": r.kind,
            "modules": len(r.modules),
            "module_names": list(r.modules),
            "in_features": r.in_features,
            "out_features": r.out_features,
            "in_dims": list(r.circuit.in_dims),
            "out_dims": list(r.circuit.out_dims),
            "params": r.stats.params,
            "params_total": r.params_total,
            "flops_per_token": r.stats.flops_per_token,
            "flops_per_token_total": r.flops_per_token_total,
            "rank_bound": r.stats.rank_bound,
            "full_rank": r.full_rank,
            "universal": r.stats.universal,
        } for r in report.rows],
    }

