"""torch.compile(adapted model), default settings (dynamic shapes), three distinct circuits,
token counts in different buckets: trains like eager, and compiling changes no state."""
from __future__ import annotations

import torch

from qcircuit import parse
from qcircuit.runtime import attach
from test_adapter import rel_err

PROGRAM = """
circuit attn {
    qudits 4 4 4
    all_pairs
}
circuit up {
    qudits 4 4 4 -> 4 43 1
    gate (0, 1)
    gate (1, 2) 4x4 -> 43x1
}
circuit down {
    qudits 4 43 -> 4 16
    gate (0, 1) 4x43 -> 4x16
}
apply attn to q_proj, v_proj
apply up to up_proj
apply down to down_proj
"""


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
