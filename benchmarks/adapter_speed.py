"""Speed of the QuanTA adapter: the compiled module against the one-expression reference.

The paper's circuit on LLaMA-2-7B's q_proj shape (qudits 16·8·8·4, all_pairs, 4096 → 4096),
float32, ``torch.set_num_threads(2)``, in the environment it is started in (nothing such as
``OMP_WAIT_POLICY`` is set here; the header prints it). Each row is one training step of that
layer's work — forward, then backward with a fixed random output gradient (grads to the
input and to every trainable tensor). Variants run interleaved (each round runs every variant
once, order rotated); the table gives medians, the ratio to the reference, and the cost
model's prediction beside the measurement.

* ``reference``: one opt_einsum expression over the whole network including ``x``, its path
  fixed once at 100 tokens (torch backend, torch autograd).
* ``route einsum`` / ``route schedule``: one route each (``Tuning.named``), whatever the
  choice; ``module [route, how]``: ``compile(c).module()`` end to end, with the route its
  planner chose for the bucket (measured on this machine, or from wisdom).
  ``sched, permutes apart`` is the schedule without the fused permute + gate kernel
  (``QCIRCUIT_FUSE=0``), ``sched, ATen copies`` without any C kernel (``QCIRCUIT_COMPILE=0``).
* context: the frozen base layer (``nn.Linear`` 4096×4096, weight frozen, grad to input) and
  PEFT LoRA r=8 on that same layer (base included).
* adapted layers (base included, folded as ``attach`` leaves them): ``qcircuit layer: QuanTA``
  is the circuit above as an ``AdaptedLayer``; ``qcircuit layer: QuanTA + LoRA r=8`` adds a
  ``low_rank 8`` branch (``zero_last``) to the same layer — a hybrid, both branches in one
  call of the layer.

Dense delta: the one expression over the gates, each dense route, and ``m.matrix()`` with the
route chosen for it (forward only, no grad).

Peak memory of one training step: each variant runs in a fresh subprocess (after one throwaway
step that builds the plan and the workspace, freed and trimmed); the peak resident
set (``VmHWM``) is reset through ``/proc/self/clear_refs`` after setup, one step runs, and the
growth of ``VmHWM`` over the resident size before the step is reported.

On CUDA (``--device cuda``): the ``route triton`` row (fused kernels, ``triton_route.py``)
joins, and each token count gains a bfloat16 block, its ratios to its own reference (the
one expression on bfloat16 casts of the input and gates, as autocast would) and to the frozen layer with bfloat16
weights: the frozen layer under autocast, the triton route on bfloat16 activations with
float32 gates, the adapted layer on a bfloat16 base (folded) and PEFT LoRA r=8 there.
Every tensor lives on the GPU, each timed call is bracketed by
``torch.cuda.synchronize()`` (the time is the GPU's work, not the launch), token counts run to
8192, the kernel-less rows are left out (the C kernels are CPU code), and peak memory is the
growth of ``torch.cuda.max_memory_allocated`` over one step, in this process. The cost
model is the CPU's: on the GPU its prediction only ranks, and measurement decides.

Usage: ``python benchmarks/adapter_speed.py [--device cpu|cuda] [--quick] [--output FILE]``;
the table is written to ``benchmarks/adapter_speed.txt`` (``adapter_speed_cuda.txt`` on
CUDA) unless ``--output`` names another file.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import os
import statistics
import subprocess
import sys
import time

import opt_einsum as oe  # noqa: E402
import torch  # noqa: E402

from qcircuit import Circuit  # noqa: E402
from qcircuit.compiler import costmodel as cm  # noqa: E402
from qcircuit.compiler.schedule import build_schedule  # noqa: E402
from qcircuit.compiler.schedule_exec import Workspace, run_schedule  # noqa: E402
from qcircuit.compiler import compile as compile_circuit  # noqa: E402
from qcircuit.compiler import choice, token_bucket, triton_route, tuning  # noqa: E402
from tables import cpu_name, write_table  # noqa: E402

THREADS = 2
# rounds per token count: a 16-token step takes milliseconds, so its median is taken over
# many more rounds (host noise moves single rounds by ±20 %); a 2048-token round takes ~4 s
# on the CPU; on the GPU every step takes milliseconds at most
ROUNDS = {"cpu": {16: 201, 512: 61, 2048: 9},
          "cuda": {16: 201, 512: 201, 2048: 101, 8192: 51}}
CIRCUIT = Circuit(16, 8, 8, 4).all_pairs()
APART_ROW = "sched, permutes apart"  # without the fused permute + gate kernel
ATEN_ROW = "sched, ATen copies"  # the same planner without any C kernel
OUTPUT = {d: os.path.join(os.path.dirname(os.path.abspath(__file__)), f"adapter_speed{s}.txt")
          for d, s in (("cpu", ""), ("cuda", "_cuda"))}


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        return (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
                f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, float32, host "
                f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average "
                f"{os.getloadavg()[0]:.1f} at start")
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
            f"float32, load average {os.getloadavg()[0]:.1f} at start")


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat: steal is time the hypervisor gave
    this machine's CPUs to another guest, which no interleaving can factor out."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


class OneLinear(torch.nn.Module):
    """A model of one ``nn.Linear`` named ``proj`` (what PEFT's LoRA wraps here)."""

    def __init__(self, n_in: int, n_out: int, **kwargs):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, **kwargs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def make_gates(c: Circuit, grad: bool = True, device: str = "cpu") -> list[torch.Tensor]:
    """The module's own Kaiming init (seed 0), as plain leaf tensors on ``device``."""
    return [g.detach().to(device, copy=True).requires_grad_(grad)
            for g in compile_circuit(c).module(seed=0).gates]


def sync(device: str) -> None:
    """Wait for the GPU's queued work (nothing on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def variants(tokens: int, extra: bool = True, device: str = "cpu") -> dict:
    """name -> (step function, predicted seconds or None); ``extra``: the kernel-less rows
    (CPU only: the C kernels do not run on the GPU)."""
    c = CIRCUIT
    gates = make_gates(c, device=device)
    x = torch.randn(tokens, c.in_features, device=device, requires_grad=True)
    gy = torch.randn(tokens, c.out_features, device=device)
    eq = compile_circuit(c).forward_network.equation
    shapes = [(tokens,) + c.in_dims] + [g.shape for g in c.gates]
    path, _ = oe.contract_path(eq, (100,) + c.in_dims, *shapes[1:], shapes=True, optimize="optimal")
    expr = oe.contract_expression(eq, *shapes, optimize=path)

    def clear(*ts):
        for t in ts:
            t.grad = None

    def reference():
        expr(x.view(tokens, *c.in_dims), *gates, backend="torch").reshape(tokens, -1).backward(gy)
        clear(x, *gates)

    machine = tuning.default().machine()   # the cost model's constants for this CPU
    out = {"reference": (reference, cm.einsum_reference(machine, tokens, c.in_dims, c.gates))}
    plan = compile_circuit(c)
    for route in ("einsum", "schedule") + (("triton",) if triton_route.offered_on(device) else ()):
        rp = tuning.default().named(plan, "forward", route, token_bucket(tokens),
                                    torch.device(device), torch.float32)
        runner = choice.build(plan, rp)

        def run(runner=runner):
            runner(x, gates).backward(gy)
            clear(x, *gates)
        out[f"route {route}"] = (run, rp.candidates[0].predicted)
    for row, switch in ((APART_ROW, "QCIRCUIT_FUSE"), (ATEN_ROW, "QCIRCUIT_COMPILE"))[
            :2 if extra and device == "cpu" else 0]:
        with switched_off(switch):
            sched, ws = build_schedule(c, tokens, machine=machine), Workspace()

        def run(sched=sched, ws=ws, switch=switch):
            with switched_off(switch):
                run_schedule(sched, x, gates, ws).backward(gy)
            clear(x, *gates)
        out[row] = (run, sched.cost)
    module = plan.module(device=device)
    module_params = list(module.parameters())
    # chosen (measured) before any timing
    chosen = plan.warm_up(tokens, device=device).decision(tokens, device)

    def run_module():
        module(x).backward(gy)
        clear(x, *module_params)
    out[f"module [{chosen.route}, {chosen.how}]"] = (run_module, None)
    base = torch.nn.Linear(c.in_features, c.out_features, device=device).requires_grad_(False)

    def run_base():
        base(x).backward(gy)
        clear(x)
    gemm = cm.gemm(machine, tokens, c.out_features, c.in_features)
    out["base layer (frozen)"] = (run_base, 2 * gemm)
    out.update(adapted_layers(x, gy, plan, tokens, device, clear))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # the row is context only
        return out
    lora = get_peft_model(OneLinear(c.in_features, c.out_features),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])).to(device)
    lora_params = [p for p in lora.parameters() if p.requires_grad]

    def run_lora():
        lora(x).backward(gy)
        clear(x, *lora_params)
    out["base + LoRA r=8 (peft)"] = (run_lora, None)
    return out


def bf16_variants(tokens: int, device: str) -> dict:
    """bfloat16 rows (GPU): the reference on bfloat16 casts, the frozen layer under autocast
    and with bfloat16 weights, the triton route on bfloat16 activations (float32 gates), PEFT LoRA
    r=8 and the adapted layer on a bfloat16 base; name -> (step, None)."""
    from qcircuit.runtime import AdaptedLayer
    c, bf = CIRCUIT, torch.bfloat16
    plan = compile_circuit(c)
    gates = make_gates(c, device=device)
    x32 = torch.randn(tokens, c.in_features, device=device, requires_grad=True)
    x = x32.detach().to(bf).requires_grad_()
    gy = torch.randn(tokens, c.out_features, device=device, dtype=bf)
    eq = plan.forward_network.equation
    expr = oe.contract_expression(eq, (tokens,) + c.in_dims, *[g.shape for g in c.gates],
                                  optimize="optimal")
    autocast = functools.partial(torch.autocast, device, dtype=bf)

    def step(fn, inp, params):
        def run():
            fn(inp).backward(gy)
            for t in (inp, *params):
                t.grad = None
        return run, None

    def reference(h):   # what autocast does to a matmul: operands cast to bfloat16
        return expr(h.view(tokens, *c.in_dims), *[g.to(bf) for g in gates],
                    backend="torch").reshape(tokens, -1)
    out = {"reference (bf16)": step(reference, x, gates)}
    if triton_route.offered_on(device):
        run = choice.build(plan, tuning.default().named(
            plan, "forward", "triton", token_bucket(tokens), torch.device(device), bf))
        out["route triton (bf16 x)"] = step(lambda h: run(h, gates), x, gates)
    base32 = torch.nn.Linear(c.in_features, c.out_features, device=device).requires_grad_(False)
    base = torch.nn.Linear(c.in_features, c.out_features, device=device, dtype=bf)
    base.requires_grad_(False)

    def autocast_base(h):
        with autocast():
            return base32(h)
    out["base layer (autocast)"] = step(autocast_base, x32, [])
    out["base layer (bf16)"] = step(base, x, [])
    layer = AdaptedLayer.of(base, c, init="freeze_one", plan=plan,
                            generator=torch.Generator().manual_seed(0))
    layer.fold()
    plan.warm_up(tokens, device=device)
    out["layer: QuanTA (bf16)"] = step(layer, x, layer.gate_parameters())
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return out
    lora = get_peft_model(OneLinear(c.in_features, c.out_features, device=device, dtype=bf),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    out["LoRA r=8 (bf16, peft)"] = step(
        lora, x, [p for p in lora.parameters() if p.requires_grad])
    return out


def adapted_layers(x, gy, plan, tokens: int, device: str, clear) -> dict:
    """The paper's layer as qcircuit's runtime runs it: one branch, and QuanTA + LoRA r=8."""
    from qcircuit.runtime import AdaptedLayer
    from qcircuit.runtime.branch import Branch
    c = CIRCUIT
    low = Circuit.low_rank(8, c.in_features, c.out_features)
    out = {}
    for row, hybrid in (("qcircuit layer: QuanTA", False), ("qcircuit layer: QuanTA + LoRA r=8", True)):
        base = torch.nn.Linear(c.in_features, c.out_features, device=device).requires_grad_(False)
        branches = [Branch("attn", c, base.weight, init="freeze_one", scale=1.0, dropout=0.0,
                           plan=plan)]
        if hybrid:
            branches.append(Branch("lora", low, base.weight, init="zero_last", scale=2.0,
                                   dropout=0.0))
        layer = AdaptedLayer(base, branches)
        layer.fold()
        for b in branches:   # routes chosen (measured) before any timing
            b.plan.warm_up(tokens, device=device)
        params = layer.gate_parameters()

        def run(layer=layer, params=params):
            layer(x).backward(gy)
            clear(x, *params)
        out[row] = (run, None)
    return out


@contextlib.contextmanager
def switched_off(variable: str):
    """Plan and run with one of the C kernels switched off (``QCIRCUIT_FUSE``: the fused
    permute + gate kernel; ``QCIRCUIT_COMPILE``: every C kernel)."""
    from qcircuit.compiler import fused, kernels

    def reread():  # the switches are read once per process: read them again
        kernels.enabled.cache_clear()
        fused.available.cache_clear()
    old = os.environ.get(variable)
    os.environ[variable] = "0"
    reread()
    try:
        yield
    finally:
        if old is None:
            del os.environ[variable]
        else:
            os.environ[variable] = old
        reread()


def interleaved(funcs: dict, rounds: int, device: str = "cpu") -> dict[str, float]:
    for f in funcs.values():
        f()  # warm-up: plans, caches, workspaces (and on the GPU its kernels' first loads)
    times: dict[str, list[float]] = {k: [] for k in funcs}
    names = list(funcs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            funcs[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def dense_variants(device: str = "cpu") -> tuple[dict, dict]:
    c = CIRCUIT
    gates = make_gates(c, grad=False, device=device)
    plan = compile_circuit(c)
    eq = plan.dense_network.equation
    expr = oe.contract_expression(eq, *[g.shape for g in c.gates], optimize="optimal")
    exact = expr(*[g.double() for g in gates], backend="torch").reshape(c.out_features, -1)
    module = plan.module(seed=0, device=device).requires_grad_(False)
    plan.warm_up(device=device, dtype=torch.float32)
    chosen = tuning.default().decision(plan, "dense", None, torch.device(device), torch.float32)
    out = {"reference (one expression)": (lambda: expr(*gates, backend="torch"), None)}
    for route in ("einsum", "schedule", "lightcone"):
        rp = tuning.default().named(plan, "dense", route, None, torch.device(device),
                                    torch.float32)
        out[f"route {route}"] = (functools.partial(choice.build(plan, rp), gates),
                                 rp.candidates[0].predicted)
    out[f"m.matrix() [{chosen.route}, {chosen.how}]"] = (module.matrix, None)
    with torch.no_grad():
        err = {name: (torch.linalg.norm(f().reshape(exact.shape).double() - exact)
                      / torch.linalg.norm(exact)).item() for name, (f, _) in out.items()}
    return out, err


def memory_child(name: str, tokens: int) -> None:
    torch.set_num_threads(THREADS)
    warm = variants(tokens, extra=False)  # load the kernel, plan and warm every cache first: their memory
    warm[name][0]()          # is not the step's; then free it all and measure a fresh setup
    del warm
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts low
    except OSError:
        pass
    funcs = variants(tokens, extra=False)
    step = funcs[name][0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    step()
    print((_status("VmHWM") - before) * 1024)


def cuda_peak_memory(name: str, tokens: int) -> int:
    """Growth of ``torch.cuda.max_memory_allocated`` over one step, after a throwaway step
    that builds the plan and the workspace (in this process: the allocator is the GPU's)."""
    funcs = variants(tokens, extra=False, device="cuda")
    step = funcs[name][0]
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del funcs, step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_memory(name: str, tokens: int) -> int | None:
    proc = subprocess.run([sys.executable, __file__, "--memory-child", name, str(tokens)],
                          capture_output=True, text=True, timeout=600)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where every tensor lives (default cpu)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds, memory at 512 tokens only")
    ap.add_argument("--output", help="write the table to this file (atomically; default "
                    "benchmarks/adapter_speed.txt, or adapter_speed_cuda.txt on cuda)")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("adapter_speed: --device cuda, but torch sees no CUDA device")
    output = args.output or OUTPUT[device]
    torch.set_num_threads(THREADS)
    ticks0 = cpu_ticks()
    lines = [f"# adapter_speed: {machine(device)}",
             f"# circuit 16·8·8·4 all_pairs (4096 -> 4096), {CIRCUIT.num_params} parameters; "
             f"forward+backward on {device}; medians of interleaved rounds"
             + ("; predicted: the CPU cost model" if device == "cuda" else "")]

    def emit(s: str = "") -> None:
        lines.append(s)
        print(s, flush=True)
    for s in lines:
        print(s, flush=True)
    emit(f"{'tokens':>6}  {'variant':26s} {'time ms':>9} {'vs ref':>7} {'vs base':>8} {'predicted ms':>13}")
    for tokens, rounds in ROUNDS[device].items():
        rounds //= 3 if args.quick else 1
        funcs = variants(tokens, extra=not args.quick, device=device)
        med = interleaved({k: f for k, (f, _) in funcs.items()}, rounds, device)
        ref, base = med["reference"], med["base layer (frozen)"]
        for name, (_, pred) in funcs.items():
            p = f"{pred * 1e3:13.1f}" if pred is not None else f"{'-':>13}"
            emit(f"{tokens:>6}  {name:26s} {med[name] * 1e3:9.2f} {ref / med[name]:6.2f}x "
                 f"{med[name] / base:7.2f}x {p}")
        emit()
        del funcs
        if device == "cuda":
            funcs = bf16_variants(tokens, device)
            med = interleaved({k: f for k, (f, _) in funcs.items()}, rounds, device)
            ref, base = med["reference (bf16)"], med["base layer (bf16)"]
            for name in funcs:
                emit(f"{tokens:>6}  {name:26s} {med[name] * 1e3:9.2f} {ref / med[name]:6.2f}x "
                     f"{med[name] / base:7.2f}x {'-':>13}")
            emit()
            del funcs
    funcs, err = dense_variants(device)
    med = interleaved({k: f for k, (f, _) in funcs.items()}, 5 if args.quick else 31, device)
    ref = med["reference (one expression)"]
    emit("dense delta (4096×4096), forward only; normwise relative error vs float64: "
         + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    for name, (_, pred) in funcs.items():
        p = f"{pred * 1e3:13.1f}" if pred is not None else f"{'-':>13}"
        emit(f"        {name:26s} {med[name] * 1e3:9.2f} {ref / med[name]:6.2f}x {'':>8} {p}")
    emit()
    del funcs
    sizes = (512,) if args.quick else (512, 2048) + ((8192,) if device == "cuda" else ())
    emit("peak memory of one training step " + ("(torch.cuda.max_memory_allocated growth)"
         if device == "cuda" else "(VmHWM growth, fresh process per variant)"))
    for tokens in sizes:
        for name in ("reference", "route schedule", "base + LoRA r=8 (peft)"):
            try:
                mem = cuda_peak_memory(name, tokens) if device == "cuda" else peak_memory(name, tokens)
            except KeyError:  # no peft here
                mem = None
            emit(f"{tokens:>6}  {name:26s} " + (f"{mem / 2**20:9.1f} MiB" if mem is not None else "failed"))
    ticks1 = cpu_ticks()
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        steal = (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
        emit(f"# CPU steal (time the hypervisor gave these cores to other guests): "
             f"{100 * steal:.0f} % during the run")
    with torch.no_grad():
        for tokens in ROUNDS[device]:
            emit(f"# route choice at {tokens} tokens:")
            for row in compile_circuit(CIRCUIT).explain(tokens, device).splitlines():
                emit("#   " + row)
    write_table(output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
