"""The triton route's kernels against float64 dense references: forward, the input's and
every gate's gradient, the dense matrix, float32 and bfloat16 activations, circuits that
fall back, and the module and layer taking 16-bit activations uncast.

On a machine without CUDA the kernels run in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``, set by conftest before anything imports triton); with CUDA they run
natively. Skipped only where Triton is not installed. Shapes are tiny: the interpreter
runs every program in Python.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qcircuit import Circuit, QCError  # noqa: E402
from qcircuit.compiler import compile, triton_plan, triton_route  # noqa: E402
from reference import circuit_operator, rel_err, tolerance, torch_operator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_route.runs_on("cpu"):
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (conftest sets it)",
                allow_module_level=True)

SQUARE = Circuit(4, 4, 4).all_pairs()                              # 64 -> 64, dots
UP = Circuit(4, 4, 4).gate((0, 1)).gate((1, 2), out=(4, 43))       # 64 -> 688, padded 43
DOWN = Circuit(4, 43).gate((0, 1), out=(4, 16)).gate(1)            # 172 -> 64
SMALL = Circuit(2, 3, 2).gate((2, 0)).gate((0, 1), out=(3, 2)).gate((1, 2))  # dim 3: padded
CIRCUITS = {"square": SQUARE, "up": UP, "down": DOWN, "small": SMALL}
EPS_BF16 = torch.finfo(torch.bfloat16).eps


def bound(dtype: torch.dtype, circuit: Circuit) -> float:
    """Normwise: float32 as the other routes' tests; a 16-bit run rounds its output (and
    the states between passes) to bfloat16: a few of its roundings."""
    if dtype == torch.bfloat16:
        return 4 * EPS_BF16
    return tolerance(dtype, terms=max(circuit.in_features, circuit.out_features))


def gates_for(circuit: Circuit, seed: int = 0) -> list[torch.Tensor]:
    """Float64 gates holding float32 values, Kaiming-uniform as the module draws them."""
    return [g.detach().float().double() for g in compile(circuit).module(seed=seed).gates]


def check_run(circuit: Circuit, dtype: torch.dtype, tokens: int = 5, bucket: int = 8,
              gate_grads: bool = True) -> triton_route.TritonSteps:
    """Forward, input gradient and (``gate_grads``) every gate's gradient of the route's
    run on ``dtype`` activations and float32 gates, against float64 references."""
    plan = compile(circuit)
    steps = triton_route.search(plan, bucket, dtype, float("inf"))
    run = triton_route.build(plan, steps)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, circuit.in_features, generator=gen).to(DEVICE, dtype)
    gy = torch.randn(tokens, circuit.out_features, generator=gen).to(DEVICE, dtype)
    g64 = gates_for(circuit)
    gates = [g.to(DEVICE, torch.float32).requires_grad_(gate_grads) for g in g64]
    x.requires_grad_()
    y = run(x, gates)
    assert y.dtype == dtype and y.shape == (tokens, circuit.out_features)
    x64, gy64 = x.detach().double().cpu(), gy.double().cpu()
    t = circuit_operator(circuit, g64)
    tol = bound(dtype, circuit)
    assert rel_err(y, x64 @ t.T) <= tol
    y.backward(gy)
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, gy64 @ t) <= tol
    if gate_grads:
        leaves = [g.clone().requires_grad_() for g in g64]
        want = torch.autograd.grad(torch_operator(circuit, leaves), leaves,
                                   grad_outputs=gy64.T @ x64)
        for k, (g, w) in enumerate(zip(gates, want)):
            assert g.grad.dtype == torch.float32 and g.grad.shape == g.shape
            assert rel_err(g.grad, w) <= tol, k
    return steps


# ----------------------------------------------------------------------------- the rule
def test_unsupported_circuits_name_the_reason_and_search_refuses_them():
    for c in (Circuit.low_rank(8, 4096), Circuit(16, 16, 16).gate((0, 1))):
        reason = triton_route.unsupported(c)
        assert reason is not None and "entries" in reason
        with pytest.raises(QCError, match="cannot run this circuit"):
            triton_route.search(compile(c), 16, torch.float32, float("inf"))
    for c in (*CIRCUITS.values(), Circuit(16, 8, 8, 4).all_pairs()):
        assert triton_route.unsupported(c) is None
    with pytest.raises(QCError, match="cannot run"):   # float64 halves the budget
        triton_route.dense_search(compile(DOWN), torch.float64, float("inf"))
    with pytest.raises(QCError, match="takes"):
        triton_route.search(compile(SQUARE), 16, torch.int32, float("inf"))
    assert not triton_route.offered_on("cpu")    # the measured choice: CUDA only


def test_the_paper_circuit_fuses_its_forward_into_one_pass():
    steps = triton_route.search(compile(Circuit(16, 8, 8, 4).all_pairs()), 512,
                                torch.bfloat16, float("inf"))
    assert [p.gates for p in steps.forward] == [tuple(range(6))]
    assert [g for p in steps.backward for g in p.gates] == list(range(6))
    assert len(steps.recompute) == len(steps.backward) - 1
    assert steps.inter == "bfloat16" and steps.acc == "float32"


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CIRCUITS)
def test_forward_and_every_gradient(name, dtype):
    check_run(CIRCUITS[name], dtype)


def test_many_passes_recompute_their_inputs(monkeypatch):
    """Budgets so small that each gate takes a pass of its own, a qudit falls outside the
    tile (outer) and the backward recomputes the states between passes; programs loop over
    several tiles each."""
    monkeypatch.setattr(triton_plan, "FWD_BUDGET", 160)
    monkeypatch.setattr(triton_plan, "BWD_BUDGET", 240)
    steps = check_run(SMALL, torch.float32, tokens=3)
    assert len(steps.backward) == 3 and len(steps.recompute) == 2, steps.describe()
    assert all(p.outer for p in steps.backward), steps.describe()
    assert max(p.tiles(3) for p in steps.backward) > steps.programs
    steps = check_run(SMALL, torch.bfloat16, tokens=3, gate_grads=False)
    assert len(steps.forward) == len(steps.adjoint) == 3, steps.describe()


def test_frozen_gates_backward_through_the_transposed_circuit():
    check_run(UP, torch.float32, gate_grads=False)


def test_gradcheck_in_float64():
    plan = compile(SMALL)
    run = triton_route.build(plan, triton_route.search(plan, 4, torch.float64, float("inf")))
    gen = torch.Generator().manual_seed(0)
    gates = tuple(torch.randn(g.shape, generator=gen, dtype=torch.float64).to(DEVICE)
                  .requires_grad_() for g in SMALL.gates)
    x = torch.randn(3, SMALL.in_features, generator=gen, dtype=torch.float64).to(DEVICE)
    assert torch.autograd.gradcheck(lambda x, *g: run(x, g), (x.requires_grad_(), *gates),
                                    fast_mode=True)


@pytest.mark.parametrize("name, dtype", [("square", torch.float32), ("square", torch.float64),
                                         ("down", torch.float32)], ids=str)
def test_dense_matrix(name, dtype):
    circuit = CIRCUITS[name]
    plan = compile(circuit)
    g64 = gates_for(circuit)
    run = triton_route.dense_build(plan, triton_route.dense_search(plan, dtype, float("inf")))
    t = run([g.to(DEVICE, dtype) for g in g64])
    assert t.dtype == dtype and t.shape == (circuit.out_features, circuit.in_features)
    assert rel_err(t, circuit_operator(circuit, g64)) <= tolerance(dtype, terms=64)


# ----------------------------------------------------------------------------- the hooks
def test_module_and_layer_take_bfloat16_activations_uncast(monkeypatch):
    """Where the route is offered (here: forced for the interpreter), a bfloat16 input
    reaches the kernels uncast against float32 gates: the module answers in bfloat16, the
    adapted layer's gate gradients are float32 and match the float64 reference."""
    from qcircuit.runtime import AdaptedLayer
    monkeypatch.setattr(triton_route, "offered_on", lambda device_type: True)
    plan = compile(SQUARE)
    m = plan.module(seed=0, device=DEVICE)
    x = torch.randn(3, 64, device=DEVICE).to(torch.bfloat16)
    with torch.no_grad():
        y = m(x)
    t = circuit_operator(SQUARE, [g.detach().double().cpu() for g in m.gates])
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x.double().cpu() @ t.T) <= bound(torch.bfloat16, SQUARE)

    base = torch.nn.Linear(64, 64, device=DEVICE).to(torch.bfloat16).requires_grad_(False)
    layer = AdaptedLayer.of(base, SQUARE, init="freeze_one",
                            generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for g in layer.adapter.gates:
            g.add_(0.1 * torch.randn_like(g))
    x.requires_grad_()
    layer(x).float().sum().backward()
    gy = torch.ones(3, 64, dtype=torch.float64)
    ta, tf = (torch_operator(SQUARE, [g.detach().double().cpu() for g in part.gates])
              for part in (layer.adapter, layer.frozen))
    leaves = [g.detach().double().cpu().requires_grad_() for g in layer.adapter.gates]
    want = torch.autograd.grad(torch_operator(SQUARE, leaves), leaves,
                               grad_outputs=gy.T @ x.detach().double().cpu())
    for g, w in zip(layer.adapter.gates, want):
        assert g.grad.dtype == torch.float32
        assert rel_err(g.grad, w) <= bound(torch.bfloat16, SQUARE)
    w0 = base.weight.double().cpu()
    assert rel_err(x.grad, gy @ (w0 + ta - tf)) <= 2 * EPS_BF16
