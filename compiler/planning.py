"""Planning: einsum networks from the tensor graph, opt_einsum paths, the ``Plan``.

Two networks come from one graph:

* the **forward** network ``x, G_0, …, G_{K-1} -> y``: ``x`` is ``(tokens, *in_dims)``;
  every wire is an index, plus one batch index for the tokens;
* the **dense** network ``G_0, …, G_{K-1} [, I, …] -> T``: gates only, ``T`` indexed
  ``(out wires…, in wires…)``; a qudit no gate touches contributes an identity operand.

The forward path depends on the token count: it is planned once per token bucket
(the next power of two) and cached with its executor, so training does no planning
after warm-up. Execution goes through two seams, :meth:`Plan.executor` and
:meth:`Plan.dense_executor`; their default route runs the opt_einsum path step by step
with ``torch.einsum`` (opt_einsum's own dispatch cannot be traced by ``torch.compile``).
Under ``torch.compile`` a cache miss (planning) is a graph break; a warm cache traces
into one graph.
"""
from __future__ import annotations

import dataclasses
import functools
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
    """The default forward route: the bucket's opt_einsum path, step by step."""
    steps = path.steps

    def run(x2d: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        n = x2d.shape[0]
        y = run_steps(steps, [x2d.reshape(n, *in_dims), *gates])
        return y.reshape(n, out_features)

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


@dataclass(frozen=True, eq=False)
class Plan:
    """A compiled circuit: graph, analyses, and cached contraction plans.

    Immutable but for ``_cache`` (paths and executors per token bucket)."""

    circuit: Circuit
    graph: nx.MultiDiGraph = field(repr=False)
    num_params: int
    rank_bound: int
    universal: bool
    forward_network: Network = field(repr=False)
    dense_network: Network = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    in_dims = property(lambda self: self.circuit.in_dims)
    out_dims = property(lambda self: self.circuit.out_dims)
    in_features = property(lambda self: self.circuit.in_features)
    out_features = property(lambda self: self.circuit.out_features)
    num_gates = property(lambda self: len(self.circuit.gates))

    def __deepcopy__(self, memo: dict) -> "Plan":
        return self  # immutable; sharing the caches is the point

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = make()
            return value

    def _bucket_path(self, bucket: int) -> PathPlan:
        return self._cached(("path", bucket), lambda: plan_path(self.forward_network, bucket))

    def path(self, tokens: int) -> PathPlan:
        """The forward path used for ``tokens`` (planned for its bucket), costed at ``tokens``."""
        planned = self._bucket_path(token_bucket(tokens))
        tokens = int(tokens)
        net = self.forward_network
        flops = analysis.path_flops(net.inputs, net.output, planned.path, net.sized(tokens))
        return dataclasses.replace(planned, tokens=tokens, flops=flops)

    def flops(self, tokens: int) -> int:
        """Multiply-adds × 2 of the forward path chosen for ``tokens``."""
        return self.path(tokens).flops

    def dense_path(self) -> PathPlan:
        """The gates-only path of the dense matrix."""
        return self._cached(("dense_path",), lambda: plan_path(self.dense_network))

    def executor(self, tokens: int) -> Executor:
        """``run(x (tokens, in_features), gates) -> (tokens, out_features)``, cached per bucket."""
        bucket = token_bucket(tokens)
        run = self._cache.get(("executor", bucket))
        return run if run is not None else self._build_executor(bucket)

    @torch.compiler.disable
    def _build_executor(self, bucket: int) -> Executor:
        # the forward seam: the one place that decides how a bucket is executed
        from .schedule_exec import choose_executor  # the cost-model schedule, when it predicts a win
        return self._cached(("executor", bucket), lambda: choose_executor(
            self.circuit, bucket, einsum_executor(self._bucket_path(bucket), self.in_dims,
                                                  self.out_features)))

    def warm_up(self, *tokens: int) -> "Plan":
        """Plan and build the executors for these token counts and the dense matrix now
        (e.g. before ``torch.compile(..., fullgraph=True)``); returns ``self``."""
        for n in tokens:
            self.executor(n)
        self.dense_executor()
        return self

    def dense_executor(self) -> DenseExecutor:
        """``run(gates) -> T (out_features, in_features)``, cached."""
        run = self._cache.get(("dense_executor",))
        return run if run is not None else self._build_dense_executor()

    @torch.compiler.disable
    def _build_dense_executor(self) -> DenseExecutor:
        # the dense seam: the one place that decides how T is multiplied out. The light-cone
        # route (forward only) when the cost model predicts it beats the dense schedule's
        # estimate; opt_einsum otherwise and whenever autograd records (see lightcone.py)
        from .lightcone import make_lightcone_executor
        from .schedule import cached_schedule

        def build() -> DenseExecutor:
            fallback = einsum_dense_executor(self.dense_network, self.dense_path(),
                                             self.out_features, self.in_features)
            ref = cached_schedule(self.circuit, self.in_features, True).cost
            return make_lightcone_executor(self.circuit, fallback, ref)
        return self._cached(("dense_executor",), build)

    def module(self, init: str = "kaiming", seed: int | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.nn.Module:
        """A fresh ``CircuitModule`` computing this circuit (see ``module.py``)."""
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
    graph = lower(circuit)
    return Plan(circuit=circuit, graph=graph, num_params=analysis.num_params(graph),
                rank_bound=analysis.rank_bound(graph), universal=analysis.universal(graph),
                forward_network=forward_network(graph), dense_network=dense_network(graph))
