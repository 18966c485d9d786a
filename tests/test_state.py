"""Explicit adapter state: what each named call writes, what it refuses, and that nothing
else (forwards, threads, replicas) ever touches a base weight."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from qcircuit import Circuit, QCError
from qcircuit.runtime import AdaptedLayer, LayerState, attach
from test_adapter import SQUARE, adapter_program, llama_program, perturb, rel_err


def _weights(adapted) -> dict[str, bytes]:
    """The raw bytes of every adapted layer's base weight."""
    return {name: layer.base_layer.weight.detach().numpy().tobytes()
            for name, layer in adapted.layers.items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fold", [False, True])
def test_merge_refuses_a_non_finite_gate_and_leaves_every_weight(tiny_llama, bad, fold):
    adapted = attach(tiny_llama, llama_program(), seed=0, fold=fold)
    perturb(adapted)
    before = _weights(adapted)
    with torch.no_grad():
        adapted.layers["model.layers.1.mlp.up_proj"].adapter.gates[1][0, 0, 0, 0] = bad
    with pytest.raises(QCError, match=r"model\.layers\.1\.mlp\.up_proj: gate 1 has non-finite"):
        adapted.merge()
    assert _weights(adapted) == before   # no layer merged, not even the ones before it
    assert not adapted.merged


def test_fold_refuses_a_non_finite_frozen_gate(tiny_llama):
    adapted = attach(tiny_llama, llama_program(), seed=0, fold=False)
    before = _weights(adapted)
    layer = adapted.layers["model.layers.0.self_attn.v_proj"]
    with torch.no_grad():
        layer.frozen.gates[2].view(-1)[3] = float("nan")
    with pytest.raises(QCError, match="v_proj: frozen initial gate 2 has non-finite"):
        adapted.fold()
    assert _weights(adapted) == before


def test_attach_puts_the_model_back_bit_for_bit_when_a_fold_fails(tiny_llama, monkeypatch):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    real = AdaptedLayer.plan_move
    calls = []

    def failing(self, call, **kwargs):
        calls.append(self.name)
        if len(calls) == 3:
            raise QCError("boom")
        return real(self, call, **kwargs)

    monkeypatch.setattr(AdaptedLayer, "plan_move", failing)
    with pytest.raises(QCError, match="boom"):
        attach(tiny_llama, llama_program(), seed=0)
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_llama.modules())
    after = tiny_llama.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was written


def test_a_delta_that_overflows_the_weight_dtype_is_refused():
    base = nn.Linear(64, 64).to(torch.bfloat16)
    layer = AdaptedLayer.of(base, SQUARE, init="zero_last", scale=1.0, dropout=0.0)
    before = base.weight.detach().clone()
    with torch.no_grad():
        for g in layer.adapter.gates:   # T ~ 1e60: finite in float64, past bfloat16's 3.4e38
            g.fill_(1e20)
    with pytest.raises(QCError, match="overflow torch.bfloat16"):
        layer.merge()
    assert torch.equal(base.weight, before) and layer.state is LayerState.UNFOLDED


def test_tied_weights_are_refused_naming_both_modules(tiny_gpt2):
    program = adapter_program({"head": (Circuit.auto_dims(2).all_pairs(), ("lm_head",))})
    with pytest.raises(QCError, match=r"'lm_head' shares its weight with transformer\.wte\.weight"):
        attach(tiny_gpt2, program)
    assert not any(isinstance(m, AdaptedLayer) for m in tiny_gpt2.modules())


def test_a_reused_linear_is_refused():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(nn.ModuleDict({"a": shared, "b": nn.ReLU()}),
                          nn.ModuleDict({"c": shared}))
    program = adapter_program({"sq": (SQUARE, ("0.a",))})
    with pytest.raises(QCError, match=r"'0\.a' shares its weight with 1\.c\.weight"):
        attach(model, program)


@pytest.mark.parametrize("fold", [False, True])
def test_attach_keeps_the_models_eval_mode(tiny_llama, token_ids, fold):
    tiny_llama.eval()
    adapted = attach(tiny_llama, llama_program(dropout=0.3), seed=0, fold=fold)
    assert not any(m.training for m in tiny_llama.modules())
    perturb(adapted)
    with torch.no_grad():
        assert torch.equal(adapted(token_ids).logits, adapted(token_ids).logits)
    tiny_llama.train()
    assert all(b.dropout.training for layer in adapted.layers.values() for b in layer.branches)


def test_concurrent_first_training_forwards_touch_no_weight(tiny_llama, token_ids):
    adapted = attach(tiny_llama, llama_program(), seed=0)
    tiny_llama.train()
    before = _weights(adapted)
    losses, errors = [], []

    def step():
        try:
            losses.append(adapted(input_ids=token_ids, labels=token_ids).loss.item())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=step) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(losses) == 4 and len(set(losses)) == 1
    assert _weights(adapted) == before


def _replicate_on_cpu(module: nn.Module, copies: int, monkeypatch) -> list[nn.Module]:
    """DataParallel's own replicate() on CPU: only the CUDA broadcast is stood in for (each
    replica gets views of the parameters, so gradients flow back as with Broadcast)."""
    import importlib

    rep = importlib.import_module("torch.nn.parallel.replicate")

    monkeypatch.setattr(rep, "_get_device_index", lambda d, optional=False: -1)
    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [
                            [t.detach() if detach else t.view_as(t) for t in tensors]
                            for _ in devices])
    return rep.replicate(module, ["cpu"] * copies)


@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_data_parallel_replicas_match_one_model(tiny_llama, token_ids, init, monkeypatch):
    adapted = attach(tiny_llama, llama_program(init=init), seed=0)
    perturb(adapted)
    tiny_llama.train()
    whole = tiny_llama(input_ids=token_ids, labels=token_ids).loss
    whole.backward()
    want = [g.grad.clone() for g in adapted.trainable_parameters()]
    tiny_llama.zero_grad()
    before = _weights(adapted)
    replicas = _replicate_on_cpu(tiny_llama, 2, monkeypatch)
    losses = [r(input_ids=ids[None], labels=ids[None]).loss for r, ids in zip(replicas, token_ids)]
    assert all(r.model.layers[0].self_attn.q_proj.state is adapted.layers[
        "model.layers.0.self_attn.q_proj"].state for r in replicas)
    (sum(losses) / 2).backward()   # both rows have the same length: the mean of the means
    got = [g.grad for g in adapted.trainable_parameters()]
    assert rel_err(sum(losses) / 2, whole) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    assert _weights(adapted) == before


def test_load_state_dict_restores_the_state(tiny_llama, token_ids):
    """What a Trainer resume does: a freshly attached model loads a state dict whose layers
    were in another state; the stored state comes with the weights."""
    fresh = type(tiny_llama)(tiny_llama.config)
    fresh.load_state_dict(tiny_llama.state_dict())
    adapted = attach(tiny_llama, llama_program(), seed=0)
    perturb(adapted)
    adapted.merge()
    resumed = attach(fresh, llama_program(), seed=1, fold=False)
    fresh.load_state_dict(tiny_llama.state_dict())
    assert set(resumed.states.values()) == {LayerState.MERGED}
    with torch.no_grad():
        assert torch.equal(resumed(token_ids).logits, adapted(token_ids).logits)
    resumed.unmerge()   # back to the state before merge: folded, as saved
    assert set(resumed.states.values()) == {LayerState.FOLDED}
