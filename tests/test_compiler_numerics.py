"""The emitted module against the independent dense reference (tests/reference.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcircuit import Circuit, QCError
from qcircuit.compiler import compile

from reference import assert_close, dense_operator, gate_matrix, rel_err


def random_circuit(rng: np.random.Generator, max_features: int = 200) -> Circuit:
    """2–5 qudits, 1–5 gates of arity 1–3 on qudits in random order, some non-square."""
    while True:
        n = int(rng.integers(2, 6))
        dims = [int(d) for d in rng.integers(1, 4, size=n)]
        c, current, biggest = Circuit(*dims), list(dims), math.prod(dims)
        for _ in range(int(rng.integers(1, 6))):
            arity = int(rng.integers(1, min(3, n) + 1))
            qudits = tuple(int(q) for q in rng.permutation(n)[:arity])
            if rng.random() < 0.5:
                out = tuple(int(d) for d in rng.integers(1, 5, size=arity))
            else:
                out = tuple(current[q] for q in qudits)
            c = c.gate(qudits, out=out)
            for q, d in zip(qudits, out):
                current[q] = d
            biggest = max(biggest, math.prod(current))
        if biggest <= max_features:
            return c


def reference_of(module) -> np.ndarray:
    circuit = module.plan.circuit
    gates = [(g.qudits, t.detach().double().numpy()) for g, t in zip(circuit.gates, module.gates)]
    return dense_operator(circuit.in_dims, gates)


# --- the reference itself, on cases small enough to write by hand ---------------------

def test_reference_single_qudit_gates_are_kronecker_products():
    g = np.arange(4.0).reshape(2, 2) + 1
    assert rel_err(gate_matrix([2, 3], (0,), g), np.kron(g, np.eye(3))) < 1e-15
    h = np.arange(6.0).reshape(2, 3)  # 3 -> 2 on qudit 1
    assert rel_err(gate_matrix([2, 3], (1,), h), np.kron(np.eye(2), h)) < 1e-15


def test_reference_reversed_qudit_order_transposes_the_gate_axes():
    g = np.random.default_rng(0).normal(size=(3, 2, 3, 2))  # on (1, 0): G[o1, o0, i1, i0]
    m = gate_matrix([2, 3], (1, 0), g)
    expected = g.transpose(1, 0, 3, 2).reshape(6, 6)  # T[(o0,o1),(i0,i1)]
    assert rel_err(m, expected) < 1e-15


# --- module and matrix against the reference -----------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_random_circuits_match_reference(seed):
    rng = np.random.default_rng(seed)
    circuit = random_circuit(rng)
    m = compile(circuit).module(seed=seed, dtype=torch.float64)
    for gate, tensor in zip(circuit.gates, m.gates):
        assert tuple(tensor.shape) == gate.shape
    t_ref = reference_of(m)
    assert rel_err(m.matrix().detach().numpy(), t_ref) < 1e-10
    tokens = int(rng.integers(1, 40))
    x = torch.randn(tokens, circuit.in_features, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    y = m(x)
    assert y.shape == (tokens, circuit.out_features)
    assert rel_err(y.detach().numpy(), x.numpy() @ t_ref.T) < 1e-10


def test_paper_circuit_matrix_matches_reference_on_a_small_instance():
    # all_pairs on 4 qudits, non-uniform dims, as in the paper's layout
    m = compile(Circuit(3, 2, 2, 2).all_pairs()).module(seed=1, dtype=torch.float64)
    assert rel_err(m.matrix().detach().numpy(), reference_of(m)) < 1e-10


def test_untouched_qudits_and_empty_circuits():
    m = compile(Circuit(2, 3, 2).gate(1, out=4)).module(seed=2, dtype=torch.float64)
    t_ref = reference_of(m)
    assert rel_err(m.matrix().detach().numpy(), t_ref) < 1e-10
    x = torch.randn(5, 12, dtype=torch.float64)
    assert rel_err(m(x).detach().numpy(), x.numpy() @ t_ref.T) < 1e-10
    empty = compile(Circuit(2, 3)).module(dtype=torch.float64)
    assert torch.equal(empty.matrix(), torch.eye(6, dtype=torch.float64))
    assert torch.equal(empty(x[:, :6]), x[:, :6])


def test_gradients_match_reference_gradient():
    circuit = Circuit(2, 3, 2).gate((2, 0), out=(3, 2)).gate((1, 2), out=(2, 2))
    m = compile(circuit).module(seed=3, dtype=torch.float64)
    x = torch.randn(7, circuit.in_features, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, circuit.out_features, dtype=torch.float64)
    (m(x) * w).sum().backward()
    grad_t = w.numpy().T @ x.detach().numpy()  # d/dT of sum(w * (x T^T))
    tensors = [p.detach().numpy() for p in m.gates]
    assert rel_err(x.grad.numpy(), w.numpy() @ reference_of(m)) < 1e-10
    for k, gate in enumerate(circuit.gates):
        # T is linear in gate k: dL/dG_k[i] = <grad_t, T with G_k replaced by the unit e_i>
        expected = np.zeros(gate.shape)
        for idx in np.ndindex(*gate.shape):
            unit = np.zeros(gate.shape)
            unit[idx] = 1.0
            ops = [(g.qudits, unit if j == k else t)
                   for j, (g, t) in enumerate(zip(circuit.gates, tensors))]
            expected[idx] = (dense_operator(circuit.in_dims, ops) * grad_t).sum()
        assert rel_err(m.gates[k].grad.numpy(), expected) < 1e-10


def test_gradcheck_forward_and_matrix():
    circuit = Circuit(2, 3).gate((1, 0), out=(2, 2)).gate(0, out=3)
    m = compile(circuit).module(seed=4, dtype=torch.float64)
    names = [f"gates.{k}" for k in range(len(m.gates))]
    gates = tuple(g.detach().clone().requires_grad_() for g in m.gates)
    x = torch.randn(3, 2, circuit.in_features, dtype=torch.float64, requires_grad=True)

    def forward(x, *gs):
        return torch.func.functional_call(m, dict(zip(names, gs)), (x,))

    def matrix(*gs):
        return m.plan.dense_executor()(list(gs))  # what m.matrix() runs

    assert_close(matrix(*m.gates), m.matrix())
    assert torch.autograd.gradcheck(forward, (x, *gates))
    assert torch.autograd.gradcheck(matrix, gates)
    assert torch.autograd.gradgradcheck(forward, (x, *gates))


# --- dtypes, no_grad, compile, layouts ------------------------------------------------

CIRCUIT = Circuit(2, 3, 2).gate((2, 0)).gate((1, 2), out=(4, 2)).gate(0, out=3)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.bfloat16, 3e-2)])
def test_dtypes(dtype, tol):
    m = compile(CIRCUIT).module(seed=5, dtype=dtype)
    assert all(g.dtype == dtype for g in m.gates)
    t_ref = reference_of(m)
    x = torch.randn(6, CIRCUIT.in_features, dtype=torch.float64)
    y = m(x)  # another dtype in: computed in the gates' dtype
    assert y.dtype == dtype and m.matrix().dtype == dtype
    assert rel_err(y.detach().double().numpy(), x.numpy() @ t_ref.T) < tol
    assert rel_err(m.matrix().detach().double().numpy(), t_ref) < tol


def test_no_grad_gives_same_values_without_graph():
    m = compile(CIRCUIT).module(seed=6, dtype=torch.float64)
    x = torch.randn(4, CIRCUIT.in_features, dtype=torch.float64)
    with torch.no_grad():
        y, t = m(x), m.matrix()
    assert not y.requires_grad and not t.requires_grad
    assert_close(y, m(x).detach())  # with and without grad may run different routes
    assert_close(t, m.matrix().detach())


def test_leading_dims_and_contiguity():
    m = compile(CIRCUIT).module(seed=7, dtype=torch.float64)
    n_in, n_out = CIRCUIT.in_features, CIRCUIT.out_features
    base = torch.randn(2, 3, 5, n_in, dtype=torch.float64)
    expected = base @ m.matrix().detach().T
    assert_close(m(base), expected)
    assert m(base[0, 0, 0]).shape == (n_out,)
    assert_close(m(base[0, 0, 0]), expected[0, 0, 0])
    wide = torch.randn(n_in, 4, dtype=torch.float64)  # x = wide.T is not contiguous
    assert not wide.T.is_contiguous()
    assert_close(m(wide.T), wide.T @ m.matrix().detach().T)
    strided = base[:, ::2]  # a sliced, strided view
    assert_close(m(strided), expected[:, ::2])
    assert m(base[:, :0]).shape == (2, 0, 5, n_out)


def test_wrong_width_is_a_clear_error():
    m = compile(CIRCUIT).module()
    with pytest.raises(QCError, match="takes 12"):
        m(torch.randn(3, 13))


def test_torch_compile_tiny_circuit():
    torch._dynamo.reset()
    m = compile(Circuit(2, 3).gate((1, 0)).gate(1, out=2)).module(seed=8, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    expected = m(x)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # the cache is warm
    y = compiled(x)
    assert_close(y, expected)
    y.sum().backward()
    assert m.gates[0].grad is not None and x.grad is not None
    cold = compile(Circuit(3, 2).gate((0, 1), out=(2, 2))).module(seed=9, dtype=torch.float64)
    y_cold = torch.compile(cold, backend="aot_eager")(torch.ones(5, 6, dtype=torch.float64))
    assert_close(y_cold, torch.ones(5, 6, dtype=torch.float64) @ cold.matrix().T)
