"""An independent dense reference for circuit operators (float64 numpy, no compiler code).

Each gate becomes a full ``(out_features_after, in_features_before)`` matrix:
``P_out^T · (G_mat ⊗ I_rest) · P_in``, where ``P`` are explicit permutation matrices
that bring the gate's qudits to the front in its listed order; the circuit operator
is the product of these matrices, last gate leftmost.
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def permutation_matrix(dims: Sequence[int], front: Sequence[int]) -> np.ndarray:
    """``P`` with ``(P v)[j] = v[i]`` where ``j`` is the flat index of multi-index ``i``
    reordered as ``front`` qudits first (in that order), then the others ascending."""
    order = list(front) + [q for q in range(len(dims)) if q not in front]
    new_dims = [dims[q] for q in order]
    size = math.prod(dims)
    p = np.zeros((size, size))
    for flat, multi in enumerate(itertools.product(*[range(d) for d in dims])):
        moved = [multi[q] for q in order]
        target = 0
        for digit, d in zip(moved, new_dims):
            target = target * d + digit
        p[target, flat] = 1.0
    return p


def gate_matrix(dims_before: Sequence[int], qudits: Sequence[int], tensor: np.ndarray) -> np.ndarray:
    """The full matrix of one gate acting on wires with ``dims_before``."""
    k = len(qudits)
    out_dims = tensor.shape[:k]
    dims_after = list(dims_before)
    for q, d in zip(qudits, out_dims):
        dims_after[q] = d
    g_mat = tensor.reshape(math.prod(out_dims), math.prod(tensor.shape[k:]))
    rest = math.prod(d for q, d in enumerate(dims_before) if q not in qudits)
    core = np.kron(g_mat, np.eye(rest))
    p_in = permutation_matrix(dims_before, qudits)
    p_out = permutation_matrix(dims_after, qudits)
    return p_out.T @ core @ p_in


def dense_operator(in_dims: Sequence[int], gates: Sequence[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """``T = G_K ⋯ G_1`` for ``gates = [(qudits, tensor), …]`` in circuit order."""
    dims = list(in_dims)
    t = np.eye(math.prod(dims))
    for qudits, tensor in gates:
        t = gate_matrix(dims, qudits, np.asarray(tensor, dtype=np.float64)) @ t
        for q, d in zip(qudits, tensor.shape[:len(qudits)]):
            dims[q] = d
    return t


def circuit_operator(circuit, tensors) -> "torch.Tensor":
    """:func:`dense_operator` of a ``Circuit`` and its gate tensors, as a float64 torch tensor."""
    import torch
    gates = [(g.qudits, t.detach().double().cpu().numpy()) for g, t in zip(circuit.gates, tensors)]
    return torch.from_numpy(dense_operator(circuit.in_dims, gates))


def rel_err(got, want) -> float:
    """Normwise relative error ``‖got − want‖ / ‖want‖`` in float64 (numpy or torch inputs)."""
    a = np.asarray(got.detach().cpu().double() if hasattr(got, "detach") else got, dtype=np.float64)
    b = np.asarray(want.detach().cpu().double() if hasattr(want, "detach") else want, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tolerance(dtype, terms: int = 64) -> float:
    """A normwise bound for results of ``dtype`` that differ by summation order: a few units
    of roundoff per term of the longest sum, growing like ``sqrt(terms)`` (random rounding),
    with a factor 8 for the chained products of a circuit. Float64 results are held to the
    looser of that and 1e-10 (the exactness bound of these tests)."""
    import torch
    eps = torch.finfo(dtype).eps
    bound = 8 * eps * math.sqrt(max(terms, 1))
    return max(bound, 1e-10) if dtype == torch.float64 else bound


def assert_close(got, want, dtype=None, terms: int = 64) -> None:
    """``rel_err(got, want) <= tolerance(dtype or got's dtype, terms)``."""
    import torch
    dtype = dtype if dtype is not None else getattr(got, "dtype", torch.float64)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float64
    err, tol = rel_err(got, want), tolerance(dtype, terms)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


# --- the same in torch: differentiable, on any device (gate gradients' references)
def torch_gate_matrix(dims: list[int], qudits: tuple[int, ...], g: "torch.Tensor") -> "torch.Tensor":
    """The full matrix of one gate on wires of ``dims``: ``G ⊗ I`` with the gate's qudits
    first (rows and columns), its axes then put back in qudit order. Differentiable."""
    import torch
    k, n = len(qudits), len(dims)
    rest = [q for q in range(n) if q not in qudits]
    rest_dims = [dims[q] for q in rest]
    out_q, in_q = g.shape[:k], g.shape[k:]
    kron = torch.kron(g.reshape(math.prod(out_q), math.prod(in_q)),
                      torch.eye(math.prod(rest_dims), dtype=g.dtype, device=g.device))
    order = list(qudits) + rest            # axis position -> qudit
    axes = [order.index(q) for q in range(n)]
    full = kron.reshape(*out_q, *rest_dims, *in_q, *rest_dims).permute(*axes, *(n + a for a in axes))
    after = list(dims)
    for q, d in zip(qudits, out_q):
        after[q] = d
    return full.reshape(math.prod(after), math.prod(dims))


def torch_operator(circuit, gates) -> "torch.Tensor":
    """``T = G_K ⋯ G_1`` from explicit gate matrices (float64, wherever the gates are)."""
    dims = list(circuit.in_dims)
    t = None
    for gate, g in zip(circuit.gates, gates):
        m = torch_gate_matrix(dims, gate.qudits, g)
        t = m if t is None else m @ t
        for q, d in zip(gate.qudits, gate.out_dims):
            dims[q] = d
    return t
