"""Einsum networks from the tensor graph, and their contraction paths (opt_einsum): pure.

Two networks come from one graph:

* the **forward** network ``x, G_0, …, G_{K-1} -> y``: ``x`` is ``(tokens, *in_dims)``;
  every wire is an index, plus one batch index for the tokens;
* the **dense** network ``G_0, …, G_{K-1} [, I, …] -> T``: gates only, ``T`` indexed
  ``(out wires…, in wires…)``; a qudit no gate touches contributes an identity operand.

The forward path depends on the token count: it is planned per token bucket (the next
power of two). :func:`run_steps` runs a path step by step with ``torch.einsum`` (traceable by
``torch.compile``, unlike opt_einsum's own dispatch); the ``einsum`` route's executors are
built here (:func:`einsum_executor`, :func:`einsum_dense_executor`). Which route runs a bucket
is decided above (:mod:`choice`).
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import networkx as nx
import opt_einsum
import torch
from opt_einsum.parser import convert_to_valid_einsum_chars

from qcircuit.errors import QCError

from . import analysis
from .graph import gate_nodes, gate_wires, input_wires, num_wires, output_wires, wire_dims

#: largest operand counts for which the exhaustive and the dynamic-programming optimizers run
OPTIMAL_MAX_OPERANDS = 7
DP_MAX_OPERANDS = 12
EINSUM_LETTERS = 52     # torch.einsum's index alphabet: a-z, A-Z

Executor = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
DenseExecutor = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Network:
    """An einsum: one term per operand, the output term, index sizes.

    ``identities`` are the dims of identity operands that follow the gates (dense only);
    ``batch`` is the token index (forward only; its size is set when planning)."""

    inputs: tuple[str, ...]
    output: str
    sizes: Mapping[str, int]
    identities: tuple[int, ...] = ()
    batch: str | None = None

    @property
    def equation(self) -> str:
        return ",".join(self.inputs) + "->" + self.output

    def sized(self, tokens: int | None = None) -> dict[str, int]:
        sizes = dict(self.sizes)
        if self.batch is not None:
            sizes[self.batch] = tokens
        return sizes

    def shapes(self, tokens: int | None = None) -> list[tuple[int, ...]]:
        sizes = self.sized(tokens)
        return [tuple(sizes[s] for s in term) for term in self.inputs]


def _sym(i: int) -> str:
    return opt_einsum.get_symbol(i)


def forward_network(graph: nx.MultiDiGraph) -> Network:
    """``x, G_0, …, G_{K-1} -> y`` over the graph's wires (batch index first)."""
    batch = _sym(num_wires(graph))
    x = batch + "".join(_sym(w) for w in input_wires(graph))
    y = batch + "".join(_sym(w) for w in output_wires(graph))
    return Network((x, *_gate_terms(graph)), y, _wire_sizes(graph), batch=batch)


def _gate_terms(graph: nx.MultiDiGraph) -> list[str]:
    """One einsum term per gate, circuit order: its output wires then its input wires."""
    terms = []
    for node in gate_nodes(graph):
        outs, ins = gate_wires(graph, node)
        terms.append("".join(_sym(w) for w in outs + ins))
    return terms


def _wire_sizes(graph: nx.MultiDiGraph) -> dict[str, int]:
    return {_sym(w): d for w, d in wire_dims(graph).items()}


def dense_network(graph: nx.MultiDiGraph) -> Network:
    """``G_0, …, G_{K-1}, I… -> T[out wires…, in wires…]``."""
    sizes = _wire_sizes(graph)
    terms = _gate_terms(graph)
    ins, outs = list(input_wires(graph)), output_wires(graph)
    identities = []
    fresh = num_wires(graph)
    for q, (wi, wo) in enumerate(zip(ins, outs)):
        if wi == wo:  # a qudit no gate touches: join its two legs with an identity
            sizes[_sym(fresh)] = sizes[_sym(wi)]
            terms.append(_sym(wo) + _sym(fresh))
            identities.append(sizes[_sym(wi)])
            ins[q] = fresh
            fresh += 1
    output = "".join(_sym(w) for w in outs) + "".join(_sym(w) for w in ins)
    return Network(tuple(terms), output, sizes, identities=tuple(identities))


def token_bucket(tokens: int) -> int:
    """The planning bucket of a token count: the next power of two (at least 1)."""
    if isinstance(tokens, bool) or not isinstance(tokens, (numbers.Integral, torch.SymInt)) \
            or tokens < 1:
        raise QCError(f"token count must be a positive integer, got {tokens!r}")
    bucket = 1
    while bucket < tokens:  # a loop, not bit_length, so a symbolic size works too
        bucket *= 2
    return bucket


def choose_optimizer(num_operands: int) -> str:
    """opt_einsum optimizer by network size: exhaustive, then DP, then greedy."""
    if num_operands <= OPTIMAL_MAX_OPERANDS:
        return "optimal"
    return "dp" if num_operands <= DP_MAX_OPERANDS else "greedy"


def find_path(equation: str, shapes: Sequence[tuple[int, ...]], optimizer: str) -> tuple[list, Any]:
    """The one place a plan asks for a path (tests count calls here). Identical networks
    (the same circuit on many layers) share one opt_einsum search per process."""
    return _contract_path(equation, tuple(map(tuple, shapes)), optimizer)


@functools.lru_cache(maxsize=1024)
def _contract_path(equation: str, shapes: tuple[tuple[int, ...], ...], optimizer: str):
    return opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)


Step = tuple[tuple[int, ...], str]


@dataclass(frozen=True)
class ContractionPath:
    """A contraction path and its cost. ``tokens`` is ``None`` for the dense path;
    ``bucket`` is the token count the path was planned for; ``flops`` is multiply-adds
    × 2 at ``tokens``; ``info`` is opt_einsum's PathInfo report (at ``bucket``);
    ``steps`` are the path's pairwise contractions as ``(operand positions to pop,
    torch einsum equation)``, in opt_einsum's execution convention."""

    tokens: int | None
    bucket: int | None
    optimizer: str
    path: tuple[tuple[int, ...], ...]
    flops: int
    equation: str
    info: str = field(repr=False)
    steps: tuple[Step, ...] = field(repr=False, default=())

    def __str__(self) -> str:
        return self.info


def contraction_path(network: Network, tokens: int | None = None) -> ContractionPath:
    """Plan ``network`` (at ``tokens`` when it has a batch index)."""
    optimizer = choose_optimizer(len(network.inputs))
    path, info = find_path(network.equation, network.shapes(tokens), optimizer)
    path = tuple(tuple(step) for step in path)
    flops = analysis.path_flops(network.inputs, network.output, path, network.sized(tokens))
    steps = tuple((tuple(inds), convert_to_valid_einsum_chars(eq))
                  for inds, _, eq, *_ in info.contraction_list)
    widest = max((len(set(eq) - set(",->")) for _, eq in steps), default=0)
    if widest > EINSUM_LETTERS:
        raise QCError(f"a contraction step of this circuit has {widest} indices; torch.einsum "
                      f"takes at most {EINSUM_LETTERS} (fewer qudits, or merge small ones)")
    return ContractionPath(tokens, tokens, optimizer, path, flops, network.equation, str(info), steps)


def run_steps(steps: Sequence[Step], operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract ``operands`` along planned steps with ``torch.einsum`` (traceable by
    ``torch.compile``, unlike opt_einsum's own dispatch)."""
    ops = list(operands)
    for inds, equation in steps:
        picked = [ops.pop(i) for i in inds]
        ops.append(torch.einsum(equation, *picked))
    return ops[0]


def einsum_executor(path: ContractionPath, in_dims: tuple[int, ...], out_features: int) -> Executor:
    """The one-expression route in eager mode: the bucket's opt_einsum path run by
    opt_einsum's own dispatch (tensordot where a step is a BLAS product), which is the
    reference implementation's method. Its contraction list depends on the equation and the
    path only (the token count is one axis of ``x`` and of the intermediates that follow
    it), so the expression built at the first call serves every token count."""
    expression: list = []

    def run(x2d: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        n = x2d.shape[0]
        operands = [x2d.reshape(n, *in_dims), *gates]
        if not expression:
            expression.append(opt_einsum.contract_expression(
                path.equation, *(op.shape for op in operands), optimize=list(path.path)))
        return expression[0](*operands, backend="torch").reshape(n, out_features)

    return run


def einsum_dense_executor(network: Network, path: ContractionPath, out_features: int,
                          in_features: int) -> DenseExecutor:
    """The default dense route: the gates-only path (identities built per call)."""
    steps, identities = path.steps, network.identities

    def run(gates: Sequence[torch.Tensor]) -> torch.Tensor:
        if not gates:
            raise QCError("a circuit without gates has no gate to take dtype and device "
                          "from: its matrix is the identity")
        like = gates[0]
        eyes = [torch.eye(d, dtype=like.dtype, device=like.device) for d in identities]
        return run_steps(steps, [*gates, *eyes]).reshape(out_features, in_features)

    return run


