"""What an adapter costs on a model: per-branch rows, per-layer sums, totals, a text table
and JSON.

A layer may carry several *branches* (``apply`` rules matching it; its update is the sum of
their circuits). Layers that carry the same branches (pattern, circuit, options, shape)
form a ``LayerGroup``; each branch of a group is one ``Row``. A row's figures come from
the compiled circuit (``qcircuit.compiler.compile``): ``params`` is the circuit's
parameter count per module; ``flops_per_token`` is ``plan.flops(1)`` — 2 × the
multiply-adds of the forward contraction path for one token, per module (the adapter's
extra cost over the base layer; the frozen copy of ``freeze_one`` is folded into the base
weight and costs nothing); ``rank_bound`` is the min-cut bound on rank(T). A group sums
its branches' params and FLOPs, and bounds the rank of the sum by
``min(Σ rank bounds, min(in, out))`` (rank(A + B) <= rank(A) + rank(B)); it is "full" only
when that reaches ``min(in, out)``. The bounds are those of the circuits' operators T, the
update ``T_θ`` adds to the (folded) base weight. Trainable parameters are every branch's
parameters summed over its modules, and their percentage is of the base model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from qcircuit.compiler import compile as compile_circuit
from qcircuit.ir import OPTION_DEFAULTS, Circuit

from .bind import Target, by_layer


@dataclass(frozen=True)
class CircuitStats:
    """Compiled figures of one concrete circuit (per module)."""

    params: int
    flops_per_token: int
    rank_bound: int
    universal: bool


@dataclass(frozen=True)
class Row:
    """One table row: one branch (one rule's circuit) of the layers of a ``LayerGroup``."""

    pattern: str
    circuit_name: str
    circuit: Circuit
    kind: str
    modules: tuple[str, ...]
    in_features: int
    out_features: int
    stats: CircuitStats
    options: Mapping[str, Any] = field(default_factory=dict)  #: resolved: every key
    own_options: Mapping[str, Any] = field(default_factory=dict)  #: those unlike the file's

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
class LayerGroup:
    """Layers that carry the same branches (patterns, circuits, options, shape): their
    update is the sum of the branches' circuits, one ``Row`` each, in rule order."""

    branches: tuple[Row, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        return self.branches[0].modules

    @property
    def in_features(self) -> int:
        return self.branches[0].in_features

    @property
    def out_features(self) -> int:
        return self.branches[0].out_features

    @property
    def params(self) -> int:
        """Trainable parameters of one layer: every branch's."""
        return sum(r.stats.params for r in self.branches)

    @property
    def params_total(self) -> int:
        return self.params * len(self.modules)

    @property
    def flops_per_token(self) -> int:
        return sum(r.stats.flops_per_token for r in self.branches)

    @property
    def rank_bound(self) -> int:
        """rank(A + B) <= rank(A) + rank(B), and no update exceeds min(in, out)."""
        return min(sum(r.stats.rank_bound for r in self.branches),
                   min(self.in_features, self.out_features))

    @property
    def full_rank(self) -> bool:
        return self.rank_bound >= min(self.in_features, self.out_features)

    @property
    def label(self) -> str:
        """``q_proj`` for one branch; ``q_proj (attn + lora)`` for a sum."""
        patterns = " + ".join(dict.fromkeys(r.pattern for r in self.branches))
        if len(self.branches) == 1:
            return patterns
        return f"{patterns} ({' + '.join(r.circuit_name for r in self.branches)})"


@dataclass(frozen=True)
class Report:
    """The whole picture for one program on one model."""

    model: str
    model_class: str
    total_params: int
    groups: tuple[LayerGroup, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> tuple[Row, ...]:
        """Every branch row, group by group."""
        return tuple(r for g in self.groups for r in g.branches)

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
    gate (``gate_bytes`` per entry), twice for a branch whose init is not ``zero_last``
    (its frozen copy)."""
    return sum((1 if r.options.get("init") == "zero_last" else 2) * gate_bytes * r.params_total
               for r in report.rows)


def circuit_stats(circuit: Circuit) -> CircuitStats:
    """Compile ``circuit`` and read its figures (per module, one token)."""
    plan = compile_circuit(circuit)
    return CircuitStats(int(plan.num_params), int(plan.flops(1)), int(plan.rank_bound),
                        bool(plan.universal))


def build_report(model: str, model_class: str, total_params: int, targets: Iterable[Target],
                 options: Mapping[str, Any] | None = None) -> Report:
    """Group the layers of ``targets`` by their branches (first-appearance order), each
    circuit compiled once. ``options`` are the program-wide ones; a branch's
    ``own_options`` are those of its resolved options that differ from them (from the
    defaults when ``options`` is not given)."""
    base = dict(OPTION_DEFAULTS) | dict(options or {})
    groups: dict[tuple, list[tuple[Target, ...]]] = {}
    for branches in by_layer(tuple(targets)).values():
        key = tuple((t.pattern, t.circuit_name, t.circuit, t.in_features, t.out_features,
                     t.kind, tuple(sorted(t.options.items()))) for t in branches)
        groups.setdefault(key, []).append(branches)
    cache: dict[Circuit, CircuitStats] = {}
    out = []
    for layers in groups.values():
        modules = tuple(branches[0].module_name for branches in layers)
        rows = []
        for t in layers[0]:
            if t.circuit not in cache:
                cache[t.circuit] = circuit_stats(t.circuit)
            resolved = {k: t.option(k) for k in OPTION_DEFAULTS}
            own = {k: v for k, v in resolved.items() if v != base[k]}
            rows.append(Row(t.pattern, t.circuit_name, t.circuit, t.kind, modules,
                            t.in_features, t.out_features, cache[t.circuit], resolved, own))
        out.append(LayerGroup(tuple(rows)))
    return Report(model, model_class, total_params, tuple(out), dict(options or {}))


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


def rank_text(rank_bound: int, full: bool) -> str:
    return f"{rank_bound:,}" + (" (full)" if full else "")


def options_text(options: Mapping[str, Any]) -> str:
    """``init = zero_last, scale = 2.0``."""
    return ", ".join(f"{k} = {v}" for k, v in options.items())


def format_table(report: Report) -> str:
    """The human-readable report: one row per branch (a layer group's first branch under
    its pattern, the next ones after ``+``, then a ``= sum`` row when there are several),
    a column of a branch's own options when any rule has some, then totals."""
    head = ("pattern", "circuit", "modules", "in -> out", "qudits", "params/module",
            "params", "FLOPs/token", "rank bound")
    with_options = any(r.own_options for r in report.rows)
    if with_options:
        head += ("options",)
    body = []
    for g in report.groups:
        shape = f"{g.in_features} -> {g.out_features}"
        for i, r in enumerate(g.branches):
            body.append((("+ " if i else "") + r.pattern, r.circuit_name, f"{len(r.modules)}",
                         shape, dims_text(r.circuit), f"{r.stats.params:,}",
                         f"{r.params_total:,}", f"{r.stats.flops_per_token:,}",
                         rank_text(r.stats.rank_bound, r.full_rank), options_text(r.own_options)))
        if len(g.branches) > 1:
            body.append(("= sum", "", f"{len(g.modules)}", shape, "", f"{g.params:,}",
                         f"{g.params_total:,}", f"{g.flops_per_token:,}",
                         rank_text(g.rank_bound, g.full_rank), ""))
    body = [line[:len(head)] for line in body]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    right = {2, 5, 6, 7}

    def fmt(line):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    lines = [f"model: {report.model} ({report.model_class}), {report.total_params:,} parameters",
             ""]
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    lines.append("")
    lines += [f"  {g.label}: {names_text(g.modules)}" for g in report.groups]
    if report.options:
        lines += ["", "options: " + options_text(report.options)]
    lines += ["",
              f"trainable parameters: {report.trainable_params:,} of {report.total_params:,} "
              f"({percent_text(report.trainable_percent)} %)",
              f"adapter FLOPs per token: {report.flops_per_token:,} (all modules)"]
    return "\n".join(lines)


#: 2: ``layers`` (branches and per-layer sums) and each target's ``options``; the keys of
#: 1 keep their meaning, ``targets`` holding one entry per branch.
JSON_VERSION = 2


def to_json(report: Report) -> dict[str, Any]:
    """The ``--json`` object (plain JSON types only). ``targets``: one entry per row (a
    branch of a layer group); ``layers``: one entry per layer group, its ``branches``
    pointing into ``targets`` by index, with the per-layer sums."""
    targets, layers = [], []
    for g in report.groups:
        branches = []
        for r in g.branches:
            branches.append({
                "target": len(targets),
                "pattern": r.pattern,
                "circuit": r.circuit_name,
                "options": dict(r.options),
                "own_options": dict(r.own_options),
                "params": r.stats.params,
                "rank_bound": r.stats.rank_bound,
                "flops_per_token": r.stats.flops_per_token,
            })
            targets.append(_target_json(r))
        layers.append({
            "modules": len(g.modules),
            "module_names": list(g.modules),
            "kind": g.branches[0].kind,
            "in_features": g.in_features,
            "out_features": g.out_features,
            "branches": branches,
            "params": g.params,
            "params_total": g.params_total,
            "flops_per_token": g.flops_per_token,
            "rank_bound": g.rank_bound,
            "full_rank": g.full_rank,
        })
    return {
        "version": JSON_VERSION,
        "model": report.model,
        "model_class": report.model_class,
        "total_params": report.total_params,
        "trainable_params": report.trainable_params,
        "trainable_percent": report.trainable_percent,
        "flops_per_token": report.flops_per_token,
        "options": dict(report.options),
        "targets": targets,
        "layers": layers,
    }


def _target_json(r: Row) -> dict[str, Any]:
    return {
        "pattern": r.pattern,
        "circuit": r.circuit_name,
        "kind": r.kind,
        "modules": len(r.modules),
        "module_names": list(r.modules),
        "in_features": r.in_features,
        "out_features": r.out_features,
        "in_dims": list(r.circuit.in_dims),
        "out_dims": list(r.circuit.out_dims),
        "options": dict(r.options),
        "params": r.stats.params,
        "params_total": r.params_total,
        "flops_per_token": r.stats.flops_per_token,
        "flops_per_token_total": r.flops_per_token_total,
        "rank_bound": r.stats.rank_bound,
        "full_rank": r.full_rank,
        "universal": r.stats.universal,
    }
