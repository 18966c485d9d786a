"""The emitted module's construction: init modes, seeds, dtypes, state_dict, repr."""
from __future__ import annotations

import math

import pytest
import torch

from qcircuit import Circuit, QCError
from qcircuit.compiler import CircuitModule, compile

from reference import rel_err, tolerance

SQUARE = Circuit(4, 8, 2).gate((1, 0)).gate((2, 1))
NON_SQUARE = Circuit(4, 8).gate((0, 1), out=(4, 3))


def test_kaiming_uniform_bound_and_variance():
    m = compile(Circuit(16, 8, 8, 4).all_pairs()).module(seed=0, dtype=torch.float64)
    for gate, tensor in zip(m.plan.circuit.gates, m.gates):
        bound = math.sqrt(3.0 / gate.in_size)
        values = tensor.detach().abs()
        assert values.max() <= bound and values.max() > 0.95 * bound
        # uniform(-b, b) has variance b^2 / 3 = 1 / fan_in
        assert abs(tensor.detach().var().item() * gate.in_size - 1.0) < 0.1


def test_kaiming_is_the_default_and_seeds_reproduce():
    plan = compile(SQUARE)
    a, b, c = plan.module(seed=1), plan.module(seed=1), plan.module(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.gates, b.gates))
    assert not torch.equal(a.gates[0], c.gates[0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    d, e = plan.module(generator=g1), plan.module(generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(d.gates, e.gates))
    # the same seed gives the same numbers in every dtype (up to rounding)
    f64 = plan.module(seed=1, dtype=torch.float64)
    assert torch.allclose(f64.gates[1].float(), a.gates[1])
    unseeded = plan.module()
    assert unseeded.gates[0].abs().max() > 0


def test_zeros_and_identity_inits():
    m = compile(NON_SQUARE).module(init="zeros", dtype=torch.float64)
    assert all(not g.any() for g in m.gates)
    assert not m.matrix().any()
    square = compile(SQUARE).module(init="identity", dtype=torch.float64)
    assert torch.equal(square.matrix(), torch.eye(64, dtype=torch.float64))
    x = torch.randn(3, 64, dtype=torch.float64)
    assert rel_err(square(x), x) == 0.0  # products with exact zeros and ones: exact in any order
    with pytest.raises(QCError, match="square"):
        compile(NON_SQUARE).module(init="identity")


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "orthogonal"}, "unknown init"),
    ({"seed": 1, "generator": torch.Generator()}, "not both"),
    ({"seed": "7"}, "seed"),
    ({"dtype": torch.int64}, "floating"),
])
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(QCError, match=match):
        compile(SQUARE).module(**kwargs)


def test_state_dict_keys_and_round_trip():
    plan = compile(NON_SQUARE.gate(1, out=2))
    a, b = plan.module(seed=3), plan.module(seed=4)
    sd = a.state_dict()
    assert list(sd) == ["gates.0", "gates.1"]
    assert tuple(sd["gates.0"].shape) == (4, 3, 4, 8)
    b.load_state_dict(sd)
    x = torch.randn(2, 32)
    assert rel_err(a(x), b(x)) <= tolerance(torch.float32)


def test_module_attributes_repr_and_device():
    plan = compile(NON_SQUARE)
    m = plan.module(device="cpu", dtype=torch.float64)
    assert isinstance(m, CircuitModule) and m.plan is plan
    assert (m.in_features, m.out_features) == (32, 12)
    assert isinstance(m.gates, torch.nn.ParameterList)
    text = repr(m)
    assert "in_features=32" in text and "out_features=12" in text and "4x8 -> 4x3" in text
    assert m.gates[0].device.type == "cpu"
    m32 = m.to(torch.float32)  # module.to converts the gates; forward follows them
    assert m32(torch.randn(2, 32, dtype=torch.float64)).dtype == torch.float32
    empty = compile(Circuit(3, 2)).module(dtype=torch.float64).to(torch.float32)
    assert empty.matrix().dtype == torch.float32 and empty.state_dict() == {}
