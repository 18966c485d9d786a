"""Planning: einsum networks from the tensor graph, opt_einsum paths, the ``Plan``.

Two networks come from one graph:

* the **forward** network ``x, G_0, …, G_{K-1} -> y``: ``x`` is ``(tokens, *in_dims)``;
  every wire is an index, plus one batch index for the tokens;
* the **dense** network ``G_0, …, G_{K-1} [, I, …] -> T``: gates only, ``T`` indexed
  ``(out wires…, in wires…)``; a qudit no gate touches contributes an identity operand.

The forward path depends on the token count: it is planned per token bucket (the next
power of two). Which *route* runs a bucket — this path step by step with ``torch.einsum``
(traceable by ``torch.compile``, unlike opt_einsum's own dispatch), a GEMM schedule, the
light cone for the dense matrix — is :mod:`routes`' decision; ``Plan`` is plain data with
front doors to it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import networkx as nx
import opt_einsum
import torch
from opt_einsum.parser import convert_to_valid_einsum_chars

from qcircuit.errors import QCError
from qcircuit.ir import Circuit

from . import analysis
from .graph import gate_nodes, gate_wires, input_wires, lower, num_wires, output_wires, wire_dims

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
class PathPlan:
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


def plan_path(network: Network, tokens: int | None = None) -> PathPlan:
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
    return PathPlan(tokens, tokens, optimizer, path, flops, network.equation, str(info), steps)


def run_steps(steps: Sequence[Step], operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract ``operands`` along planned steps with ``torch.einsum`` (traceable by
    ``torch.compile``, unlike opt_einsum's own dispatch)."""
    ops = list(operands)
    for inds, equation in steps:
        picked = [ops.pop(i) for i in inds]
        ops.append(torch.einsum(equation, *picked))
    return ops[0]


def einsum_executor(path: PathPlan, in_dims: tuple[int, ...], out_features: int) -> Executor:
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


def einsum_dense_executor(network: Network, path: PathPlan, out_features: int,
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


#: caps, checked before any work that grows with them (with the cap in the error)
MAX_GATES = 1024
MAX_QUDITS = 48
MAX_MODULE_PARAMS = 1 << 26
MAX_DENSE_NUMEL = 1 << 31


def signature(circuit: Circuit) -> str:
    """A short stable name of the circuit's structure (dims and gates): the key that plan
    caches and the wisdom file use."""
    text = repr((circuit.in_dims, tuple((g.qudits, g.in_dims, g.out_dims) for g in circuit.gates)))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True, eq=False)
class Plan:
    """A compiled circuit: graph, analyses and its two einsum networks; plain data.

    The route each token bucket runs (and the executors built from it) is chosen and cached
    by :mod:`routes`; the methods below are front doors to it."""

    circuit: Circuit
    graph: nx.MultiDiGraph = field(repr=False)
    num_params: int
    rank_bound: int
    universal: bool
    forward_network: Network = field(repr=False)
    dense_network: Network = field(repr=False)
    signature: str = ""

    in_dims = property(lambda self: self.circuit.in_dims)
    out_dims = property(lambda self: self.circuit.out_dims)
    in_features = property(lambda self: self.circuit.in_features)
    out_features = property(lambda self: self.circuit.out_features)
    num_gates = property(lambda self: len(self.circuit.gates))

    def __deepcopy__(self, memo: dict) -> "Plan":
        return self  # immutable

    def path(self, tokens: int) -> PathPlan:
        """The one-expression forward path for ``tokens`` (planned for its bucket), costed
        at ``tokens``."""
        bucket = token_bucket(tokens)
        planned = plan_path(self.forward_network, bucket)
        tokens = int(tokens)
        net = self.forward_network
        flops = analysis.path_flops(net.inputs, net.output, planned.path, net.sized(tokens))
        return dataclasses.replace(planned, tokens=tokens, flops=flops)

    def flops(self, tokens: int) -> int:
        """Multiply-adds × 2 of the one-expression forward path for ``tokens``."""
        return self.path(tokens).flops

    def dense_path(self) -> PathPlan:
        """The gates-only path of the dense matrix."""
        return plan_path(self.dense_network)

    def route(self, tokens: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32):
        """The :class:`routes.RoutePlan` that runs ``tokens`` rows on ``device`` in ``dtype``."""
        from . import routes
        return routes.forward_plan(self, token_bucket(tokens), torch.device(device).type, dtype)

    def explain(self, tokens: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> str:
        """Text: the candidate routes for ``tokens``, predicted and measured times, the winner."""
        return self.route(tokens, device, dtype).explain()

    def executor(self, tokens: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Executor:
        """``run(x (tokens, in_features), gates) -> (tokens, out_features)`` for this bucket."""
        from . import routes
        return routes.forward_executor(self, int(tokens), torch.device(device).type, dtype)

    def warm_up(self, *tokens: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> "Plan":
        """Choose (and measure, see :mod:`routes`) the routes of these token counts and of
        the dense matrix (in ``dtype`` and in float64, which merging uses) now, so that no
        forward plans; returns ``self``."""
        for n in tokens:
            self.executor(n, device, dtype)
        from . import routes
        for d in dict.fromkeys((dtype, torch.float64)):
            routes.dense_plan(self, torch.device(device).type, d)
        return self

    def dense_executor(self) -> DenseExecutor:
        """``run(gates) -> T (out_features, in_features)``; the route follows the gates'
        device and dtype (and whether autograd records)."""
        from . import routes
        return functools.partial(routes.dense, self)

    def module(self, init: str = "kaiming", seed: int | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.nn.Module:
        """A fresh ``CircuitModule`` computing this circuit (see ``module.py``)."""
        if self.num_params > MAX_MODULE_PARAMS:
            raise QCError(f"the circuit has {self.num_params:,} parameters; a module holds at "
                          f"most {MAX_MODULE_PARAMS:,} (MAX_MODULE_PARAMS)")
        from .module import CircuitModule
        return CircuitModule(self, init=init, seed=seed, generator=generator,
                             dtype=dtype, device=device)


def compile(circuit: Circuit) -> Plan:  # noqa: A001 - the public name DESIGN.md fixes
    """Lower a concrete circuit, analyse it and prepare its planning (paths are lazy)."""
    if not isinstance(circuit, Circuit):
        raise QCError(f"compile takes a Circuit, got {type(circuit).__name__}")
    circuit.check_complete()
    if circuit.num_qudits == 0:
        raise QCError("cannot compile a circuit without qudits")
    if circuit.num_qudits > MAX_QUDITS:
        raise QCError(f"the circuit has {circuit.num_qudits} qudits; at most {MAX_QUDITS} "
                      "(MAX_QUDITS: every qudit is an einsum index, and torch.einsum has 52)")
    if len(circuit.gates) > MAX_GATES:
        raise QCError(f"the circuit has {len(circuit.gates)} gates; at most {MAX_GATES} (MAX_GATES)")
    graph = lower(circuit)
    return Plan(circuit=circuit, graph=graph, num_params=analysis.num_params(graph),
                rank_bound=analysis.rank_bound(graph), universal=analysis.universal(graph),
                forward_network=forward_network(graph), dense_network=dense_network(graph),
                signature=signature(circuit))
