"""Lowering: a concrete ``Circuit`` becomes a networkx tensor graph.

Schema of the graph returned by :func:`lower` (an ``nx.MultiDiGraph``; edges point the
way data flows, from the input side to the output side):

Nodes
    ``("in", q)``   ``kind="input"``,  ``qudit=q``, ``dim`` = the circuit's input dim of qudit ``q``.
    ``("gate", k)`` ``kind="gate"``,   ``index=k`` (circuit order), ``gate`` (the IR ``Gate``),
                    ``qudits``, ``in_dims``, ``out_dims``, ``shape`` (= ``out_dims + in_dims``),
                    ``num_params``.
    ``("out", q)``  ``kind="output"``, ``qudit=q``, ``dim`` = the circuit's output dim of ``q``.

Edges (one per wire segment; parallel edges occur when two gates share several qudits)
    ``u -> v`` with ``qudit`` (which wire), ``dim`` (the dim it carries) and ``wire``
    (an integer id, unique in the graph, numbering segments in creation order: the
    input legs' segments as gates consume them, then the output legs' in qudit order).
    A qudit that no gate touches gives an edge ``("in", q) -> ("out", q)``.

Graph attributes: ``in_dims``, ``out_dims``, ``num_qudits``, ``num_gates``.

Helpers here read the graph back in the order the einsum networks need.
"""
from __future__ import annotations

import networkx as nx

from qcircuit.ir import Circuit

Node = tuple[str, int]


def lower(circuit: Circuit) -> nx.MultiDiGraph:
    """The tensor graph of a concrete circuit (schema in the module docstring)."""
    in_dims, out_dims = circuit.in_dims, circuit.out_dims  # raises QCError when incomplete
    g = nx.MultiDiGraph(in_dims=in_dims, out_dims=out_dims,
                        num_qudits=len(in_dims), num_gates=len(circuit.gates))
    for q, d in enumerate(in_dims):
        g.add_node(("in", q), kind="input", qudit=q, dim=d)
    # the open end of every wire: (node, dim) of the last thing that wrote it
    front: list[tuple[Node, int]] = [(("in", q), d) for q, d in enumerate(in_dims)]
    wire = 0
    for k, gate in enumerate(circuit.gates):
        node = ("gate", k)
        g.add_node(node, kind="gate", index=k, gate=gate, qudits=gate.qudits,
                   in_dims=gate.in_dims, out_dims=gate.out_dims, shape=gate.shape,
                   num_params=gate.num_params)
        for q, d_in, d_out in zip(gate.qudits, gate.in_dims, gate.out_dims):
            src, dim = front[q]
            g.add_edge(src, node, qudit=q, dim=dim, wire=wire)
            wire += 1
            front[q] = (node, d_out)
    for q, d in enumerate(out_dims):
        g.add_node(("out", q), kind="output", qudit=q, dim=d)
        src, dim = front[q]
        g.add_edge(src, ("out", q), qudit=q, dim=dim, wire=wire)
        wire += 1
    return g


def num_wires(graph: nx.MultiDiGraph) -> int:
    """How many wire segments (edges) the graph has."""
    return graph.number_of_edges()


def gate_nodes(graph: nx.MultiDiGraph) -> list[Node]:
    """Gate nodes in circuit order."""
    return [("gate", k) for k in range(graph.graph["num_gates"])]


def _edge_on(edges, qudit: int) -> dict:
    for *_, data in edges:
        if data["qudit"] == qudit:
            return data
    raise KeyError(qudit)  # unreachable for graphs made by lower()


def gate_wires(graph: nx.MultiDiGraph, node: Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(output wire ids, input wire ids)`` of a gate node, both in its qudit order."""
    qudits = graph.nodes[node]["qudits"]
    outs = list(graph.out_edges(node, data=True))
    ins = list(graph.in_edges(node, data=True))
    return (tuple(_edge_on(outs, q)["wire"] for q in qudits),
            tuple(_edge_on(ins, q)["wire"] for q in qudits))


def input_wires(graph: nx.MultiDiGraph) -> tuple[int, ...]:
    """The wire leaving each input leg, in qudit order."""
    return tuple(next(iter(graph.out_edges(("in", q), data=True)))[2]["wire"]
                 for q in range(graph.graph["num_qudits"]))


def output_wires(graph: nx.MultiDiGraph) -> tuple[int, ...]:
    """The wire entering each output leg, in qudit order."""
    return tuple(next(iter(graph.in_edges(("out", q), data=True)))[2]["wire"]
                 for q in range(graph.graph["num_qudits"]))


def wire_dims(graph: nx.MultiDiGraph) -> dict[int, int]:
    """wire id -> dim."""
    return {data["wire"]: data["dim"] for *_, data in graph.edges(data=True)}
