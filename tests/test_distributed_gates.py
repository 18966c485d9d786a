"""Gates as FSDP hands them over: DTensor parameters (FSDP2 ``fully_shard`` outside forward),
views into one flat parameter (FSDP1 ``use_orig_params``). Forward, backward and ``matrix()``
fall back to the one-expression path where the schedule cannot take them, with the same
numbers as plain gates."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from qcircuit import Circuit
from qcircuit.compiler import compile

from reference import assert_close, circuit_operator

CIRCUIT = Circuit(4, 2, 3).all_pairs()


@pytest.fixture
def mesh():
    """A one-process gloo group on the CPU (in this process), torn down afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    if dist.is_initialized():
        pytest.fail("a process group is already initialised")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_dtensor_gates_forward_backward_and_matrix(mesh, placement):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    plain = compile(CIRCUIT).module(seed=0, dtype=torch.float64)
    m = compile(CIRCUIT).module(seed=0, dtype=torch.float64)
    where = [Shard(0) if placement == "shard" else Replicate()]
    for i, g in enumerate(list(m.gates)):
        m.gates[i] = torch.nn.Parameter(distribute_tensor(g.detach(), mesh, where))
    assert isinstance(m.gates[0], DTensor)
    want_t = circuit_operator(CIRCUIT, plain.gates)
    x = torch.randn(5, 24, dtype=torch.float64)
    y = m(x)
    assert type(y) is torch.Tensor
    assert_close(y, x @ want_t.T)
    y.square().sum().backward()
    plain(x).square().sum().backward()
    for a, b in zip(m.gates, plain.gates):
        assert isinstance(a.grad, DTensor)
        assert_close(a.grad.full_tensor(), b.grad)
    with torch.no_grad():
        assert_close(m.matrix(), want_t)
    assert_close(m.matrix(), want_t)  # with autograd recording


def test_gates_as_views_into_one_flat_parameter():
    m = compile(CIRCUIT).module(seed=1, dtype=torch.float64)
    sizes = [g.numel() for g in m.gates]
    flat = torch.cat([g.detach().reshape(-1) for g in m.gates]).requires_grad_()
    views, start = {}, 0
    for k, (g, n) in enumerate(zip(m.gates, sizes)):
        views[f"gates.{k}"] = flat[start:start + n].view(g.shape)
        start += n
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    y = torch.func.functional_call(m, views, (x,))
    want_t = circuit_operator(CIRCUIT, m.gates)
    assert_close(y, x @ want_t.T)
    y.square().sum().backward()
    m(x.detach()).square().sum().backward()
    want = torch.cat([g.grad.reshape(-1) for g in m.gates])
    assert_close(flat.grad, want)
    assert math.isfinite(flat.grad.norm().item())


def test_torch_func_transforms_take_the_one_expression():
    """vmap over a batch of inputs and torch.func.grad reach the module through wrapped
    tensors, which the schedule's autograd function cannot take."""
    m = compile(CIRCUIT).module(seed=2, dtype=torch.float64)
    x = torch.randn(3, 4, 24, dtype=torch.float64)
    want = x @ circuit_operator(CIRCUIT, m.gates).T
    assert_close(torch.func.vmap(m)(x), want)
    names = [f"gates.{k}" for k in range(len(m.gates))]
    params = {n: g.detach() for n, g in zip(names, m.gates)}
    grads = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x[0],)).square().sum())(params)
    m(x[0]).square().sum().backward()
    for n, g in zip(names, m.gates):
        assert_close(grads[n], g.grad)
