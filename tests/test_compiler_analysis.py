"""Graph schema, analyses (parameters, rank bound, universality, FLOPs) and planning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcircuit import Circuit, QCError
from qcircuit.compiler import choice, compile, networks, token_bucket
from qcircuit.compiler.analysis import min_cut_wires

from reference import dense_operator, rel_err
from test_compiler_numerics import random_circuit

PAPER = Circuit(16, 8, 8, 4).all_pairs()


# --- graph schema ---------------------------------------------------------------------

def test_graph_schema():
    c = Circuit(2, 3, 4).gate((2, 0)).gate(1, out=5)
    g = compile(c).graph
    assert set(g.nodes) == {("in", 0), ("in", 1), ("in", 2), ("gate", 0), ("gate", 1),
                            ("out", 0), ("out", 1), ("out", 2)}
    assert g.nodes[("in", 2)] == {"kind": "input", "qudit": 2, "dim": 4}
    assert g.nodes[("out", 1)] == {"kind": "output", "qudit": 1, "dim": 5}
    gate = g.nodes[("gate", 0)]
    assert gate["kind"] == "gate" and gate["index"] == 0 and gate["qudits"] == (2, 0)
    assert gate["shape"] == (4, 2, 4, 2) and gate["num_params"] == 64
    assert gate["gate"] == c.gates[0]
    edges = {(u, v, d["qudit"], d["dim"]) for u, v, d in g.edges(data=True)}
    assert edges == {(("in", 0), ("gate", 0), 0, 2), (("in", 2), ("gate", 0), 2, 4),
                     (("in", 1), ("gate", 1), 1, 3), (("gate", 0), ("out", 0), 0, 2),
                     (("gate", 0), ("out", 2), 2, 4), (("gate", 1), ("out", 1), 1, 5)}
    assert sorted(d["wire"] for *_, d in g.edges(data=True)) == list(range(6))
    assert g.graph["in_dims"] == (2, 3, 4) and g.graph["out_dims"] == (2, 5, 4)


def test_graph_parallel_wires_and_passthrough():
    g = compile(Circuit(2, 2, 3).gate((0, 1)).gate((1, 0), out=(4, 2))).graph
    between = g.get_edge_data(("gate", 0), ("gate", 1))
    assert sorted((d["qudit"], d["dim"]) for d in between.values()) == [(0, 2), (1, 2)]
    assert g.get_edge_data(("in", 2), ("out", 2))[0]["dim"] == 3  # no gate on qudit 2
    assert g.number_of_edges() == 2 + 2 + 2 + 1


def test_incomplete_or_bad_circuits_are_rejected():
    with pytest.raises(QCError, match="auto"):
        compile(Circuit.auto_dims(3).all_pairs())
    with pytest.raises(QCError, match="Circuit"):
        compile("qudits 2 2")
    with pytest.raises(QCError, match="without qudits"):
        compile(Circuit())


# --- parameters, rank, universality ---------------------------------------------------

def test_paper_circuit_parameters_and_rank():
    plan = compile(PAPER)
    # pairs (0,1),(0,2),(0,3),(1,2),(1,3),(2,3): (d_i d_j)^2
    assert plan.num_params == 128**2 + 128**2 + 64**2 + 64**2 + 32**2 + 32**2 == 43008
    assert plan.rank_bound == 4096
    assert plan.universal


@pytest.mark.parametrize("circuit, bound", [
    # squeeze qudits 0, 1 through 2x2: the cut after the first gate is 2*2*16
    (Circuit(16, 16, 16).gate((0, 1), out=(2, 2)).gate((0, 1), out=(16, 16)), 64),
    (Circuit(4, 4), 16),                                        # identity
    (Circuit(2, 3).gate(0, out=1), 3),                          # a rank-1 factor on qudit 0
    (Circuit(4, 4, 4).gate((0, 1)), 64),                        # full rank
    (Circuit(2, 8).gate((0, 1)).gate(1, out=2).gate((0, 1)), 4),  # bottleneck inside
    (Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), out=(16, 43)).gate((0, 2)), 4096),  # 4096 -> 11008
    (Circuit(3, 5).gate((0, 1), out=(1, 7)), 7),                # out_features smaller than in
    # bottlenecks at different times on different qudits: q0 -> 1 first, q1 -> 2 later
    (Circuit(4, 4, 4).gate(0, out=1).gate((0, 1), out=(4, 4)).gate(1, out=2).gate((1, 2)), 4 * 4),
    # q0 is squeezed to 1 before q1 is, and re-expanded before q1 is squeezed: every cut
    # "at one time" crosses a dim-4 wire, the minimum cut crosses both dim-1 wires
    (Circuit(4, 4).gate(0, out=1).gate(0, out=4).gate(1, out=1).gate(1, out=4).gate((0, 1)), 1),
])
def test_rank_bounds_hand_computed(circuit, bound):
    assert compile(circuit).rank_bound == bound


def test_rank_bound_separates_nearly_equal_products():
    # the middle cut 999*1001 = 999999 beats the input and output cuts 1000*1000 by 1e-6
    c = Circuit(1000, 1000).gate((0, 1), out=(999, 1001)).gate((0, 1), out=(1000, 1000))
    assert compile(c).rank_bound == 999999


def test_rank_bound_is_recovered_exactly_from_the_cut():
    plan = compile(Circuit(16, 16, 16).gate((0, 1), out=(2, 2)).gate((0, 1), out=(16, 16)))
    cut = min_cut_wires(plan.graph)
    assert sorted(d["dim"] for *_, d in cut) == [2, 2, 16]
    assert isinstance(plan.rank_bound, int)


@pytest.mark.parametrize("seed", range(12))
def test_rank_bound_bounds_the_numerical_rank(seed):
    rng = np.random.default_rng(100 + seed)
    circuit = random_circuit(rng, max_features=120)
    m = compile(circuit).module(seed=seed, dtype=torch.float64)
    t = dense_operator(circuit.in_dims, [(g.qudits, p.detach().numpy())
                                         for g, p in zip(circuit.gates, m.gates)])
    assert np.linalg.matrix_rank(t) <= compile(circuit).rank_bound <= min(t.shape)


@pytest.mark.parametrize("circuit, expected", [
    (PAPER, True),
    (Circuit(2, 2).gate(0).gate(1), False),
    (Circuit(4), True),
    (Circuit(2, 2, 2).gate((0, 1)).gate((2, 1)), True),
    (Circuit(2, 2, 2).gate((0, 1)), False),
    (Circuit(2, 2, 2, 2).gate((0, 1, 2)).gate((3, 0)), True),
])
def test_universal(circuit, expected):
    assert compile(circuit).universal is expected


# --- FLOPs and paths ------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 16, 100, 2048])
def test_flops_hand_computed_small(tokens):
    assert compile(Circuit(4).gate(0, out=3)).flops(tokens) == 2 * tokens * 3 * 4
    assert compile(Circuit(2, 3).gate((0, 1))).flops(tokens) == 2 * tokens * 36
    # two gates on disjoint qudits: x then each gate (12 t + 18 t) beats merging the gates
    assert compile(Circuit(2, 3).gate(0).gate(1)).flops(tokens) == 2 * tokens * (12 + 18)


@pytest.mark.parametrize("tokens", [16, 100, 2048])
def test_flops_paper_circuit(tokens):
    # gate (i, j) applied to x costs tokens * 4096 * d_i * d_j multiply-adds
    pair_products = 128 + 128 + 64 + 64 + 32 + 32
    assert compile(PAPER).flops(tokens) == 2 * tokens * 4096 * pair_products


def test_path_reports_cost_bucket_and_opt_einsum_info():
    plan = compile(PAPER)
    p = plan.path(100)
    assert (p.tokens, p.bucket, p.optimizer) == (100, 128, "optimal")
    assert p.flops == plan.flops(100)
    assert len(p.path) == 6 and "Complete contraction" in p.info
    assert plan.path(128).path == p.path and plan.path(128).flops * 100 == p.flops * 128
    dense = plan.dense_path()
    assert dense.tokens is None and len(dense.path) == 5


def test_token_buckets():
    assert [token_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 2048, 2049)] == \
        [1, 2, 4, 4, 8, 16, 32, 2048, 4096]
    assert token_bucket(np.int64(5)) == 8
    for bad in (0, -3, 2.5, True):
        with pytest.raises(QCError):
            token_bucket(bad)


def test_optimizer_is_chosen_by_network_size():
    assert networks.choose_optimizer(2) == "optimal"
    assert networks.choose_optimizer(7) == "optimal"
    assert networks.choose_optimizer(8) == "dp"
    assert networks.choose_optimizer(12) == "dp"
    assert networks.choose_optimizer(13) == "greedy"
    medium = compile(Circuit(2, 2, 2, 2, 2).all_pairs())          # 10 gates + x
    large = compile(Circuit(2, 2, 2, 2, 2).all_pairs().repeat(2))  # 20 gates + x
    assert medium.path(8).optimizer == "dp" and large.path(8).optimizer == "greedy"
    m = large.module(seed=0, dtype=torch.float64)
    t_ref = dense_operator(large.in_dims, [(g.qudits, p.detach().numpy())
                                          for g, p in zip(large.circuit.gates, m.gates)])
    x = torch.randn(8, 32, dtype=torch.float64)
    assert rel_err(m(x), x.numpy() @ t_ref.T) < 1e-10
    assert rel_err(m.matrix(), t_ref) < 1e-10


def _count_choices(monkeypatch) -> list:
    calls = []
    real = choice.decide

    def counting(lowered, kind, bucket, *args, **kwargs):
        calls.append((kind, bucket))
        return real(lowered, kind, bucket, *args, **kwargs)

    monkeypatch.setattr(choice, "decide", counting)
    return calls


def test_no_planning_after_the_first_forward_of_a_bucket(monkeypatch):
    calls = _count_choices(monkeypatch)
    plan = compile(Circuit(2, 3, 2, 1).all_pairs())  # used nowhere else: nothing cached yet
    m = plan.module(seed=0)
    for tokens in (3, 4, 5, 8, 3, 7):
        m(torch.randn(tokens, 12)).sum().backward()
    assert calls == [("forward", 4), ("forward", 8)]
    assert plan.executor(3) is plan.executor(4) and plan.executor(5) is not plan.executor(4)
    m.matrix().sum().backward()  # while autograd records: the one expression, no choice
    assert len(calls) == 2
    with torch.no_grad():
        m.matrix()
    assert calls[2:] == [("dense", None)]
    before = len(calls)
    for _ in range(5):
        m(torch.randn(2, 4, 12)).sum().backward()
        with torch.no_grad():
            m.matrix()
    assert len(calls) == before


def test_warm_up_chooses_everything_in_advance(monkeypatch):
    plan = compile(Circuit(2, 3, 1).gate((0, 1))).warm_up(16, 100)
    monkeypatch.setattr(choice, "decide", lambda *a, **k: pytest.fail("planned again"))
    m = plan.module()
    with torch.no_grad():
        m(torch.randn(16, 6)), m(torch.randn(90, 6)), m.matrix()


def test_plan_is_frozen_and_shared_by_deepcopy():
    import copy
    plan = compile(PAPER)
    with pytest.raises(AttributeError):
        plan.num_params = 1
    m = plan.module(seed=0)
    twin = copy.deepcopy(m)
    assert twin.plan is plan and twin.gates[0] is not m.gates[0]


def test_equal_circuits_share_one_path_search(monkeypatch):
    import opt_einsum
    calls = []
    real = opt_einsum.contract_path

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(opt_einsum, "contract_path", counting)
    circuit = Circuit(5, 3, 2).gate((2, 1), out=(3, 3)).gate((0, 2))  # used nowhere else
    first, second = compile(circuit), compile(Circuit(5, 3, 2).gate((2, 1), out=(3, 3)).gate((0, 2)))
    assert first.path(37).path == second.path(33).path
    assert len(calls) == 1
