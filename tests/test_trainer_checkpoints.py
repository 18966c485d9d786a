"""Adapter-only ``Trainer`` checkpoints for the native door, and resuming from them (issue 24).

A tiny BERT classifier (no dropout, so runs repeat exactly) trains a circuit and its
head with ``AdapterTrainer``: each ``checkpoint-N/`` holds the adapter and Trainer's own
optimizer, scheduler, RNG and state files, never the model's weights; a run resumed
from ``checkpoint-2`` on a freshly attached model (other random gates, another random
head) ends where the uninterrupted run ended (float32, 1e-4 normwise after the steps
that follow the restore's refold); ``save_model()`` into the output directory writes the
adapter beside the ``checkpoint-*`` folders and leaves them as they were.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

from qcircuit import QCError  # noqa: E402
from qcircuit.runtime import AdapterTrainer, attach, checkpoint, load  # noqa: E402
from test_checkpoint import _tree  # noqa: E402
from test_peft import rel  # noqa: E402
from test_trained_modules import CONFIG, PROGRAM, one_thread  # noqa: E402,F401

RESUMED = 1e-4


def make_bert(head_seed: int):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(**{**CONFIG.to_dict(), "hidden_dropout_prob": 0.0,
                           "attention_probs_dropout_prob": 0.0})
    model = BertForSequenceClassification(config)
    torch.nn.init.normal_(model.classifier.weight, generator=torch.Generator().manual_seed(
        head_seed))
    return model


def rows() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 100, (16, 6), generator=g), torch.randint(0, 3, (16,),
                                                                             generator=g)
    return [{"input_ids": i, "labels": int(y)} for i, y in zip(ids, labels)]


def trainer_for(adapted, out: Path, steps: int = 4) -> AdapterTrainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                             max_steps=steps, save_steps=2, learning_rate=3e-2, logging_steps=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             lr_scheduler_type="constant", warmup_steps=0)
    return AdapterTrainer(adapter=adapted, args=args, train_dataset=rows())


def run(adapted, out: Path, resume: str | None = None) -> AdapterTrainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_for(adapted, out)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.stack([r["input_ids"] for r in rows()])).logits


@pytest.fixture
def finished(tmp_path):
    adapted = attach(make_bert(1), PROGRAM, seed=0, train=["classifier"])
    trainer = run(adapted, tmp_path / "run")
    return adapted, trainer, tmp_path / "run"


def eval_loss(model) -> float:
    model.eval()
    data = rows()
    with torch.no_grad():
        return model(input_ids=torch.stack([r["input_ids"] for r in data]),
                     labels=torch.tensor([r["labels"] for r in data])).loss.item()


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_checkpoints_hold_the_adapter_only(finished):
    adapted, trainer, out = finished
    start = make_bert(1)
    assert rel(adapted.model.classifier.weight.detach(), start.classifier.weight) > 1e-2   # head trained
    assert eval_loss(adapted.model) < eval_loss(start)
    for step in (2, 4):
        names = set(os.listdir(out / f"checkpoint-{step}"))
        assert {checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, "trainer_state.json",
                "optimizer.pt"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}
    with safe_open(out / "checkpoint-4" / checkpoint.WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
        stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    assert not [k for k in keys if "embeddings" in k or "dense" in k]   # no base weights
    assert stored < sum(p.numel() for p in adapted.model.parameters()) / 4
    restored = load(make_bert(7), out / "checkpoint-4")   # a plain adapter directory
    assert rel(logits(restored.model), logits(adapted.model)) <= 1e-5


def test_resume_restores_gates_head_and_step(finished, tmp_path):
    adapted, trainer, out = finished
    want = logits(adapted.model)
    fresh = attach(make_bert(2), PROGRAM, seed=3, train=["classifier"])   # other gates, head
    assert rel(logits(fresh.model), want) > 1e-2
    resumed = run(fresh, tmp_path / "again", resume=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 4
    first, again = losses(trainer), losses(resumed)
    assert sorted(again) == [1, 2, 3, 4]   # steps 1, 2 from the checkpoint's state
    assert all(abs(again[k] - first[k]) <= RESUMED * abs(first[k]) for k in (3, 4))
    assert rel(logits(fresh.model), want) <= RESUMED


def test_save_model_into_the_output_directory_keeps_the_checkpoints(finished):
    adapted, trainer, out = finished
    before = {k: v for k, v in _tree(out).items() if k.startswith("checkpoint-")}
    trainer.save_model()
    after = _tree(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint-")} == before
    assert rel(logits(load(make_bert(9), out).model), logits(adapted.model)) <= 1e-5
    adapted.save(out)   # and the handle's own save, as the trial tried


def test_resume_refuses_another_adapter(finished, tmp_path):
    adapted, trainer, out = finished
    other = attach(make_bert(1), PROGRAM, seed=0)   # no head trained
    with pytest.raises(QCError, match=r"trains the modules \['classifier'\], this adapter "
                                      r"trains \[\]"):
        run(other, tmp_path / "x", resume=str(out / "checkpoint-2"))


def test_the_trainer_must_train_the_adapters_model(finished):
    adapted, _, out = finished
    with pytest.raises(QCError, match="not the adapter's model"):
        AdapterTrainer(adapter=adapted, model=make_bert(1),
                       args=TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True))
