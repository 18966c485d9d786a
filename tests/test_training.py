"""Training through adapters: plain loop, transformers.Trainer, checkpointing, bfloat16."""
from __future__ import annotations

import warnings

import pytest
import torch

from qcircuit.runtime.adapter import attach
from test_adapter import EPS32, fold_amplification, gpt2_program, llama_program, rel_err


def _eval_loss(model, ids) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _train(adapted, ids, steps: int = 8, lr: float = 1e-2, autocast: bool = False) -> None:
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=lr)
    adapted.model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("fixture,program", [("tiny_llama", llama_program),
                                             ("tiny_gpt2", gpt2_program)])
def test_plain_loop_lowers_the_loss_and_touches_only_gates(request, token_ids, fixture, program):
    model = request.getfixturevalue(fixture)
    adapted = attach(model, program(), seed=0)
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if "base_layer" not in n and not n.endswith(tuple(f"gates.{i}" for i in range(9)))}
    frozen = [g.detach().clone() for layer in adapted.layers.values() for g in layer.frozen.gates]
    start = [g.detach().clone() for g in adapted.trainable_parameters()]
    before = _eval_loss(model, token_ids)
    _train(adapted, token_ids)
    after = _eval_loss(model, token_ids)
    assert after < 0.95 * before
    assert all(not torch.equal(a, b) for a, b in zip(start, adapted.trainable_parameters()))
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
    assert all(torch.equal(a, b) for a, b in zip(
        frozen, [g for layer in adapted.layers.values() for g in layer.frozen.gates]))
    with torch.no_grad():   # the trained adapter survives merging
        trained = adapted(token_ids).logits
        assert rel_err(adapted.merge_and_unload()(token_ids).logits, trained) < 1e-5


def test_transformers_trainer(tiny_llama, tmp_path, token_ids):
    from transformers import Trainer, TrainingArguments

    adapted = attach(tiny_llama, llama_program(), seed=0)
    rows = [{"input_ids": ids, "labels": ids} for ids in token_ids.repeat(4, 1)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=8, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant", warmup_steps=0)
    before = _eval_loss(tiny_llama, token_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=adapted.model, args=args, train_dataset=rows)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    after = _eval_loss(tiny_llama, token_ids)
    assert after < 0.95 * before
    assert all(layer.folded for layer in adapted.layers.values())


@pytest.mark.parametrize("fixture,program", [("tiny_llama", llama_program),
                                             ("tiny_gpt2", gpt2_program)])
def test_gradient_checkpointing_gives_the_same_gradients(request, fixture, program, token_ids):
    base = request.getfixturevalue(fixture)
    grads = []
    for checkpointing in (False, True):
        model = type(base)(base.config)
        model.load_state_dict(base.state_dict())
        adapted = attach(model, program(), seed=5)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(0)   # same dropout masks in both runs
        adapted(input_ids=token_ids, labels=token_ids).loss.backward()
        assert all(layer.folded for layer in adapted.layers.values())
        grads.append([g.grad.clone() for g in adapted.trainable_parameters()])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1])
    # recomputation reorders float32 sums inside the base model; the folded unit-scale T0
    # magnifies that rounding by the fold's cancellation factor
    tol = 64 * EPS32 * fold_amplification(adapted)
    for a, b in zip(*grads):
        assert rel_err(a, b) < tol


def test_bfloat16_autocast(tiny_llama, token_ids):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = tiny_llama(token_ids).logits
    adapted = attach(tiny_llama, llama_program(), seed=0, fold=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(adapted(token_ids).logits, base)   # unfolded: exact at init
        adapted.fold()
        folded = adapted(token_ids).logits
    # folded under bfloat16: W'·x and T·x are rounded to bfloat16 and cancel
    eps16 = torch.finfo(torch.bfloat16).eps
    assert 0 < rel_err(folded, base) < 16 * eps16 * fold_amplification(adapted)
    before = _eval_loss(tiny_llama, token_ids)
    _train(adapted, token_ids, autocast=True)
    assert all(g.dtype == torch.float32 for g in adapted.trainable_parameters())
    assert _eval_loss(tiny_llama, token_ids) < 0.95 * before


def test_zero_last_is_exact_under_bfloat16(tiny_gpt2, token_ids):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = tiny_gpt2(token_ids).logits
        adapted = attach(tiny_gpt2, gpt2_program(init="zero_last"), seed=0)
        assert torch.equal(adapted(token_ids).logits, base)


def test_model_state_dict_round_trip_keeps_fold_and_merge_state(tiny_llama, token_ids):
    """What a Trainer checkpoint resume does: a freshly attached model loads the state dict."""
    fresh = type(tiny_llama)(tiny_llama.config)
    fresh.load_state_dict(tiny_llama.state_dict())
    adapted = attach(tiny_llama, llama_program(), seed=0)
    _train(adapted, token_ids, steps=2)
    with torch.no_grad():
        want = adapted(token_ids).logits
    resumed = attach(fresh, llama_program(), seed=1)
    fresh.load_state_dict(tiny_llama.state_dict())
    assert all(layer.folded and not layer.merged for layer in resumed.layers.values())
    with torch.no_grad():
        assert torch.equal(resumed(token_ids).logits, want)
        adapted.merge()
        fresh.load_state_dict(tiny_llama.state_dict())
        assert resumed.merged and torch.equal(resumed(token_ids).logits, adapted(token_ids).logits)
