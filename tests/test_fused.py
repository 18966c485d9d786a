"""The fused permute + gate GEMM steps (compiler/fused.py, gate_kernel.c): same numbers as the
separate steps and the dense float64 reference, every gradient, threads and fallbacks."""
from __future__ import annotations

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import fused, schedule_exec
from qcircuit.compiler.schedule import build_schedule
from qcircuit.compiler.schedule_exec import Workspace, bound_steps, fuse_gathers, run_schedule
from reference import circuit_operator, rel_err, tolerance

pytestmark = [pytest.mark.skipif(not fused.available(), reason="needs a C compiler and torch's BLAS")]

CIRCUITS = [
    Circuit(4, 3, 2).gate((0, 2)).gate((1, 0), out=(2, 5)).gate((2, 1)),  # non-square
    Circuit(4, 2, 3, 2).all_pairs(),
]


def _data(c: Circuit, tokens: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gates = [torch.randn(g.shape, generator=gen, dtype=dtype).requires_grad_() for g in c.gates]
    x = torch.randn(tokens, c.in_features, generator=gen, dtype=dtype).requires_grad_()
    gy = torch.randn(tokens, c.out_features, generator=gen, dtype=dtype)
    return gates, x, gy


def _step(sched, x, gates, gy, want=None):
    """Output and the gradients of whichever of x, gates require them."""
    y = run_schedule(sched, x, gates, Workspace())
    inputs = [t for t in (x, *gates) if t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, inputs, gy)]


def _close(a, b, tol=1e-12) -> bool:
    """Normwise: fused and separate steps differ only in the gate gradient's summation order."""
    return rel_err(a, b) <= tol


def _unfused(monkeypatch):
    monkeypatch.setattr(schedule_exec, "fuse_gathers", lambda bound, x: bound)


@pytest.mark.parametrize("c", CIRCUITS)
@pytest.mark.parametrize("tokens", [2, 7, 40])
def test_fused_steps_match_reference_and_separate_steps(c, tokens, monkeypatch):
    sched = build_schedule(c, tokens, fuse=False, layout=False)
    gates, x, gy = _data(c, tokens)
    kinds = [b.kind for b in fuse_gathers(bound_steps(sched, tokens), x)]
    assert "gather" in kinds  # the planner left a permute before a suffix GEMM, now fused
    got = _step(sched, x, gates, gy)
    op = circuit_operator(c, gates)
    assert _close(got[0], x.detach() @ op.T) and _close(got[1], gy @ op)
    _unfused(monkeypatch)
    for a, b in zip(got, _step(sched, x, gates, gy)):
        assert _close(a, b)


def test_fused_gradcheck_and_double_backward():
    c = CIRCUITS[0]
    sched = build_schedule(c, 3, fuse=False, layout=False)
    gates, x, _ = _data(c, 3)
    assert "gather" in [b.kind for b in fuse_gathers(bound_steps(sched, 3), x)]
    assert torch.autograd.gradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))
    assert torch.autograd.gradgradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))


@pytest.mark.parametrize("grad_x,grad_gates", [(True, False), (False, True)])
def test_fused_backward_with_only_some_gradients(grad_x, grad_gates, monkeypatch):
    c = CIRCUITS[1]
    sched = build_schedule(c, 9, fuse=False, layout=False)
    gates, x, gy = _data(c, 9, seed=3)
    x.requires_grad_(grad_x)
    for g in gates:
        g.requires_grad_(grad_gates)
    got = _step(sched, x, gates, gy)
    _unfused(monkeypatch)
    for a, b in zip(got, _step(sched, x, gates, gy)):
        assert _close(a, b)


def test_fused_blocks_split_over_threads(monkeypatch):
    """Enough tokens for several blocks per thread (and no single-thread shortcut)."""
    c = Circuit(4, 4, 4).all_pairs()
    tokens = 2048
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sched = build_schedule(c, tokens, fuse=False, layout=False)
        gates, x, gy = _data(c, tokens, seed=5)
        assert "gather" in [b.kind for b in fuse_gathers(bound_steps(sched, tokens), x)]
        got = _step(sched, x, gates, gy)
        assert _close(got[0], x.detach() @ circuit_operator(c, gates).T)
        _unfused(monkeypatch)
        for a, b in zip(got, _step(sched, x, gates, gy)):
            assert _close(a, b)
    finally:
        torch.set_num_threads(before)


def test_fused_steps_fall_back_when_the_kernel_declines(monkeypatch):
    c = CIRCUITS[0]
    sched = build_schedule(c, 5, fuse=False, layout=False)
    gates, x, gy = _data(c, 5, seed=7)
    want = _step(sched, x, gates, gy)
    monkeypatch.setattr(fused, "gate_forward", lambda *a: False)
    monkeypatch.setattr(fused, "gate_backward", lambda *a: False)
    for a, b in zip(_step(sched, x, gates, gy), want):
        assert _close(a, b)


def test_float32_is_fused_and_other_dtypes_are_not():
    c = CIRCUITS[1]
    sched = build_schedule(c, 6, fuse=False, layout=False)
    gates64, x64, gy64 = _data(c, 6, seed=11)
    gates = [g.detach().float().requires_grad_() for g in gates64]
    x = x64.detach().float().requires_grad_()
    assert "gather" in [b.kind for b in fuse_gathers(bound_steps(sched, 6), x)]
    got = _step(sched, x, gates, gy64.float())
    op = circuit_operator(c, gates64)
    assert rel_err(got[0], x64.detach() @ op.T) <= tolerance(torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.complex64):
        assert "gather" not in [b.kind for b in fuse_gathers(bound_steps(sched, 6), x.to(dtype))]


def test_planner_prices_fused_permutes(monkeypatch):
    """The paper circuit at 512 tokens: pricing a permute before a suffix GEMM as fused (never
    dearer than apart) can only lower the best predicted cost."""
    c = Circuit(16, 8, 8, 4).all_pairs()
    with_fusion = build_schedule(c, 512)
    monkeypatch.setattr(fused, "available", lambda: False)
    without = build_schedule(c, 512)
    assert with_fusion.cost <= without.cost


def test_gate_kernel_takes_a_transposed_gate_matrix_view():
    """Dense plans hand over gate matrices that are transposed views: the kernel still runs."""
    shape, perm = (3, 4, 2, 3), (0, 2, 3, 1)
    x = torch.randn(shape, dtype=torch.float64)
    m = torch.randn(4, 12, dtype=torch.float64)  # (k × k2) storage; its .t() is a view
    y = torch.empty(3 * 6 * 12, dtype=torch.float64)  # 6 rows of 4 per token -> 6 of 12
    assert fused.gate_forward(y, x.reshape(-1), m.t(), shape, perm)
    want = x.permute(perm).reshape(-1, 4) @ m
    assert _close(y.view(-1, 12), want)


def test_gate_kernel_declines_buffers_of_the_wrong_size():
    shape, perm = (3, 4, 2, 3), (0, 2, 3, 1)
    x = torch.randn(shape, dtype=torch.float64).reshape(-1)
    m = torch.randn(12, 4, dtype=torch.float64)
    assert not fused.gate_forward(torch.empty(72, dtype=torch.float64), x, m, shape, perm)
    gy = torch.randn(216, dtype=torch.float64)
    assert not fused.gate_backward(x, gy, m, torch.empty(5, dtype=torch.float64), None,
                                   shape, perm, (3, 2, 3, 4), (0, 3, 1, 2))
