"""The native door's LoRA-user calls (issue 24): ``disable_adapter()`` and
``print_trainable_parameters()``.

``disable_adapter`` must give the base model's function and write nothing: an unfolded
adapter runs its base layers alone (bit for bit the base model), a folded one adds back
the frozen circuits the fold took out of the weights (the base model within the fold's
float32 rounding, 1e-5 normwise), and every parameter and buffer is bit for bit the same
after the block. DataParallel replicas, made inside the block, run what it says.
"""
from __future__ import annotations

import pytest
import torch

from qcircuit import QCError, parse
from qcircuit.runtime import attach
from test_adapter import llama_program, perturb
from test_doors import assert_unchanged, snapshot
from test_peft import rel
from test_state import _replicate_on_cpu

FOLD = 1e-5
HYBRID = parse("""
circuit attn { qudits 4 4 4 all_pairs }
circuit lora { low_rank 4 }
apply attn to q_proj, v_proj
apply lora to q_proj with init = zero_last
apply attn to o_proj with dropout = 0.1
""")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("program", [llama_program(), HYBRID], ids=["paper", "hybrid"])
def test_disable_adapter_runs_the_base_model_and_writes_nothing(make_llama, token_ids, fold,
                                                                program):
    base = logits(make_llama(), token_ids)
    adapted = attach(make_llama(), program, seed=0, fold=fold)
    perturb(adapted)
    tuned = logits(adapted, token_ids)
    assert rel(tuned, base) > 1e-3
    before = snapshot(adapted.model)
    with adapted.disable_adapter():
        off = logits(adapted, token_ids)
        with adapted.disable_adapter():   # nested: still off, and off again after
            assert torch.equal(logits(adapted, token_ids), off)
        assert torch.equal(logits(adapted, token_ids), off)
    if fold:
        assert rel(off, base) <= FOLD
    else:
        assert torch.equal(off, base)
    assert_unchanged(adapted.model, before)
    assert torch.equal(logits(adapted, token_ids), tuned)


def test_the_flag_is_reset_when_the_block_raises(make_llama, token_ids):
    adapted = attach(make_llama(), llama_program(), seed=0)
    perturb(adapted)
    tuned = logits(adapted, token_ids)
    with pytest.raises(RuntimeError):
        with adapted.disable_adapter():
            raise RuntimeError("inside")
    assert torch.equal(logits(adapted, token_ids), tuned)


def test_data_parallel_replicas_made_inside_the_block_are_off(make_llama, token_ids,
                                                              monkeypatch):
    base = logits(make_llama(), token_ids)
    adapted = attach(make_llama(), llama_program(), seed=0)
    perturb(adapted)
    with adapted.disable_adapter():
        replicas = _replicate_on_cpu(adapted.model, 2, monkeypatch)
        with torch.no_grad():
            rows = [r(ids[None]).logits[0] for r, ids in zip(replicas, token_ids)]
    assert rel(torch.stack(rows), base) <= FOLD


def test_gradients_reach_trained_modules_but_not_the_gates_inside_the_block(make_llama,
                                                                            token_ids):
    adapted = attach(make_llama(), llama_program(), seed=0, train=["lm_head"])
    with adapted.disable_adapter():
        adapted.model(token_ids).logits.sum().backward()
    gates = [g for layer in adapted.layers.values() for g in layer.gate_parameters()]
    assert all(g.grad is None for g in gates)
    assert adapted.model.lm_head.weight.grad is not None


def test_a_merged_adapter_is_refused(make_llama, token_ids):
    adapted = attach(make_llama(), llama_program(), seed=0)
    adapted.merge()
    with pytest.raises(QCError, match="unmerge\\(\\) first"):
        with adapted.disable_adapter():
            pass
    adapted.unmerge()
    with adapted.disable_adapter():
        adapted.merge()   # a named call inside the block: the forward refuses, not guesses
        with pytest.raises(QCError, match="merged layer cannot run without its adapter"):
            adapted(token_ids)
        adapted.unmerge()


def test_print_trainable_parameters_is_peft_s_line(make_llama, capsys):
    adapted = attach(make_llama(), llama_program(), seed=0, train=["lm_head"])
    adapted.print_trainable_parameters()
    gates = sum(layer.num_params for layer in adapted.layers.values())
    head = adapted.model.lm_head.weight.numel()
    total = sum(p.numel() for p in make_llama().parameters()) + gates
    assert adapted.num_trainable == gates + head
    assert capsys.readouterr().out == (
        f"trainable params: {gates + head:,d} || all params: {total:,d} || "
        f"trainable%: {100 * (gates + head) / total:.4f}\n")
