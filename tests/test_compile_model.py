"""torch.compile(adapted model), default settings (dynamic shapes), three distinct circuits,
token counts in different buckets: trains like eager, and compiling changes no state."""
from __future__ import annotations

import torch

import dist_worker
from qcircuit import parse
from qcircuit.runtime import attach
from test_adapter import rel_err

PROGRAM = dist_worker.PROGRAM % "freeze_one"   # three distinct circuits


def _train(model, adapted, step, lengths) -> list[float]:
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.2)
    losses = []
    for n in lengths:
        ids = torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(n))
        loss = step(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_adapted_model_trains_like_eager(tiny_llama_config):
    from transformers import LlamaForCausalLM

    runs = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = LlamaForCausalLM(tiny_llama_config)
        adapted = attach(model, parse(PROGRAM), seed=0)
        states = adapted.states
        model.train()
        step = torch.compile(model) if compiled else model
        losses = _train(model, adapted, step, (3, 9, 17, 40))   # buckets 4, 16, 32, 64
        assert adapted.states == states
        runs.append((losses, [g.detach().clone() for g in adapted.trainable_parameters()]))
    (eager_losses, eager_gates), (losses, gates) = runs
    assert rel_err(torch.tensor(losses), torch.tensor(eager_losses)) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(gates, eager_gates))
