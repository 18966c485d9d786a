"""A circuit lowered for planning: its tensor graph, analyses and einsum networks; plain data.

:func:`lower_circuit` checks the compiler's caps, lowers the circuit to its networkx graph
(``graph.py``), runs the analyses (``analysis.py``) and builds the forward and dense einsum
networks (``networks.py``). Everything below the routes works on a :class:`Lowered`; the
public :class:`~qcircuit.compiler.plan.Plan` adds the front doors (modules, decisions).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import networkx as nx

from qcircuit.errors import QCError
from qcircuit.ir import Circuit

from . import analysis
from .caps import COMPILE_MAX_GATES, COMPILE_MAX_QUDITS
from .graph import lower
from .networks import ContractionPath, Network, contraction_path, dense_network, forward_network, token_bucket


def signature(circuit: Circuit) -> str:
    """A short stable name of the circuit's structure (dims and gates): the circuit's part of
    every tuning key (decisions, executors, wisdom)."""
    text = repr((circuit.in_dims, tuple((g.qudits, g.in_dims, g.out_dims) for g in circuit.gates)))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True, eq=False)
class Lowered:
    """A circuit with its graph, analyses and two einsum networks (paths are planned lazily)."""

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

    def __deepcopy__(self, memo: dict) -> "Lowered":
        return self  # immutable

    def path(self, tokens: int) -> ContractionPath:
        """The one-expression forward path for ``tokens`` (planned for its bucket), costed
        at ``tokens``."""
        planned = contraction_path(self.forward_network, token_bucket(tokens))
        tokens = int(tokens)
        net = self.forward_network
        flops = analysis.path_flops(net.inputs, net.output, planned.path, net.sized(tokens))
        return dataclasses.replace(planned, tokens=tokens, flops=flops)

    def flops(self, tokens: int) -> int:
        """Multiply-adds × 2 of the one-expression forward path for ``tokens``."""
        return self.path(tokens).flops

    def dense_path(self) -> ContractionPath:
        """The gates-only path of the dense matrix."""
        return contraction_path(self.dense_network)


def lowered_fields(circuit: Circuit) -> dict:
    """The fields of a :class:`Lowered` (or subclass) for ``circuit``, after the caps."""
    if not isinstance(circuit, Circuit):
        raise QCError(f"compile takes a Circuit, got {type(circuit).__name__}")
    circuit.check_complete()
    if circuit.num_qudits == 0:
        raise QCError("cannot compile a circuit without qudits")
    if circuit.num_qudits > COMPILE_MAX_QUDITS:
        raise QCError(f"the circuit has {circuit.num_qudits} qudits; at most {COMPILE_MAX_QUDITS} "
                      "(COMPILE_MAX_QUDITS: every qudit is an einsum index, and torch.einsum has 52)")
    if len(circuit.gates) > COMPILE_MAX_GATES:
        raise QCError(f"the circuit has {len(circuit.gates)} gates; at most {COMPILE_MAX_GATES} "
                      "(COMPILE_MAX_GATES)")
    graph = lower(circuit)
    return dict(circuit=circuit, graph=graph, num_params=analysis.num_params(graph),
                rank_bound=analysis.rank_bound(graph), universal=analysis.universal(graph),
                forward_network=forward_network(graph), dense_network=dense_network(graph),
                signature=signature(circuit))
