"""Analyses of the tensor graph: parameter count, rank bound, universality, path FLOPs.

All functions are pure and read graphs made by :func:`qcircuit.compiler.graph.lower`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import networkx as nx

_SOURCE, _SINK = ("source", -1), ("sink", -1)


def num_params(graph: nx.MultiDiGraph) -> int:
    """Total number of gate entries (the trainable parameters)."""
    return sum(data["num_params"] for _, data in graph.nodes(data=True) if data["kind"] == "gate")


def min_cut_wires(graph: nx.MultiDiGraph) -> list[tuple]:
    """The wire edges ``(u, v, data)`` of a minimum cut between input and output legs.

    Capacities are ``log(dim)``, so the cut minimises the product of the dims it
    crosses; they are scaled to integers (networkx's flow algorithms are exact on
    integers, not on floats). The cut is undirected: any partition of the nodes with
    every input leg on one side and every output leg on the other factorises ``T``
    through the wires it crosses, whichever way they point.
    """
    flow = nx.Graph()
    flow.add_nodes_from(graph.nodes)
    for u, v, data in graph.edges(data=True):
        cap = _log_capacity(data["dim"])
        if flow.has_edge(u, v):
            flow[u][v]["capacity"] += cap
        else:
            flow.add_edge(u, v, capacity=cap)
    for node, kind in graph.nodes(data="kind"):
        if kind == "input":
            flow.add_edge(_SOURCE, node)  # no capacity attribute: infinite
        elif kind == "output":
            flow.add_edge(node, _SINK)
    _, (source_side, _) = nx.minimum_cut(flow, _SOURCE, _SINK)
    return [(u, v, data) for u, v, data in graph.edges(data=True)
            if (u in source_side) != (v in source_side)]


def _log_capacity(dim: int) -> int:
    """``log(dim)`` as an integer in units of 2**-40: products of dims up to ~1e9 that
    differ stay apart by far more than the rounding of a few dozen wires."""
    return round(math.log(dim) * 2**40)


def rank_bound(graph: nx.MultiDiGraph) -> int:
    """An upper bound on rank(T): the exact integer product of a minimum cut's dims.

    The cut value (a rounded sum of logs) is used only to find the cut; the bound is
    then recomputed exactly as the product of the dims of the wires it crosses.
    """
    return math.prod(data["dim"] for *_, data in min_cut_wires(graph))


def universal(graph: nx.MultiDiGraph) -> bool:
    """Whether the gates' interaction graph (qudits joined when a gate acts on both)
    connects every qudit."""
    inter = nx.Graph()
    inter.add_nodes_from(range(graph.graph["num_qudits"]))
    for _, data in graph.nodes(data=True):
        if data["kind"] == "gate":
            qs = data["qudits"]
            inter.add_edges_from((a, b) for i, a in enumerate(qs) for b in qs[i + 1:])
    return inter.number_of_nodes() > 0 and nx.is_connected(inter)


def path_flops(inputs: Sequence[str], output: str, path: Sequence[Sequence[int]],
               sizes: Mapping[str, int]) -> int:
    """Multiply-adds × 2 of contracting ``inputs -> output`` along an opt_einsum ``path``.

    A pairwise (or larger) step costs 2 × the product of the sizes of every index it
    touches; a step on one operand (a transpose at most, in these networks) costs 0.
    """
    terms = [set(t) for t in inputs]
    total = 0
    for step in path:
        picked = [terms[i] for i in step]
        for i in sorted(step, reverse=True):
            del terms[i]
        involved = set().union(*picked)
        keep = set(output).union(*terms)
        if len(picked) > 1:
            total += 2 * math.prod(sizes[s] for s in involved)
        terms.append(involved & keep)
    return total
