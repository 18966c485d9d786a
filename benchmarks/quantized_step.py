"""A QuanTA training step on a quantized base model: memory and time, float32 against 4-bit and 8-bit.

Model: a LLaMA-shaped decoder built from a config with random weights (hidden 1024,
intermediate 2816, 2 layers, 16 heads, vocabulary 4096), saved once and loaded by
transformers the way users load real ones: float32; NF4 (bitsandbytes ``Linear4bit``,
blocksize 64, nested statistics, compute in float32); int8 (bitsandbytes ``Linear8bitLt``,
LLM.int8); int8 weight-only (torchao ``Int8WeightOnlyConfig``). Every decoder linear layer
is quantized (embeddings and ``lm_head`` stay float32, transformers' default). Adapter: the
circuit 16·8·8 ``all_pairs`` (``freeze_one``) on every ``q_proj`` and ``v_proj``; quantized
layers run it unfolded (two circuits), the float32 model folded (one). A step: forward,
cross-entropy, backward, Adam on the gates; batch 2 × 128 tokens.

Columns:

* ``weights MiB``: what the model's parameters and buffers take as stored (packed codes,
  scales and quantization state included; gates excluded), counted exactly. On the CPU
  this is the memory column: a process's resident set would mix in the float32
  checkpoint, which transformers maps from the file and pages in as it is read, and the
  libraries' code, paged in on first use;
* on CUDA also ``allocated MiB`` (``torch.cuda.memory_allocated`` growth over loading,
  attaching and one warm-up step: weights, plans, optimizer state) and ``step peak MiB``
  (growth of ``max_memory_allocated`` over one more step: activations and temporaries);
* ``ms/step``: median over interleaved rounds (every round runs every variant once, order
  rotated, after one warm-up round), and the ratio to float32.

``quantized_rows(...)`` returns the rows, for another benchmark (``train_step.py``) to
print beside its own. Usage: ``python benchmarks/quantized_step.py [--device cpu|cuda]
[--rounds 7] [--threads 2] [--output FILE]``; writes benchmarks/quantized_step.txt
(``quantized_step_cuda.txt`` on CUDA).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tables import cpu_name, write_table  # noqa: E402

KINDS = ("float32", "bnb nf4", "bnb int8", "torchao int8")
PROGRAM = "circuit attn { qudits 16 8 8  all_pairs }\napply attn to q_proj, v_proj\n"
BATCH, TOKENS = 2, 128
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Row:
    kind: str
    weights_mib: float
    allocated_mib: float | None
    step_peak_mib: float | None
    ms_per_step: float
    vs_float32: float


def save_base(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=4096, max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(path)


def load(path: Path, kind: str, device: str):
    """The saved model as ``kind``, with the adapter attached, and its Adam optimizer."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

    from qcircuit import parse
    from qcircuit.runtime import attach
    config = None
    if kind == "bnb nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    elif kind == "bnb int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif kind == "torchao int8":
        from torchao.quantization import Int8WeightOnlyConfig
        config = TorchAoConfig(Int8WeightOnlyConfig())
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                             dtype=torch.float32)
    adapted = attach(model, parse(PROGRAM), seed=0, warm_up=(BATCH * TOKENS,))
    return adapted, torch.optim.Adam(adapted.trainable_parameters(), lr=1e-4)


def stored_bytes(adapted) -> int:
    """Parameters and buffers as stored (bitsandbytes' quantization state included), gates
    and frozen gates excluded."""
    from qcircuit.runtime.quant_schemes import nbytes
    gates = {id(t) for layer in adapted.layers.values() for t in layer.branches.parameters()}
    total = 0
    for module in adapted.model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) in gates:
                continue
            if hasattr(t, "__tensor_flatten__"):   # torchao: its inner tensors
                total += sum(nbytes(getattr(t, k)) for k in t.__tensor_flatten__()[0])
            else:
                total += nbytes(t) + nbytes(getattr(t, "quant_state", None))
                total += nbytes(getattr(t, "SCB", None))
        state = getattr(module, "state", None)   # Linear8bitLt: its row scales, after a forward
        if getattr(state, "SCB", None) is not None and getattr(module.weight, "SCB", None) is None:
            total += nbytes(state.SCB)
    return total


def step(adapted, optimizer, ids: torch.Tensor, device: str) -> None:
    loss = adapted.model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()


def batch(device: str) -> torch.Tensor:
    return torch.randint(0, 4096, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1)
                         ).to(device)


def cuda_memory(path: Path, kind: str) -> tuple[float, float]:
    """CUDA: memory allocated by load + attach + one step, and the peak growth over one more."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    adapted, optimizer = load(path, kind, "cuda")
    adapted.model.train()
    ids = batch("cuda")
    step(adapted, optimizer, ids, "cuda")
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(adapted, optimizer, ids, "cuda")
    peak = torch.cuda.max_memory_allocated() - resident
    del adapted, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return (resident - before) / 2**20, peak / 2**20


def quantized_rows(device: str = "cpu", rounds: int = 7, threads: int = 2,
                   kinds: tuple[str, ...] = KINDS) -> list[Row]:
    """One row per kind of base model (see the module doc)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        save_base(path)
        mem = {k: cuda_memory(path, k) if device == "cuda" else (None, None) for k in kinds}
        models = {k: load(path, k, device) for k in kinds}
        ids = batch(device)
        for adapted, _ in models.values():
            adapted.model.train()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(rounds + 1):   # round 0 warms up
            order = list(kinds[r % len(kinds):] + kinds[:r % len(kinds)])
            for k in order:
                start = time.perf_counter()
                step(*models[k], ids, device)
                if r:
                    times[k].append(time.perf_counter() - start)
        weights = {k: stored_bytes(models[k][0]) / 2**20 for k in kinds}
    median = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ref = median.get("float32", next(iter(median.values())))
    return [Row(k, weights[k], *mem[k], median[k], median[k] / ref) for k in kinds]


def header(device: str, threads: int, rounds: int) -> list[str]:
    import bitsandbytes
    import torchao
    import transformers
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"{cpu_name()}, {os.cpu_count()} cores, torch.set_num_threads({threads})")
    return [f"# quantized_step: {where}; load average {os.getloadavg()[0]:.1f} at the end",
            f"# torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}, torchao {torchao.__version__}",
            f"# LLaMA-shaped, hidden 1024, 2 layers, random weights; QuanTA 16·8·8 all_pairs "
            f"on q_proj, v_proj; fwd+bwd+Adam, batch {BATCH}x{TOKENS}; median of {rounds} "
            "interleaved rounds"]


def table(rows: list[Row]) -> list[str]:
    def mib(v):
        return "-" if v is None else f"{v:.1f}"
    lines = [f"{'base model':14} {'weights MiB':>11} {'allocated MiB':>13} {'step peak MiB':>13} "
             f"{'ms/step':>8} {'vs float32':>10}"]
    lines += [f"{r.kind:14} {r.weights_mib:11.1f} {mib(r.allocated_mib):>13} "
              f"{mib(r.step_peak_mib):>13} {r.ms_per_step:8.1f} {r.vs_float32:9.2f}x"
              for r in rows]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output")
    args = ap.parse_args()
    rows = quantized_rows(args.device, args.rounds, args.threads)
    text = "\n".join(header(args.device, args.threads, args.rounds) + table(rows)) + "\n"
    print(text, end="")
    out = Path(args.output or HERE / f"quantized_step{'_cuda' if args.device == 'cuda' else ''}.txt")
    write_table(out, text)


if __name__ == "__main__":
    main()
