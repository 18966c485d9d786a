"""Binding a Program to a model: which layer gets which (resolved) circuit.

``bind(model, program)`` walks the ``apply`` rules in order; each pattern (a dotted-name
suffix or a ``/regex/``) selects modules by name. Every selected module must be an
``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style: weight stored ``(in, out)``),
with a floating-point weight or a quantized one of a supported kind (``quantized.py``),
may be selected by several rules (its update is then the sum of their circuits, one
*branch* per rule, in rule order) but never twice by the same circuit, and must fit each
of its circuits: ``qudits auto N`` circuits are
factorised for the layer, concrete circuits must have the layer's in/out features.
Any violation is a ``QCError`` naming the module, its shape and the circuit's dims,
located at the pattern in the ``.qc`` text when there is one.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from qcircuit.errors import QCError, Span, with_article

if TYPE_CHECKING:   # imported when used: ``qcompile`` imports this package first, light
    from torch import nn

    from qcircuit.ir import ApplyRule, Circuit, Pattern, Program


@dataclass(frozen=True)
class Target:
    """One branch of one adapted layer: the concrete circuit a rule gives the layer, and
    the options it runs with (the rule's own, else the program's, else the defaults)."""

    module_name: str
    pattern: str
    circuit_name: str
    circuit: Circuit
    in_features: int
    out_features: int
    kind: str  # "linear" | "conv1d"
    options: Mapping[str, object] = field(default_factory=dict)

    def option(self, key: str) -> object:
        from qcircuit.ir import OPTION_DEFAULTS
        return self.options.get(key, OPTION_DEFAULTS[key])


def by_layer(targets: Sequence[Target]) -> dict[str, tuple[Target, ...]]:
    """Module name -> its branches, layers in first-match order, branches in rule order."""
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(t.module_name, []).append(t)
    return {name: tuple(branches) for name, branches in out.items()}


@functools.cache
def _linear_types() -> tuple[type, type | tuple]:
    """``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (imported when first needed:
    the package is imported by ``qcompile`` before anything heavy)."""
    from torch import nn
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        Conv1D = ()
    return nn.Linear, Conv1D


def layer_shape(module: nn.Module) -> tuple[str, int, int] | None:
    """``(kind, in_features, out_features)`` of a linear-like module, else ``None``."""
    linear, Conv1D = _linear_types()
    if isinstance(module, linear):
        return "linear", module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return "conv1d", int(n_in), int(n_out)
    return None


def linear_layers(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Every linear-like module of the model by name, in module order."""
    found = {}
    for name, module in model.named_modules():
        shape = layer_shape(module)
        if shape is not None:
            found[name] = shape
    return found


def bind(model: nn.Module, program: Program) -> tuple[Target, ...]:
    """The branches ``program``'s rules put on ``model``'s layers (rule order), each with
    its resolved circuit and options; ``by_layer`` groups them per layer."""
    from . import quantized   # imported when used, as the layer types are (see above)
    if not program.rules:
        raise QCError("the program has no 'apply' rule: nothing to bind",
                      expected="a line like: apply NAME to q_proj, v_proj")
    modules = dict(model.named_modules())
    claimed: dict[tuple[str, str], str] = {}  # (module, circuit) -> pattern that took it
    resolved: dict[tuple[str, int, int], Circuit] = {}
    targets = []
    for rule in program.rules:
        circuit = program.circuits[rule.circuit]
        options = program.options_for(rule)
        for pattern in rule.patterns:
            span = pattern.span or rule.span
            try:
                names = [n for n in modules if n and pattern.matches(n)]
            except re.error as e:
                raise QCError(f"bad regex {str(pattern)!r}: {e}", span) from None
            if not names:
                raise _no_match(model, rule, pattern, span)
            for name in names:
                shape = layer_shape(modules[name])
                problem = quantized.unsupported(modules[name])
                if problem is not None:
                    raise QCError(f"pattern {str(pattern)!r} matches module {name!r}: {problem}",
                                  span, expected="a pattern naming supported layers only")
                if shape is None:
                    raise QCError(
                        f"pattern {str(pattern)!r} matches module {name!r}, "
                        f"{with_article(type(modules[name]).__name__)}, not a linear layer "
                        "(nn.Linear or Conv1D)", span,
                        expected="a pattern naming linear layers only (anchor a regex with $)")
                if (name, rule.circuit) in claimed:
                    raise QCError(
                        f"circuit {rule.circuit!r} is applied twice to module {name!r}: by "
                        f"{claimed[name, rule.circuit]!r} and by {str(pattern)!r}", span,
                        expected="each circuit applied once per layer (a sum takes "
                                 "different circuits)")
                claimed[name, rule.circuit] = str(pattern)
                kind, n_in, n_out = shape
                key = (rule.circuit, n_in, n_out)
                if key not in resolved:
                    resolved[key] = _resolve(circuit, rule.circuit, name, shape, span)
                targets.append(Target(name, str(pattern), rule.circuit, resolved[key],
                                      n_in, n_out, kind, options))
    return tuple(targets)


def describe_circuit(circuit: Circuit) -> str:
    """``qudits 16 8 8 4: 4096 -> 4096 features``, or ``qudits auto 3`` before binding."""
    if circuit.is_auto:
        return f"qudits auto {circuit.auto}"
    if None in circuit.dims:
        return "qudits " + " ".join("?" if d is None else str(d) for d in circuit.dims)
    ins, outs = circuit.in_dims, circuit.out_dims
    dims = " ".join(map(str, ins)) + ("" if ins == outs else " -> " + " ".join(map(str, outs)))
    return f"qudits {dims}: {circuit.in_features} -> {circuit.out_features} features"


def _resolve(circuit: Circuit, circuit_name: str, module_name: str,
             shape: tuple[str, int, int], span: Span | None) -> Circuit:
    kind, n_in, n_out = shape
    layer = f"module {module_name!r} ({kind}, {n_in} -> {n_out} features)"
    about = f"circuit {circuit_name!r} ({describe_circuit(circuit)})"
    if (not circuit.is_auto and None not in circuit.dims
            and (circuit.in_features, circuit.out_features) != (n_in, n_out)):
        raise QCError(f"{about} does not fit {layer}", span,
                      expected=f"a circuit mapping {n_in} -> {n_out} features, or 'qudits auto N'")
    try:
        return circuit.resolve(n_in, n_out)
    except QCError as e:
        raise QCError(f"{about} cannot be bound to {layer}: {e.message}", span,
                      expected=e.expected) from None


def _no_match(model: nn.Module, rule: ApplyRule, pattern: Pattern, span: Span | None) -> QCError:
    layers = linear_layers(model)
    leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
    example = next(iter(layers), None)
    hint = f"linear layer names end in: {', '.join(leaves[:12])}" if leaves else "it has no linear layers"
    where = f" (e.g. {example!r})" if example else ""
    shown = getattr(model, "_model", model)   # the PEFT door binds through a view of the model
    return QCError(f"pattern {str(pattern)!r} (apply {rule.circuit}) matches no module of "
                   f"{type(shown).__name__}; {hint}{where}", span,
                   expected="a module-name suffix or a /regex/ matching linear layers")
