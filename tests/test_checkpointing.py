"""Decide, then run (compiler/tuning.py): gradient checkpointing on an empty cache through
every door, a recomputation runs the route of its original forward, the tuning key is
complete, and the schedule route's saved buffers go through saved-tensor hooks."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qcircuit import Circuit, parse
from qcircuit.compiler import Tuning, choice, compile, tuning
from qcircuit.runtime import attach
from reference import assert_close, circuit_operator, rel_err

PROGRAM = "circuit c {\n    qudits 4 4 4\n    all_pairs\n}\napply c to q_proj, v_proj\n"
LENGTHS = (32, 200, 700)      # new buckets one after the other, as dynamic padding brings them
CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps


def run_once(thunks):
    """A timer that runs every candidate once, as a real measurement does (inside the
    first forward of a bucket, where the old design crashed), and prefers the schedule."""
    for fn in thunks.values():
        fn()
    return {n: 0.5 if n == "schedule" else 1.0 for n in thunks}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh default tuning state on an empty cache directory."""
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(tmp_path / "cache"))
    fresh = tuning.reset()
    fresh.timer = run_once
    yield fresh
    monkeypatch.undo()
    tuning.reset()


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 100, (2, t), generator=gen) for t in LENGTHS]


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def losses_and_grads(model, checkpointing: bool, reentrant: bool):
    """One backward per length; the loss and every trainable gradient of each."""
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # frozen embeddings: the checkpointed blocks need an input with grad
            model.enable_input_require_grads()
    model.train()
    out = []
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in _trainable(model)]
        for p in _trainable(model):
            p.grad = None
        out.append((loss.detach(), grads))
    return out


def assert_same_training(got, want):
    for (loss, grads), (loss0, grads0) in zip(got, want, strict=True):
        assert rel_err(loss, loss0) < 1e3 * EPS32
        assert len(grads) == len(grads0) and grads
        for g, g0 in zip(grads, grads0):
            assert rel_err(g, g0) < 1e4 * EPS32


def native(model):
    return attach(model, parse(PROGRAM), seed=0).model


def through_peft(model):
    pytest.importorskip("peft")
    import qcircuit.peft  # noqa: F401  (registers the method)
    from peft import get_peft_model
    from qcircuit.peft import QuanTAConfig
    return get_peft_model(model, QuanTAConfig(program=PROGRAM, seed=0))


@pytest.mark.parametrize("door", [native, through_peft], ids=["attach", "peft"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_on_an_empty_cache(empty_cache, door, reentrant):
    """The first forward of each new length decides its route inside a checkpointed forward;
    the training equals the same model's without checkpointing."""
    got = losses_and_grads(door(make_model()), True, reentrant)
    assert {d.how for d in empty_cache.decisions()} >= {"measured"}
    want = losses_and_grads(door(make_model()), False, reentrant)
    assert_same_training(got, want)


def test_trainer_with_gradient_checkpointing_on_an_empty_cache(empty_cache, tmp_path):
    from transformers import Trainer, TrainingArguments

    def pad(features):  # dynamic padding: each batch as long as its longest row
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), n, dtype=torch.long)
        mask = torch.zeros(len(features), n, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = f["input_ids"]
            mask[i, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100)}

    def train(checkpointing: bool):
        model = native(make_model())
        data = [{"input_ids": row} for ids in batches() for row in ids]
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), max_steps=3,
            per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
            save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0)
        Trainer(model=model, args=args, train_dataset=data, data_collator=pad).train()
        return [p.detach().clone() for p in _trainable(model)]

    got = train(True)
    assert any(d.how == "measured" for d in empty_cache.decisions())
    want = train(False)
    assert len(got) == len(want) and got
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e4 * EPS32


@pytest.mark.parametrize("first", ["einsum", "schedule"])
def test_a_recomputed_forward_runs_the_route_of_its_original(empty_cache, monkeypatch, first):
    """The timer names a different winner each time it is asked; the original forward and
    its recomputation still run one route, the one decided first. (A small schedule runs its
    backward on one thread, and the recomputation starts inside that backward: it must still
    look up the same key.)"""
    asked = []
    order = (first, "schedule" if first == "einsum" else "einsum")

    def flipping(thunks):
        if "lightcone" in thunks:   # the dense matrix attach's fold needs: not this test's
            return {n: 1.0 for n in thunks}
        asked.append(sorted(thunks))
        winner = order[(len(asked) - 1) % 2]
        return {n: 0.5 if n == winner else 1.0 for n in thunks}

    ran: list[str] = []
    real_build = choice.build

    def spying(lowered, decision):
        run = real_build(lowered, decision)
        if decision.kind == "dense":
            return run
        return lambda *a: ran.append(decision.route) or run(*a)

    monkeypatch.setattr(choice, "build", spying)
    empty_cache.timer = flipping
    model = native(make_model())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = batches()[1]
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(asked) == 1                       # decided once, before the forward recorded
    assert len(ran) == 2 * 2 * 2                 # 2 layers × q, v × (forward, recompute)
    assert set(ran) == {first}                   # the first answer, every time
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(asked) == 1 and set(ran) == {first}


def test_the_key_names_the_thread_count_and_the_kernel_switches(monkeypatch):
    asked = []
    t = Tuning(None, timer=lambda thunks: asked.append(1) or {n: 1.0 for n in thunks})
    plan = compile(Circuit(3, 2, 4, 2).all_pairs())
    t.executor(plan, "forward", 8, CPU, torch.float32)
    t.executor(plan, "forward", 8, CPU, torch.float32)
    assert len(asked) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        t.executor(plan, "forward", 8, CPU, torch.float32)
        assert len(asked) == 2                   # another thread count: decided again
    finally:
        torch.set_num_threads(threads)
    t.executor(plan, "forward", 8, CPU, torch.float32)
    assert len(asked) == 2
    real = tuning.switches()
    monkeypatch.setattr(tuning, "switches", lambda: (not real[0], False))
    t.executor(plan, "forward", 8, CPU, torch.float32)
    assert len(asked) == 3                       # other kernel switches: decided again
    keys = {Tuning.disk_key(Tuning.key(plan, "forward", 8, CPU, torch.float32))}
    monkeypatch.setattr(tuning, "switches", lambda: real)
    keys.add(Tuning.disk_key(Tuning.key(plan, "forward", 8, CPU, torch.float32)))
    assert len(keys) == 2 and all(f"threads={threads}" in k and torch.__version__ in k
                                  for k in keys)


def test_reset_is_one_call_and_reads_the_environment(empty_cache, monkeypatch):
    plan = compile(Circuit(3, 2, 4, 2).all_pairs())
    plan.warm_up(8)
    assert tuning.default().decisions()
    monkeypatch.setenv("QCIRCUIT_TUNE", "0")
    fresh = tuning.reset()
    assert fresh is tuning.default() and not fresh.decisions() and not fresh.measure
    assert plan.decision(8).how in ("model", "only")


def test_the_schedule_route_saves_its_buffers_through_saved_tensor_hooks():
    """Under saved-tensor hooks (non-reentrant checkpointing, offloading) every buffer the
    backward needs is handed to the hooks, so checkpointing can free it."""
    c = Circuit(16, 16, 8).all_pairs()   # no two gates fuse (blocks over 512): three steps
    m = compile(c).module(seed=0, dtype=torch.float64, route="schedule", tuning=Tuning(None))
    x = torch.randn(64, c.in_features, dtype=torch.float64, requires_grad=True)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t.clone(),
                                                  lambda t: t):
        y = m(x)
    big = [n for n in sizes if n >= x.numel()]
    assert len(big) >= 2, sizes                  # x and the steps' inputs, not x alone
    gy = torch.randn_like(y)
    y.backward(gy)
    t = circuit_operator(c, m.gates)
    assert_close(y, x @ t.T)
    assert_close(x.grad, gy @ t)
