"""What a PEFT LoRA user expects of a QuanTA adapter, one test per expectation (issue 24's
table "what a LoRA user expects | works?").

Each test is one row: its docstring states the expectation as a LoRA user would, and the
test checks it on a tiny BERT classifier (``test_trained_modules.make_bert``: hidden 32,
two layers, three labels; the body is the same every time, the head is drawn from a seed,
as a fine-tune's new head is) through the PEFT door (``get_peft_model`` with
``QuanTAConfig``), the native door (``attach``) or both. Where the two doors differ on
purpose, the test says which does what. Outputs are compared normwise in float32: 1e-6
for the same function computed again, 1e-5 where the native door folds or a merge rounds.
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from qcircuit import QCError, parse  # noqa: E402
from qcircuit.peft import QuanTAConfig, QuanTALayer  # noqa: E402
from qcircuit.runtime import AdaptedLayer, attach, load  # noqa: E402
from test_peft import rel  # noqa: E402
from test_trained_modules import batch, make_bert, one_thread, train  # noqa: E402,F401

#: 240 parameters per 32x32 layer (23 %: no near-full-size warning)
PROGRAM = "circuit attn { qudits 2 2 2 4  all_pairs }\napply attn to query, value\n"
SAME, FOLD = 1e-6, 1e-5
ADAPTED = {f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")}


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch[0], labels=batch[1]).loss.item()


def peft_bert(head_seed: int = 1, **fields) -> PeftModel:
    return get_peft_model(make_bert(head_seed), QuanTAConfig(program=PROGRAM, seed=0, **fields))


def trainable(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapted_names(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, QuanTALayer)}


def assert_head_trains_and_round_trips(model, head: nn.Module, batch, reload) -> None:
    """Training moves ``head`` and lowers the loss; ``reload()`` (the saved adapter on a
    base with another random head) gives the trained logits."""
    before, start = head.weight.detach().clone(), eval_loss(model, batch)
    train(model, trainable(model), batch, steps=25)   # lr 3e-2, as test_trained_modules
    assert eval_loss(model, batch) < 0.5 * start
    assert rel(head.weight.detach(), before) > 1e-2
    want = logits(model, batch[0])
    assert rel(logits(make_bert(2), batch[0]), want) > 1e-2   # another head: other logits
    assert rel(logits(reload(), batch[0]), want) <= FOLD


# --- task heads --------------------------------------------------------------------------
def test_task_type_seq_cls_trains_and_saves_the_head(batch, tmp_path):
    """``task_type="SEQ_CLS"`` trains the classifier head beside the adapter and
    ``save_pretrained`` / ``PeftModel.from_pretrained`` carry it, as LoRA does."""
    model = peft_bert(task_type="SEQ_CLS")
    head = model.base_model.model.classifier.modules_to_save["default"]

    def reload():
        model.save_pretrained(tmp_path)
        return PeftModel.from_pretrained(make_bert(2), tmp_path)
    assert_head_trains_and_round_trips(model, head, batch, reload)


def test_modules_to_save_trains_and_saves_a_module(batch, tmp_path):
    """``modules_to_save=["classifier"]`` (no task type) does the same."""
    model = peft_bert(modules_to_save=["classifier"])
    head = model.base_model.model.classifier.modules_to_save["default"]

    def reload():
        model.save_pretrained(tmp_path)
        return PeftModel.from_pretrained(make_bert(2), tmp_path)
    assert_head_trains_and_round_trips(model, head, batch, reload)


def test_native_train_classifier_trains_and_saves_the_head(batch, tmp_path):
    """Natively, ``attach(model, program, train=["classifier"])`` (or a ``train
    classifier`` statement) trains the head, ``save`` keeps it, ``load`` restores it."""
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])

    def reload():
        adapted.save(tmp_path / "a")
        return load(make_bert(2), tmp_path / "a").model
    assert_head_trains_and_round_trips(adapted.model, adapted.model.classifier, batch, reload)


# --- the config --------------------------------------------------------------------------
def test_target_modules_that_agree_are_honoured_and_kept():
    """``target_modules`` naming the program's layers adapts exactly those and stays as
    written in the config."""
    model = peft_bert(target_modules=["query", "value"])
    assert adapted_names(model) == ADAPTED
    assert model.peft_config["default"].target_modules == ["query", "value"]


def test_target_modules_that_disagree_are_refused():
    """``target_modules`` the program does not adapt is an error, never silently
    rewritten (LoRA adapts what target_modules names; QuanTA's program decides)."""
    with pytest.raises(QCError, match=r"target_modules=.*disagrees with the program"):
        peft_bert(target_modules=["key"])


@pytest.mark.parametrize("field, value, says", [
    ("r", 8, "a QuanTA adapter's size is its circuits"),
    ("lora_alpha", 16, "the program's option scale"),
    ("lora_dropout", 0.1, "the program's option dropout"),
    ("use_dora", True, "see QuanTAConfig's fields"),
])
def test_lora_fields_are_refused_by_name(field, value, says):
    """A LoRA field (``r``, ``lora_alpha``, …) is refused with a ``QCError`` naming it and
    what to use instead, not ignored."""
    with pytest.raises(QCError, match=re.escape(f"no field '{field}'") + ".*" + re.escape(says)):
        QuanTAConfig(program=PROGRAM, **{field: value})


def test_a_config_needs_a_program():
    """A LoRA-style config with ``target_modules`` only says that QuanTA needs a program."""
    with pytest.raises(QCError, match=r"QuanTAConfig needs program="):
        QuanTAConfig(target_modules=["query", "value"])


# --- what the adapted model offers -------------------------------------------------------
PEFT_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| "
                       r"trainable%: (\d+\.\d{4})\n")


def test_print_trainable_parameters_is_peft_s_line(capsys):
    """``print_trainable_parameters()`` prints PEFT's one line, in both doors, and both
    count the same trainable parameters (gates and head)."""
    peft_bert(task_type="SEQ_CLS").print_trainable_parameters()
    attach(make_bert(1), PROGRAM, seed=0, train=["classifier"]).print_trainable_parameters()
    lines = capsys.readouterr().out.splitlines(keepends=True)
    (a, b) = [PEFT_LINE.fullmatch(line) for line in lines]
    assert a and b and a[1] == b[1]
    head = make_bert(1).classifier
    gates = 4 * 240
    assert int(b[1].replace(",", "")) == gates + sum(p.numel() for p in head.parameters())
    total = int(b[2].replace(",", ""))
    assert float(b[3]) == pytest.approx(100 * (gates + 99) / total, abs=1e-4)


def test_peft_disable_adapter_gives_the_base_model(batch):
    """Inside ``with model.disable_adapter():`` a PEFT model is the base model, its
    original head included (as for LoRA)."""
    ids = batch[0]
    base = logits(make_bert(1), ids)
    model = peft_bert(task_type="SEQ_CLS")
    train(model, trainable(model), batch, steps=5)
    assert rel(logits(model, ids), base) > 1e-2
    with model.disable_adapter():
        assert rel(logits(model, ids), base) <= SAME


def test_native_disable_adapter_turns_the_circuits_off(batch):
    """Natively, ``with adapted.disable_adapter():`` turns every circuit off; a module
    trained whole (a head) keeps its trained weights (unlike PEFT, which also swaps the
    original head back: documented in ``Adapted.disable_adapter``)."""
    ids = batch[0]
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
    train(adapted.model, adapted.trainable_parameters(), batch, steps=5)
    trained = logits(adapted.model, ids)
    with adapted.disable_adapter():
        off = logits(adapted.model, ids)
    head_only = make_bert(1)
    head_only.classifier.load_state_dict(adapted.model.classifier.state_dict())
    assert rel(off, logits(head_only, ids)) <= FOLD and rel(off, trained) > 1e-3


@pytest.mark.parametrize("door", ["peft", "native"])
def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(batch, door):
    """``merge_and_unload()`` returns the plain transformers model (``nn.Linear`` layers,
    the trained head in place) computing what the adapted model computed."""
    if door == "peft":
        model = peft_bert(task_type="SEQ_CLS")
        params = trainable(model)
    else:
        adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
        model, params = adapted, adapted.trainable_parameters()
    net = model if door == "peft" else model.model
    train(net, params, batch, steps=5)
    want = logits(net, batch[0])
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert not [m for m in plain.modules()
                if isinstance(m, (QuanTALayer, AdaptedLayer)) or "Wrapper" in type(m).__name__]
    assert {type(plain.get_submodule(n)) for n in ADAPTED} == {nn.Linear}
    assert type(plain.classifier) is nn.Linear
    assert rel(logits(plain, batch[0]), want) <= FOLD


def test_from_pretrained_is_trainable_continues_training(batch, tmp_path):
    """``PeftModel.from_pretrained(..., is_trainable=True)`` resumes training the gates
    and the head; without it the loaded adapter is frozen for inference."""
    model = peft_bert(task_type="SEQ_CLS")
    train(model, trainable(model), batch, steps=3)
    model.save_pretrained(tmp_path)
    assert not trainable(PeftModel.from_pretrained(make_bert(2), tmp_path))
    again = PeftModel.from_pretrained(make_bert(2), tmp_path, is_trainable=True)
    assert len(trainable(again)) == len(trainable(model))
    start = logits(again, batch[0])
    losses = train(again, trainable(again), batch, steps=5)
    assert losses[-1] < losses[0] and rel(logits(again, batch[0]), start) > 1e-3


def test_several_adapters_switch_with_set_adapter(batch):
    """``add_adapter`` / ``set_adapter`` keep several named adapters on one model and
    switch between them without writing a weight (one active at a time)."""
    model = peft_bert()
    first = logits(model, batch[0])
    model.add_adapter("other", QuanTAConfig(program=PROGRAM, seed=5, options={"init":
                                                                             "freeze_one"}))
    model.set_adapter("other")
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.1)
    other = logits(model, batch[0])
    assert rel(other, first) > 1e-3
    model.set_adapter("default")
    assert torch.equal(logits(model, batch[0]), first)


def test_attach_takes_text_a_path_or_a_program(batch, tmp_path):
    """``attach`` takes ``.qc`` text, a ``.qc`` path or a ``Program``, as
    ``QuanTAConfig(program=...)`` does, with the same result."""
    (tmp_path / "a.qc").write_text(PROGRAM)
    outs = [logits(attach(make_bert(1), p, seed=0).model, batch[0])
            for p in (PROGRAM, tmp_path / "a.qc", str(tmp_path / "a.qc"), parse(PROGRAM))]
    assert all(torch.equal(o, outs[0]) for o in outs)


# --- training ----------------------------------------------------------------------------
def rows(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 100, (n, 6), generator=g), torch.randint(0, 3, (n,),
                                                                             generator=g)
    return [{"input_ids": i, "labels": int(y)} for i, y in zip(ids, labels)]


def run_trainer(out, resume=None, trainer=Trainer, **kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                             save_steps=2, learning_rate=3e-2, logging_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0,
                             lr_scheduler_type="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(args=args, train_dataset=rows(), **kwargs)
        t.train(resume_from_checkpoint=resume)
    return t


def assert_adapter_only(folder) -> None:
    names = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}


def test_peft_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path):
    """``Trainer`` on a PEFT model writes adapter-only ``checkpoint-N`` folders, and
    ``train(resume_from_checkpoint=...)`` on a fresh model ends where the whole run did."""
    model = peft_bert(task_type="SEQ_CLS")
    run_trainer(model=model, out=tmp_path / "run")
    assert_adapter_only(tmp_path / "run" / "checkpoint-2")
    fresh = peft_bert(head_seed=2, task_type="SEQ_CLS")
    run_trainer(model=fresh, out=tmp_path / "again",
                resume=str(tmp_path / "run" / "checkpoint-2"))
    ids = torch.stack([r["input_ids"] for r in rows()])
    assert rel(logits(fresh, ids), logits(model, ids)) <= 1e-4


def test_adapter_trainer_checkpoints_hold_the_adapter_and_resume(tmp_path):
    """Natively, ``AdapterTrainer(adapter=attach(...))`` does the same (plain ``Trainer``
    would save the whole model each time)."""
    from qcircuit.runtime import AdapterTrainer
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
    run_trainer(adapter=adapted, out=tmp_path / "run", trainer=AdapterTrainer)
    assert_adapter_only(tmp_path / "run" / "checkpoint-2")
    fresh = attach(make_bert(2), PROGRAM, seed=3, train=["classifier"])
    run_trainer(adapter=fresh, out=tmp_path / "again", trainer=AdapterTrainer,
                resume=str(tmp_path / "run" / "checkpoint-2"))
    ids = torch.stack([r["input_ids"] for r in rows()])
    assert rel(logits(fresh.model, ids), logits(adapted.model, ids)) <= 1e-4


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(batch, reentrant):
    """``model.gradient_checkpointing_enable()`` on a PEFT model trains the same: the
    gates' gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = peft_bert(task_type="SEQ_CLS")
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(input_ids=batch[0], labels=batch[1]).loss.backward()
        grads.append([p.grad for p in trainable(model)])
    assert all(g is not None for g in grads[1])
    assert max(rel(a, b) for a, b in zip(grads[1], grads[0]) if b.norm() > 0) <= SAME


def test_a_bfloat16_autocast_training_step_works(batch):
    """Training under ``torch.autocast("cpu", dtype=torch.bfloat16)`` lowers the loss and
    keeps float32 gates with float32 gradients."""
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
    params = adapted.trainable_parameters()
    opt = torch.optim.Adam(params, lr=3e-2)
    adapted.model.train()
    losses = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapted.model(input_ids=batch[0], labels=batch[1]).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in params)
    assert losses[-1] < 0.8 * losses[0]


def test_a_4bit_base_trains(tmp_path):
    """QLoRA-style: a bitsandbytes NF4 base (``BitsAndBytesConfig(load_in_4bit=True)``)
    through ``get_peft_model`` trains the gates and leaves the 4-bit weights as they were."""
    pytest.importorskip("bitsandbytes")
    from test_quantized import (IDS, PROGRAM as QPROGRAM, float_model, load_quantized,
                                quantized_layers, same_storage, snapshot)
    float_model().save_pretrained(tmp_path / "base")
    base = load_quantized(tmp_path / "base", "nf4")
    before = {n: snapshot(m) for n, m in quantized_layers(base).items()}
    model = get_peft_model(base, QuanTAConfig(program=QPROGRAM, seed=0))
    opt = torch.optim.Adam(trainable(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = quantized_layers(base)   # the same object, now inside the PEFT model
    assert len(after) == len(before) and all(same_storage(snapshot(m), before[n])
                                             for n, m in after.items())
