"""Config fidelity (issue 24): every field of ``QuanTAConfig`` does what it says or is
refused with a ``QCError`` naming it; nothing is silently rewritten.

The trial: ``QuanTAConfig(program=p, target_modules=["key"])`` adapted query and value
and rewrote the field. Now ``target_modules`` must name exactly the layers the program
adapts (PEFT's matching rule for LoRA) or the adapter is refused before the model is
touched; where it agrees it is left as given.
"""
from __future__ import annotations

import json

import pytest

peft = pytest.importorskip("peft")

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import get_peft_model  # noqa: E402

from qcircuit import QCError  # noqa: E402
from qcircuit.peft import QuanTAConfig  # noqa: E402
from test_doors import assert_unchanged, snapshot  # noqa: E402
from test_trained_modules import PROGRAM, make_bert, one_thread  # noqa: E402,F401

LAYERS = {f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")}


def adapted_layers(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if type(m).__name__ == "QuanTALayer"}


@pytest.mark.parametrize("target_modules", [
    ["query", "value"], ["value", "query", "query"], sorted(LAYERS),
    r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)",
], ids=["suffixes", "repeated", "full_names", "regex"])
def test_target_modules_that_agree_are_kept_as_given(target_modules):
    config = QuanTAConfig(program=PROGRAM, target_modules=target_modules)
    model = get_peft_model(make_bert(1), config)
    assert adapted_layers(model) == LAYERS
    assert model.peft_config["default"].target_modules == target_modules   # not rewritten


@pytest.mark.parametrize("target_modules,match", [
    (["key"], r"it names bert\.encoder\.layer\.0\.attention\.self\.key, .*which the program "
              r"does not adapt; it leaves out .*query"),
    (["query"], r"it leaves out bert\.encoder\.layer\.0\.attention\.self\.value"),
    (["query", "value", "dense"], r"it names bert\.encoder\.layer\.0\.attention\.output\.dense"),
    ("all-linear", r"it leaves out"),
    (r".*\.(query|value)", None),
])
def test_target_modules_that_disagree_are_refused_before_the_model_changes(target_modules,
                                                                           match):
    model = make_bert(1)
    before = snapshot(model)
    config = QuanTAConfig(program=PROGRAM, target_modules=target_modules)
    if match is None:   # a regex matching exactly the program's layers agrees
        get_peft_model(model, config)
        return
    with pytest.raises(QCError, match=f"target_modules=.*disagrees with the program: {match}"):
        get_peft_model(model, config)
    assert_unchanged(model, before)


def test_none_stays_none():
    model = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM))
    assert model.peft_config["default"].target_modules is None
    assert adapted_layers(model) == LAYERS


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 8}, r"no field 'r': a QuanTA adapter's size is its circuits"),
    ({"lora_alpha": 16}, r"no field 'lora_alpha': the program's option scale"),
    ({"lora_dropout": 0.1}, r"no field 'lora_dropout'"),
    ({"layers_to_transform": [0]}, r"no field 'layers_to_transform'"),
    ({"exclude_modules": ["key"]}, r"no field 'exclude_modules'"),
    ({"use_dora": True}, r"no field 'use_dora'"),
    ({"peft_type": "LORA"}, r"peft_type='LORA'"),
    ({"task_type": "NOT_A_TASK"}, r"Invalid task type: 'NOT_A_TASK'"),
    ({"target_modules": 3}, r"target_modules=\.\.\.\) takes a list of module names or a regex"),
    ({"target_modules": "(a+)+$"}, r"target_modules='\(a\+\)\+\$'\): .*nested repetition"),
    ({"modules_to_save": "classifier"}, r"modules_to_save=\.\.\.\) takes a list of module names"),
    ({"modules_to_save": ["query"]}, None),
])
def test_fields_not_honoured_are_refused_by_name(kwargs, match):
    if match is None:   # a module to save that the program adapts: refused at injection
        model = make_bert(1)
        before = snapshot(model)
        with pytest.raises(QCError, match=r"modules_to_save: module '.*query' is the adapted"):
            get_peft_model(model, QuanTAConfig(program=PROGRAM, **kwargs))
        assert_unchanged(model, before)
        return
    with pytest.raises(QCError, match=match):
        QuanTAConfig(program=PROGRAM, **kwargs)


def test_inference_mode_freezes_everything():
    model = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM, task_type="SEQ_CLS",
                                                      inference_mode=True))
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


def test_bookkeeping_fields_are_kept(tmp_path):
    """revision and task_type are written back as given (base_model_name_or_path is set by
    PEFT from the model, as for LoRA)."""
    model = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM, revision="v1",
                                                      task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["revision"], saved["task_type"]) == ("v1", "SEQ_CLS")
    assert saved["modules_to_save"] == ["classifier", "score"]
