"""torch.compile of modules holding several distinct circuits: tracing plans nothing
(the traced forward runs the one-expression path planned when the module was built), dynamic
shapes across token buckets, training matches eager."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcircuit import Circuit
from qcircuit.compiler import choice, compile

from reference import rel_err

CIRCUITS = (Circuit(4, 2, 3).all_pairs(), Circuit(4, 2, 3).gate((0, 1)).gate((2, 0)),
            Circuit(4, 6).gate((1, 0), out=(6, 4)).gate(1))  # 24 features each


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[compile(c).module(seed=k) for k, c in enumerate(CIRCUITS)],
                         nn.Tanh(), nn.Linear(24, 3))


def train(model: nn.Module, steps) -> list[torch.Tensor]:
    """Two SGD steps per token count; returns every loss and the final parameters."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for tokens in steps:
        for _ in range(2):
            x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(tokens))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
    return out + [p.detach().clone() for p in model.parameters()]


def test_compiled_model_with_three_circuits_trains_like_eager(monkeypatch):
    # aot_eager traces exactly what the default backend traces (dynamo, fake tensors, dynamic
    # shapes, AOT autograd) without inductor's code generation, which takes a minute cold;
    # the default backend was run by hand (see the report)
    backend = "aot_eager"
    torch._dynamo.reset()
    eager, compiled = make_model(), make_model()
    calls = []
    monkeypatch.setattr(choice, "decide", lambda *a, **k: calls.append(a) or pytest.fail(
        "planned while tracing"))
    steps = (3, 40, 300)  # buckets 4, 64, 512: dynamic shapes after the first recompile
    got = train(torch.compile(compiled, backend=backend), steps)
    monkeypatch.undo()
    want = train(eager, steps)
    assert not calls
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5
