"""Modules trained whole beside the circuits (issue 24): a task head trains, is saved with
the adapter and is restored by every door.

A tiny BERT for sequence classification (hidden 32, 2 layers, 3 labels) stands in for
the trial's all-MiniLM-L6-v2 (``test_minilm_task_head.py`` runs the real one): its
``classifier`` starts random, so an adapter that does not carry it cannot give back the
trained model. Each door — qcircuit's ``load``, PEFT's ``PeftModel.from_pretrained``,
transformers' ``load_adapter`` — must give a base model whose own head is a *different*
random one the trained model's logits (float32 normwise: 1e-6 for the same function,
1e-5 where the native door folds), and a refused load must leave the model bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from qcircuit import QCError, parse  # noqa: E402
from qcircuit.peft import QuanTAConfig  # noqa: E402
from qcircuit.runtime import attach, checkpoint, load  # noqa: E402
from test_doors import DOORS, assert_unchanged, edit, retensor, snapshot  # noqa: E402
from test_peft import rel  # noqa: E402

PROGRAM = "circuit attn { qudits 4 8 all_pairs }\napply attn to query, value\n"
FOLD = 1e-5   # float32, the native door folds freeze_one layers (about 1e-6 relative)
CONFIG = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, vocab_size=100, num_labels=3)


def make_bert(head_seed: int = 0, labels: int = 3, cls=BertForSequenceClassification):
    """The same body every time; the head drawn from ``head_seed`` (a fine-tune's random
    head: the body is "pretrained", the head is not)."""
    torch.manual_seed(0)
    model = cls(BertConfig(**{**CONFIG.to_dict(), "num_labels": labels})).eval()
    if hasattr(model, "classifier"):
        torch.nn.init.normal_(model.classifier.weight,
                              generator=torch.Generator().manual_seed(head_seed))
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, 100, (8, 6), generator=g), torch.randint(0, 3, (8,), generator=g)


def train(model, params, batch, steps: int = 25, lr: float = 3e-2) -> list[float]:
    """Plain Adam steps on one batch; the losses."""
    ids, labels = batch
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def restored(door: str, model, folder: Path):
    """What to call after loading ``folder`` into ``model`` through ``door``."""
    got = DOORS[door](model, folder)
    return model if door == "load_adapter" else got


@pytest.fixture
def native_saved(batch, tmp_path):
    """A natively trained adapter with its head, and the trained model's logits."""
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
    losses = train(adapted.model, adapted.trainable_parameters(), batch)
    assert losses[-1] < 0.5 * losses[0]
    adapted.save(tmp_path / "native")
    return tmp_path / "native", logits(adapted.model, batch[0])


@pytest.fixture
def peft_saved(batch, tmp_path):
    """A PEFT-trained SEQ_CLS adapter (the head from task_type), and its logits."""
    model = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM, task_type="SEQ_CLS",
                                                      seed=0))
    losses = train(model, [p for p in model.parameters() if p.requires_grad], batch)
    assert losses[-1] < 0.5 * losses[0]
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", logits(model, batch[0])


# --- native ---------------------------------------------------------------------------------
def test_native_head_trains_and_is_saved_with_the_adapter(native_saved):
    folder, _ = native_saved
    config = json.loads((folder / checkpoint.CONFIG_NAME).read_text())
    assert config["format_version"] == 4
    assert config["modules"] == {"classifier": {"class": "Linear",
                                                "tensors": {"bias": [3], "weight": [3, 32]}}}
    assert parse(config["program"]).trained == parse("train classifier").trained
    assert {"classifier.weight", "classifier.bias"} <= set(config["tensors"])
    assert {"classifier.weight", "classifier.bias"} <= set(load_file(
        str(folder / checkpoint.WEIGHTS_NAME)))


def test_the_train_statement_is_the_attach_keyword(batch):
    by_text = attach(make_bert(1), PROGRAM + "train classifier\n", seed=0)
    by_keyword = attach(make_bert(1), PROGRAM, seed=0, train="classifier")
    assert by_text.program == by_keyword.program
    assert by_text.trained == by_keyword.trained == ("classifier",)
    head = by_text.model.classifier
    trainable = by_text.trainable_parameters()
    assert any(p is head.weight for p in trainable) and head.weight.requires_grad
    assert by_text.num_trainable == sum(p.numel() for p in trainable)
    assert "trained whole: classifier (Linear, 99 params)" in by_text.summary()
    frozen = [n for n, p in by_text.model.named_parameters()
              if not p.requires_grad and "classifier" in n]
    assert not frozen


@pytest.mark.parametrize("door", sorted(DOORS))
def test_every_door_restores_a_native_head(native_saved, batch, door):
    folder, want = native_saved
    model = make_bert(2)
    assert rel(logits(model, batch[0]), want) > 0.1   # another head: other logits
    assert rel(logits(restored(door, model, folder), batch[0]), want) <= FOLD


@pytest.mark.parametrize("door", sorted(DOORS))
def test_every_door_restores_a_peft_head(peft_saved, batch, door):
    """The trial: PeftModel.from_pretrained on a base with another random head gave 21 %
    accuracy instead of 89 %; now it gives the trained logits (and so do the others)."""
    folder, want = peft_saved
    assert rel(logits(restored(door, make_bert(3), folder), batch[0]), want) <= FOLD


def test_merge_and_unload_keeps_the_trained_head(native_saved, peft_saved, batch):
    for folder, want in (native_saved, peft_saved):
        plain = load(make_bert(5), folder).merge_and_unload()
        assert type(plain.classifier) is torch.nn.Linear
        assert rel(logits(plain, batch[0]), want) <= FOLD
        merged = PeftModel.from_pretrained(make_bert(5), folder).merge_and_unload()
        assert type(merged.classifier) is torch.nn.Linear
        assert rel(logits(merged, batch[0]), want) <= FOLD


def test_peft_resolves_task_heads_as_for_lora():
    model = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM, task_type="SEQ_CLS"))
    config = model.peft_config["default"]
    assert config.modules_to_save == ["classifier", "score"]   # PEFT's own resolution
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "qc_" not in n}
    assert trainable == {"base_model.model.classifier.modules_to_save.default.weight",
                         "base_model.model.classifier.modules_to_save.default.bias"}
    explicit = get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM,
                                                         modules_to_save=["pooler.dense"]))
    assert explicit.peft_config["default"].record.modules.keys() == {"bert.pooler.dense"}


def test_peft_disable_adapter_uses_the_original_head(peft_saved, batch):
    folder, want = peft_saved
    base = make_bert(6)
    plain = logits(base, batch[0])
    model = PeftModel.from_pretrained(base, folder)
    with model.disable_adapter():
        assert rel(logits(model, batch[0]), plain) <= 1e-6
    assert rel(logits(model, batch[0]), want) <= FOLD


# --- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("train,match", [
    ("query", "module '.*query' is the adapted layer"),
    ("attention", "contains the adapted layer"),
    ("dropout", "has no parameters to train"),
    ("nothing_here", "train pattern 'nothing_here' matches no module"),
])
def test_modules_that_cannot_be_trained_whole_are_refused(train, match):
    model = make_bert(1)
    before = snapshot(model)
    with pytest.raises(QCError, match=match):
        attach(model, PROGRAM, train=[train])
    assert_unchanged(model, before)
    with pytest.raises(QCError, match=match.replace("train pattern", "train pattern")):
        get_peft_model(make_bert(1), QuanTAConfig(program=PROGRAM + f"train {train}\n"))


def test_a_tied_head_is_refused(tiny_gpt2_config):
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel(tiny_gpt2_config)
    program = "circuit c { qudits 8 8 all_pairs }\napply c to attn.c_proj\n"
    with pytest.raises(QCError, match=r"lm_head' shares a weight with transformer\.wte"):
        attach(model, program, train=["lm_head"])


def _refused_by_every_door(make, folder: Path, match: str) -> None:
    for door, call in DOORS.items():
        model = make()
        before = snapshot(model)
        with pytest.raises(QCError, match=match):
            call(model, folder)
        assert_unchanged(model, before)


def test_a_tampered_head_is_refused_by_every_door(native_saved):
    folder, _ = native_saved
    retensor(folder, lambda t: t["classifier.weight"].mul_(2))
    _refused_by_every_door(lambda: make_bert(2), folder, "classifier.weight does not match "
                           "its sha256")


def test_a_model_whose_head_differs_is_refused_by_every_door(native_saved):
    folder, _ = native_saved
    _refused_by_every_door(lambda: make_bert(2, labels=5), folder,
                           r"trained module classifier: tensors differ: checkpoint bias \[3\]")
    _refused_by_every_door(lambda: make_bert(2, cls=BertModel), folder, "classifier")


@pytest.mark.parametrize("change,match", [
    (lambda c: c["modules"]["classifier"]["tensors"].update(weight=[3, 33]),
     r"\$\.tensors\[\"classifier\.weight\"\]\.shape is \[3, 32\] but the layer record says"),
    (lambda c: c["modules"].pop("classifier"), r"trains 'classifier' but \$\.modules holds no"),
    (lambda c: c["tensors"].pop("classifier.bias"), r"\$\.tensors lacks classifier\.bias"),
    (lambda c: c.update(format_version=3), r"unknown key \"modules\""),
    (lambda c: c["modules"].update({"bert.encoder": c["modules"]["classifier"]}),
     r"overlaps the adapted layer"),
    (lambda c: c["modules"]["classifier"].update(tensors={}), r"at least one tensor"),
    (lambda c: c["tensors"]["classifier.weight"].update(dtype="int8"),
     r'expected "float16" or "bfloat16" or "float32" or "float64"'),
])
def test_an_edited_modules_record_is_refused(native_saved, change, match):
    folder, _ = native_saved
    edit(folder, change)
    _refused_by_every_door(lambda: make_bert(2), folder, match)


def test_the_stored_program_must_find_its_trained_modules(native_saved):
    folder, _ = native_saved
    edit(folder, lambda c: c.update(program=c["program"].replace("train classifier",
                                                                 "train pooler")))
    _refused_by_every_door(lambda: make_bert(2), folder,
                           "the stored program trains 'pooler' but \\$\\.modules holds no module")


def test_qcompile_out_refuses_trained_modules_on_a_shape_only_model(tmp_path):
    from qcircuit.runtime.cli import main
    (tmp_path / "a.qc").write_text("circuit c { qudits auto 2 all_pairs }\n"
                                   "apply c to query\ntrain pooler.dense\n")
    assert main([str(tmp_path / "a.qc"), "--model", "all-minilm-l6-v2", "--out",
                 str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
