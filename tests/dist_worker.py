"""One training run of a tiny adapted LLaMA, single-process or under a distributed wrapper.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py MODE
OUT`` trains under ``MODE`` (ddp, fsdp2, fsdp1, accelerate) on gloo and CPU, each rank on its half of one global
batch; rank 0 writes the losses, the first step's gate gradients (whole) and, after
training, the saved adapter and the logits of the trained model to ``OUT``. ``run("single",
...)`` is the same run in one process on the whole batch: the reference the tests compare
against. Run for both inits and, for DDP, in float64 too.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qcircuit import QCError, parse
from qcircuit.runtime import attach, load

PROGRAM = """
circuit attn {
    qudits 4 4 4
    all_pairs
}
circuit up {
    qudits 4 4 4 -> 4 43 1
    gate (0, 1)
    gate (1, 2) 4x4 -> 43x1
}
circuit down {
    qudits 4 43 -> 4 16
    gate (0, 1) 4x43 -> 4x16
}
apply attn to q_proj, v_proj
apply up to up_proj
apply down to down_proj
option init = %s
"""
STEPS = 3
INITS = ("freeze_one", "zero_last")


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    return LlamaForCausalLM(config).to(dtype)


def batch() -> torch.Tensor:
    """The global batch: 4 sequences of 9 tokens."""
    return torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next token, in the logits' own dtype (transformers' loss
    casts to float32, which would cap a float64 comparison at float32 rounding)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _wrap(mode: str, model: torch.nn.Module) -> torch.nn.Module:
    if mode in ("single", "accelerate"):   # accelerate wraps in prepare()
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FullyShardedDataParallel(model, use_orig_params=True,
                                        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                        device_id=torch.device("cpu"))
    raise ValueError(mode)


def _gathered(mode: str, wrapped: torch.nn.Module, writeback: bool = False):
    """A context in which every parameter (and gradient) is whole on this rank."""
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=writeback,
                                                           with_grads=not writeback)
    import contextlib
    return contextlib.nullcontext()


def run(mode: str, init: str, dtype: torch.dtype, out: Path | None = None) -> dict:
    """Train ``STEPS`` SGD steps; return losses, first-step gate gradients and final logits."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "single" else (0, 1)
    model = tiny_llama(dtype)
    adapted = attach(model, parse(PROGRAM % init), seed=0)
    wrapped = _wrap(mode, model)
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    backward = torch.Tensor.backward
    if mode == "accelerate":
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
        backward = accelerator.backward
    ids = batch().chunk(world)[rank]
    if mode in ("ddp", "accelerate"):   # the handle is not the wrapper: a warning says so
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted(input_ids=ids[:, :2])
        assert any("call the DDP/FSDP wrapper" in str(w.message) for w in caught), caught
    losses, grads = [], {}
    for step in range(STEPS):
        loss = next_token_loss(wrapped(input_ids=ids).logits, ids)
        backward(loss)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
        if step == 0:
            with _gathered(mode, wrapped):
                for name, layer in adapted.layers.items():
                    for i, g in enumerate(layer.adapter.gates):
                        grads[f"{name}.{i}"] = _whole(g.grad).detach().clone().contiguous()
        optimizer.step()
        optimizer.zero_grad()
    result = {"losses": losses, "grads": grads}
    if out is not None:
        with _gathered(mode, wrapped):
            adapted.save(out / f"adapter-{init}-{str(dtype)[6:]}")   # every rank; rank 0 writes
        wrapped.eval()
        with torch.no_grad():
            logits = wrapped(input_ids=batch()).logits
            if mode == "fsdp1":   # flat shards outside summon_full_params: refused, untouched
                try:
                    adapted.merge()
                except QCError as e:
                    assert "summon_full_params" in str(e) and not adapted.merged, e
                else:
                    raise AssertionError("merge() on FSDP1 shards was not refused")
            with _gathered(mode, wrapped, writeback=True):
                adapted.merge()   # every rank; the new weights go back into the shards
            merged = wrapped(input_ids=batch()).logits
        if rank == 0:
            save_file({"logits": logits.contiguous(), "merged": merged.contiguous(),
                       **{f"grad.{k}": v for k, v in grads.items()}},
                      str(out / f"result-{init}-{str(dtype)[6:]}.safetensors"))
            (out / f"losses-{init}-{str(dtype)[6:]}.json").write_text(json.dumps(losses))
    return result


def reload_logits(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The logits of a fresh base model with the saved adapter loaded."""
    model = load(tiny_llama(dtype), path).model.eval()
    with torch.no_grad():
        return model(input_ids=batch()).logits


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        for init in INITS:
            run(mode, init, torch.float32, Path(out))
        if mode == "ddp":
            run(mode, "freeze_one", torch.float64, Path(out))
        dist.barrier()   # every rank is done with the group before it goes
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: under load, gloo's background threads were seen to abort
    # the process there ("terminate called without an active exception") after all work
    # was done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
