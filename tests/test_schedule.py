"""Schedules (compiler/schedule.py): exact against the dense float64 reference for every
layout form, fusion, reordering and the transposed dense plan; gradients; bfloat16."""
from __future__ import annotations

import random

import pytest
import torch

from qcircuit import Circuit, QCError
from qcircuit.compiler import compile as compile_circuit
from qcircuit.compiler import costmodel as cm
from qcircuit.compiler.dense import dense_matrix
from qcircuit.compiler.lightcone import _plan_side, run_lightcone, search_lightcone
from qcircuit.compiler.schedule import (FORMS, build_schedule, gate_step_budget, predicted_cost,
                                       transpose_circuit)
from qcircuit.compiler.schedule_exec import Workspace, run_schedule
from reference import circuit_operator, rel_err, tolerance


def random_circuit(rng: random.Random) -> Circuit:
    """2–5 qudits, dims 1–4, 2–6 gates of arity 1–3 on shuffled qudits, some non-square."""
    n = rng.randint(2, 5)
    c = Circuit(*[rng.randint(1, 4) if rng.random() < 0.9 else 1 for _ in range(n)])
    for _ in range(rng.randint(2, 6)):
        qudits = rng.sample(range(n), rng.randint(1, min(3, n)))
        out = None
        if rng.random() < 0.3:
            out = tuple(rng.randint(1, 4) for _ in qudits)
        c = c.gate(tuple(qudits), out=out)
    return c


def gates_for(c: Circuit, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(g.shape, generator=gen, dtype=dtype) for g in c.gates]


def random_cases(rng: random.Random, n: int, seed0: int = 0):
    """``n`` random circuits with their gates (seeds ``seed0 + case``) and float64 operator."""
    for case in range(n):
        c = random_circuit(rng)
        gates = gates_for(c, seed=seed0 + case)
        yield c, gates, circuit_operator(c, gates)


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float | None = None) -> None:
    """Normwise, within ``rel`` (default: the tolerance of ``got``'s dtype)."""
    rel = tolerance(got.dtype) if rel is None else rel
    err = rel_err(got, want)
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"


VARIANTS = [dict(), dict(fuse=False), dict(layout=False), dict(reorder=False),
            dict(fuse=False, layout=False), dict(max_block=8)] + [dict(forms=(f,) + (("suffix",) if f == "batched" else ())) for f in FORMS]


# what these tests check of a schedule's structure (which forms a variant picks, whether
# gates fuse) is a cost decision: build_schedule prices with the shipped constants unless
# given a machine, so it does not depend on what a calibration measured on this machine


def test_random_circuits_every_variant_matches_reference():
    rng = random.Random(1)
    kinds = set()
    for c, gates, want in random_cases(rng, 40):
        for opts in VARIANTS:
            tokens = rng.choice([1, 3, 17])
            try:
                sched = build_schedule(c, tokens, **opts)
            except QCError:
                assert "forms" in opts  # a single form can be infeasible (e.g. block = all axes)
                continue
            kinds.update(s.kind for s in sched.steps)
            x = torch.randn(tokens, c.in_features, dtype=torch.float64)
            assert_close(run_schedule(sched, x, gates), x @ want.T)
        assert_close(dense_matrix(c, gates), want)
    assert kinds >= set(FORMS) | {"permute"}


def test_out_of_order_non_square_and_fused():
    c = (Circuit(3, 2, 4).gate((2, 0), out=(2, 5)).gate((1, 2)).gate((0, 1, 2), out=(2, 3, 1))
         .gate(1))
    gates = gates_for(c)
    want = circuit_operator(c, gates)
    fused = build_schedule(c, 5, max_block=1000)
    assert any(len(s.gates) > 1 for s in fused.steps)
    x = torch.randn(5, c.in_features, dtype=torch.float64)
    for sched in (fused, build_schedule(c, 5, fuse=False)):
        assert_close(run_schedule(sched, x, gates), x @ want.T)
    for t in (1, 2, 9):  # a schedule runs any token count, not only the one it was planned for
        x = torch.randn(t, c.in_features, dtype=torch.float64)
        assert_close(run_schedule(fused, x, gates), x @ want.T)


def test_dense_both_directions_and_transpose_circuit():
    c = Circuit(4, 3, 2).gate((0, 1), out=(2, 5)).gate((2, 1)).gate(0, out=3)
    gates = gates_for(c)
    want = circuit_operator(c, gates)
    ct = transpose_circuit(c)
    assert ct.in_dims == c.out_dims and ct.out_dims == c.in_dims
    gates_t = [g.permute(*range(g.dim() // 2, g.dim()), *range(g.dim() // 2)) for g in reversed(gates)]
    assert_close(circuit_operator(ct, gates_t), want.T)
    seen = set()
    for max_block in (4, 8, 1000):
        sched = build_schedule(c, c.in_features, dense=True, max_block=max_block)
        seen.add(sched.transposed)
        assert sched.steps[0].kind == "materialize"
        assert_close(dense_matrix(sched, gates), want)
    assert_close(dense_matrix(c, gates, Workspace()), want)


def test_dense_paper_circuit_picks_a_direction_and_is_exact():
    c = Circuit(4, 2, 2, 3).all_pairs()
    gates = gates_for(c)
    assert_close(dense_matrix(c, gates), circuit_operator(c, gates))


def test_gradcheck_forward_and_dense():
    c = Circuit(2, 3, 2).gate((2, 0)).gate((0, 1), out=(3, 2)).gate((1, 2))
    gates = [g.requires_grad_() for g in gates_for(c)]
    for opts in (dict(), dict(fuse=False), dict(forms=("prefix", "rot_back")),
                 dict(forms=("suffix", "rot_front")), dict(forms=("batched", "suffix"))):
        sched = build_schedule(c, 4, **opts)
        x = torch.randn(4, c.in_features, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))
    for max_block in (4, 1000):
        sched = build_schedule(c, c.in_features, dense=True, max_block=max_block)
        assert torch.autograd.gradcheck(lambda *g: dense_matrix(sched, g), tuple(gates))
    sched = build_schedule(c, 4)  # create_graph: the backward recomputes differentiably
    assert torch.autograd.gradgradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))


def reference_grads(c: Circuit, gates, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``Σ w·(T x)`` in ``x`` and every gate: a plain per-gate tensordot
    contraction differentiated by autograd's own backward."""
    x2 = x.detach().clone().requires_grad_()
    g2 = [g.detach().clone().requires_grad_() for g in gates]
    y = x2.reshape(x.shape[0], *c.in_dims)
    for gate, t in zip(c.gates, g2):
        k = gate.arity
        y = torch.tensordot(y, t, dims=([q + 1 for q in gate.qudits], list(range(k, 2 * k))))
        y = torch.movedim(y, list(range(y.dim() - k, y.dim())), [q + 1 for q in gate.qudits])
    (y.reshape(x.shape[0], -1) * w).sum().backward()
    return [x2.grad] + [g.grad for g in g2]


def schedule_grads(sched, gates, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    gates = [g.detach().clone().requires_grad_() for g in gates]
    (run_schedule(sched, x, gates) * w).sum().backward()
    return [x.grad] + [g.grad for g in gates]


@pytest.mark.parametrize("tokens", [6, 2048])  # 2048: gate gradients split over row blocks
def test_gradients_match_autograd_reference_on_random_circuits(tokens):
    rng = random.Random(7)
    for case in range(10):
        c = random_circuit(rng)
        gates = gates_for(c, seed=case)
        x = torch.randn(tokens, c.in_features, dtype=torch.float64)
        w = torch.randn(tokens, c.out_features, dtype=torch.float64)
        got = schedule_grads(build_schedule(c, tokens), gates, x, w)
        for a, b in zip(got, reference_grads(c, gates, x, w)):
            assert_close(a, b)


@pytest.mark.parametrize("inner", [64, 2])
@pytest.mark.parametrize("by_bmm", [True, False])
def test_batched_gate_gradient_both_ways(inner, by_bmm, monkeypatch):
    """A gate on middle axes: its gradient as a batched product summed over the batch, or as
    one tensordot (whichever the cost model says, here forced); both exact."""
    monkeypatch.setattr(cm, "batched_gram", lambda *a: (0.0, by_bmm))
    c = Circuit(3, 4, inner).gate((0, 1), out=(2, 4))
    tokens = 5
    sched = build_schedule(c, tokens, forms=("batched",))
    (step,) = sched.steps
    assert step.kind == "batched"
    gates = gates_for(c)
    x = torch.randn(tokens, c.in_features, dtype=torch.float64)
    w = torch.randn(tokens, c.out_features, dtype=torch.float64)
    for a, b in zip(schedule_grads(sched, gates, x, w), reference_grads(c, gates, x, w)):
        assert_close(a, b)


def test_workspace_reuse_no_grad_and_retain_graph():
    c = Circuit(4, 4, 2).all_pairs()
    gates = [g.requires_grad_() for g in gates_for(c)]
    sched = build_schedule(c, 8)
    ws = Workspace()
    x = torch.randn(8, c.in_features, dtype=torch.float64)
    want = x @ circuit_operator(c, gates).T
    grads = []
    for _ in range(3):  # buffers recycled from the previous step must not change results
        y = run_schedule(sched, x, gates, ws)
        assert_close(y, want)
        (gx,) = torch.autograd.grad(y.sum(), [gates[0]])
        grads.append(gx)
    assert all(rel_err(g, grads[0]) <= tolerance(torch.float64) for g in grads)
    with torch.no_grad():
        assert_close(run_schedule(sched, x, gates, ws), want)
    x.requires_grad_()
    y = run_schedule(sched, x, gates, ws)
    first = torch.autograd.grad(y.sum(), [x], retain_graph=True)[0]
    run_schedule(sched, x * 2, gates, ws).sum().backward()  # another step while y's graph lives
    assert_close(torch.autograd.grad(y.sum(), [x])[0], first)
    assert_close(run_schedule(build_schedule(c, 3), x, gates, Workspace()), want)  # any token count


def test_bfloat16_and_mixed_input_dtype():
    c = Circuit(4, 2, 4).gate((2, 0)).gate((0, 1), out=(2, 4)).gate((1, 2))
    gates = [g.to(torch.bfloat16).requires_grad_() for g in gates_for(c)]
    want = circuit_operator(c, gates)  # of the rounded gates: only the arithmetic differs
    x = torch.randn(16, c.in_features, dtype=torch.bfloat16).double()
    for opts in (dict(), dict(fuse=False), dict(layout=False)):
        y = run_schedule(build_schedule(c, 16, dtype=torch.bfloat16, **opts), x, gates)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert_close(y, x @ want.T, rel=tolerance(torch.bfloat16, terms=16))
    assert_close(dense_matrix(c, gates).detach(), want, rel=tolerance(torch.bfloat16, terms=16))


def test_bad_input_gives_qcerror():
    c = Circuit(2, 2).gate((0, 1))
    with pytest.raises(QCError):
        build_schedule(c, 0)
    with pytest.raises(QCError):
        build_schedule(c, 4, forms=("diagonal",))
    with pytest.raises(QCError):
        run_schedule(build_schedule(c, 4), torch.randn(4, 5), gates_for(c))
    with pytest.raises(QCError):
        run_schedule(build_schedule(c, 4), torch.randn(4, 4), [])


def test_memory_budget_keeps_fewer_buffers_than_the_reference_when_it_matters():
    c = Circuit(16, 8, 8, 4).all_pairs()
    assert gate_step_budget(c, 512) is None  # 2M-element activations: speed only
    for tokens in (2048, 4096):
        budget = gate_step_budget(c, tokens)
        assert budget == len(c.gates) - 1
        free = build_schedule(c, tokens, memory=False)
        kept = build_schedule(c, tokens)
        steps = lambda s: sum(1 for st in s.steps if st.gates)  # noqa: E731
        assert budget >= steps(kept)
        assert free.cost <= kept.cost  # the budget costs predicted time, never saves it
        # no fusion allowed: no plan fits the budget, so the planner takes the fastest
        assert build_schedule(c, tokens, fuse=False).cost == build_schedule(
            c, tokens, fuse=False, memory=False).cost
    small = Circuit(4, 3, 2).all_pairs()
    gates = gates_for(small, seed=9)
    x = torch.randn(1 << 18, small.in_features, dtype=torch.float64)  # budget applies
    sched = build_schedule(small, x.shape[0])
    assert gate_step_budget(small, x.shape[0]) is not None
    with torch.no_grad():
        assert_close(run_schedule(sched, x, gates), x @ circuit_operator(small, gates).T)


def test_planner_never_predicts_worse_than_its_restricted_variants():
    c = Circuit(16, 8, 8, 4).all_pairs()
    for tokens in (16, 512, 2048):
        best = predicted_cost(c, tokens, memory=False)
        for opts in (dict(fuse=False), dict(layout=False), dict(reorder=False),
                     dict(fuse=False, layout=False)):
            assert best <= predicted_cost(c, tokens, memory=False, **opts) + 1e-12


# ----------------------------------------------------------------------------- light cone


def test_lightcone_random_circuits_both_sides_match_reference():
    sides = set()
    for c, gates, want in random_cases(random.Random(7), 60):
        for tr, cap in ((False, 1024), (True, 1024), (False, 8), (True, 8)):
            plan = _plan_side(cm.SHIPPED, transpose_circuit(c) if tr else c, tr, cap)
            if plan is None:  # only when no gate-closed prefix fits the cap
                assert cap == 8
                continue
            sides.add((tr, len(plan.steps) > 0))
            got = run_lightcone(plan, gates, Workspace())
            assert got.shape == (c.out_features, c.in_features)
            assert_close(got, want)
    assert sides == {(False, True), (True, True), (False, False), (True, False)}


def test_lightcone_fold_matches_reference_and_unfolded_plan():
    """The first remaining gate written straight from A (no memset, no A ⊗ I pass) gives the
    same operator as the unfolded plan; random circuits reach both outcomes."""
    folded = 0
    for c, gates, want in random_cases(random.Random(11), 80, seed0=100):
        for tr, cap in ((False, 4), (True, 4), (False, 8), (True, 8), (False, 16), (True, 16)):
            circ = transpose_circuit(c) if tr else c
            plan = _plan_side(cm.SHIPPED, circ, tr, cap, fold=True)  # folds wherever it can
            if plan is None:
                continue
            if plan.fold is not None:
                folded += 1
                assert plan.fold not in plan.prefix and all(s.gate != plan.fold for s in plan.steps)
                plain = _plan_side(cm.SHIPPED, circ, tr, cap, fold=False)
                assert plain.fold is None
                assert_close(run_lightcone(plain, gates, Workspace()), want)
            assert_close(run_lightcone(plan, gates, Workspace()), want)
    assert folded >= 10
    paper = Circuit(16, 8, 8, 4).all_pairs()
    plan = search_lightcone(paper)
    assert plan.cost <= _plan_side(cm.SHIPPED, plan.circuit, plan.transposed, fold=False).cost


def test_lightcone_out_of_order_arity3_non_square_and_paper_circuit():
    c = (Circuit(3, 2, 4, 2).gate((2, 0), out=(3, 2)).gate((1, 2))
         .gate((3, 1, 0), out=(2, 3, 2)).gate((2, 1)))
    p = Circuit(4, 2, 2, 3).all_pairs()
    for circ in (c, p):
        gates = gates_for(circ, seed=3)
        plan = search_lightcone(circ, max_prefix=12)
        assert plan is not None and plan.steps
        assert_close(run_lightcone(plan, gates), circuit_operator(circ, gates))


def test_lightcone_absent_when_no_small_prefix_and_seam_falls_back():
    big = Circuit(2, 2, 2, 2, 2, 2, 2).gate((0, 1))  # 7 qudits: beyond the layout search
    assert search_lightcone(big) is None
    wide = Circuit(32, 32, 2).gate((0, 1)).gate((1, 2))  # first gate's support 1024 -> 1024 ok
    assert search_lightcone(wide) is not None
    huge = Circuit(64, 32).gate((0, 1)).gate((1,))  # every prefix needs a 2048-wide A
    assert _plan_side(cm.SHIPPED, huge, False) is None or _plan_side(cm.SHIPPED, huge, False).prefix == (1,)
    odd = (Circuit(3, 2, 4, 2).gate((2, 0), out=(3, 2)).gate((3, 1, 0), out=(2, 3, 2))
           .gate((1, 2)).gate((0, 3, 2), out=(2, 2, 1)))
    assert search_lightcone(odd, max_prefix=12) is None  # no permute-free row order exists
    for circ in (big, huge, odd, Circuit(4, 2, 3).all_pairs()):
        plan = compile_circuit(circ)
        gates = gates_for(circ, seed=5)
        with torch.no_grad():
            assert_close(plan.dense_executor()(gates), circuit_operator(circ, gates))


def test_dense_seam_gradcheck_still_differentiable():
    c = Circuit(2, 3, 2).gate((2, 0)).gate((1, 2), out=(2, 2)).gate((0, 1))
    gates = [g.requires_grad_() for g in gates_for(c, seed=2)]
    run = compile_circuit(c).dense_executor()
    assert torch.autograd.gradcheck(lambda *gs: run(list(gs)), gates)
