"""Full training steps of a LLaMA-shaped model: QuanTA vs PEFT LoRA r=8 vs the frozen model.

A ``LlamaForCausalLM`` with LLaMA-2-7B's layer dimensions (hidden 4096, intermediate 11008,
32 heads), a few decoder layers, random weights and a small vocabulary (the head is not
what is compared). Each step: forward with labels, backward, ``torch.optim.AdamW`` on the
trainable parameters. Variants, each with gradient checkpointing off and on:

* ``frozen``: no adapter; the input embeddings require grad, so the backward runs through
  every layer as an adapter's does (no optimizer: nothing trains) — the floor;
* ``LoRA r=8``: PEFT's LoRA (alpha 16, no dropout) on ``q_proj`` and ``v_proj``;
* ``QuanTA``: ``examples/llama2_qv.qc`` (the paper's circuit, 16·8·8·4 all_pairs) on the same
  modules through ``qcircuit.runtime.attach`` (folded, routes chosen before timing).

Each (variant, checkpointing) runs in a fresh process: build, two warm-up steps, then
``--steps`` timed steps (synchronised on CUDA); the table gives the median step, tokens/s
and the peak memory of training over the memory after building the model (CPU: ``VmHWM``
growth, reset after setup; CUDA: ``max_memory_allocated`` growth), with ratios to LoRA.
CPU runs float32 with an explicit thread count; CUDA runs bfloat16 weights (QuanTA's gates
stay float32, as attach makes them).

Usage: ``python benchmarks/train_step.py [--device cpu|cuda] [--layers N] [--batch B]
[--seq S] [--steps K] [--threads T] [--output FILE]``; the table goes to
``benchmarks/train_step.txt`` (``train_step_cuda.txt`` on CUDA) unless ``--output`` names
another file.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from tables import cpu_name, write_table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "..", "examples", "llama2_qv.qc")
VARIANTS = ("frozen", "LoRA r=8", "QuanTA")
DEFAULTS = {"cpu": dict(layers=1, batch=1, seq=64, steps=5, threads=2),
            "cuda": dict(layers=4, batch=4, seq=1024, steps=10, threads=4)}
VOCAB = 512


def model_for(args: argparse.Namespace, device: str):
    """The LLaMA-shaped model, random weights (seed 0), every weight frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=args.layers,
                         vocab_size=VOCAB, max_position_embeddings=max(args.seq, 128),
                         use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.requires_grad_(False).train()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(variant: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    """Build one variant, train, return step times and peak memory growth."""
    device = args.device
    torch.set_num_threads(args.threads)
    model = model_for(args, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = args.batch * args.seq
    if variant == "QuanTA":
        from qcircuit.runtime import attach
        params = attach(model, PROGRAM, seed=0, warm_up=(tokens,)).trainable_parameters()
    elif variant == "LoRA r=8":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = []
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    embed = model.get_input_embeddings()

    def step() -> None:
        if params:
            loss = model(input_ids=ids, labels=ids).loss
        else:   # the frozen floor: backward through every layer into the embeddings
            loss = model(inputs_embeds=embed(ids).detach().requires_grad_(), labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
    sync()
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:   # hand the heap that setup freed back, so that the peak counts training alone
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM")) - base
    return {"times": times, "peak": peak}


def machine(args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    if args.device == "cuda":
        return (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
                f"bfloat16 weights, load average {load:.1f} at start")
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, float32, "
            f"{args.threads} threads, load average {load:.1f} at start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for name in ("layers", "batch", "seq", "steps", "threads"):
        ap.add_argument(f"--{name}", type=int, help="default: " + ", ".join(
            f"{d} {v[name]}" for d, v in DEFAULTS.items()))
    ap.add_argument("--output", help="the table's file (default benchmarks/train_step[_cuda].txt)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant process")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_step: --device cuda, but torch sees no CUDA device")
    output = args.output or os.path.join(
        HERE, "train_step_cuda.txt" if args.device == "cuda" else "train_step.txt")
    tokens = args.batch * args.seq
    lines = [f"# train_step: {machine(args)}",
             f"# LLaMA-2-7B layer shape (hidden 4096, intermediate 11008, 32 heads), "
             f"{args.layers} decoder layers, vocab {VOCAB}, random weights; batch {args.batch} x "
             f"seq {args.seq} = {tokens} tokens; AdamW; median of {args.steps} steps after 2 "
             f"warm-ups, one fresh process per row",
             f"{'checkpointing':>13}  {'variant':9s} {'step ms':>9} {'tokens/s':>9} "
             f"{'vs LoRA':>8} {'peak MiB':>9} {'vs LoRA':>8}"]
    for line in lines:
        print(line, flush=True)
    flags = [f"--{n}={getattr(args, n)}" for n in ("device", *DEFAULTS["cpu"])]
    for ckpt in (False, True):
        rows = {}
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, *flags, "--child", variant,
                                   str(int(ckpt))], capture_output=True, text=True,
                                  timeout=args.timeout)
            try:
                rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                rows[variant] = None
                print(proc.stderr[-2000:], file=sys.stderr)
        lora = rows.get("LoRA r=8")
        for variant, r in rows.items():
            if r is None:
                lines.append(f"{'on' if ckpt else 'off':>13}  {variant:9s} failed")
                print(lines[-1], flush=True)
                continue
            med = statistics.median(r["times"])
            rate = tokens / med
            vs = (lambda a, b: f"{a / b:7.2f}x" if b else f"{'-':>8}")
            lora_rate = tokens / statistics.median(lora["times"]) if lora else None
            lines.append(f"{'on' if ckpt else 'off':>13}  {variant:9s} {med * 1e3:9.1f} "
                         f"{rate:9.1f} {vs(rate, lora_rate)} {r['peak'] / 2**20:9.1f} "
                         f"{vs(r['peak'], lora['peak'] if lora else None)}")
            print(lines[-1], flush=True)
    lines.append(f"# load average {os.getloadavg()[0]:.1f} at the end")
    write_table(output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
