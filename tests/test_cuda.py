"""On CUDA: compiled circuits (every route, the measured choice) and adapted models, against
float64 dense references built on the CPU from explicit gate matrices.

Skipped where torch sees no CUDA device. ``QCIRCUIT_TEST_DEVICE=cpu`` runs the same checks
on the CPU (to check the checks on a machine without a GPU; the paper circuit's references
then take minutes). The model checks need ``transformers`` and skip without it, so the
compiler checks run on an image that has only torch, opt_einsum, networkx and lark.

Cost on one H200 (first CUDA use and ``torch.compile`` included): see the ``--durations``
of ``benchmarks/device_check.sh``; the compile check is the longest single test.
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from qcircuit import ApplyRule, Circuit, Pattern, Program, QCError
from qcircuit.compiler import Tuning, choice, compile, routes, triton_route, tuning
from reference import circuit_operator, rel_err, tolerance
from reference import torch_operator as operator

DEVICE = os.environ.get("QCIRCUIT_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

SQUARE = Circuit(4, 4, 4).all_pairs()                              # 64 -> 64
UP = Circuit(4, 4, 4).gate((0, 1)).gate((1, 2), out=(4, 43))       # 64 -> 688
DOWN = Circuit(4, 43).gate((0, 1), out=(4, 16)).gate(1)            # 172 -> 64
PAPER = Circuit(16, 8, 8, 4).all_pairs()                           # 4096 -> 4096, 6 gates
SMALL = Circuit(2, 3, 2).gate((2, 0)).gate((0, 1), out=(3, 2)).gate((1, 2))   # gradcheck
CIRCUITS = {"square": SQUARE, "up": UP, "down": DOWN, "paper": PAPER}
TOKENS = (1, 7, 512, 4096)
DTYPES = (torch.float32, torch.float64)
EPS32 = torch.finfo(torch.float32).eps
EPS_BF16 = torch.finfo(torch.bfloat16).eps


# ----------------------------------------------------------------------------- references
@functools.cache
def case(name: str):
    """(circuit, plan, gates, T): float64 CPU gates holding float32 values (so one reference
    serves both dtypes) and their operator, multiplied out on the CPU in float64."""
    circuit = CIRCUITS[name]
    plan = compile(circuit)
    gates = [g.detach().float().double() for g in plan.module(seed=0, dtype=torch.float64).gates]
    with torch.no_grad():
        t = operator(circuit, gates)
    return circuit, plan, gates, t


@functools.cache
def inputs(name: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (tokens, in) and the output gradient gy (tokens, out): float64 holding float32 values."""
    circuit = CIRCUITS[name]
    gen = torch.Generator().manual_seed(tokens)
    return (torch.randn(tokens, circuit.in_features, generator=gen).double(),
            torch.randn(tokens, circuit.out_features, generator=gen).double())


@functools.cache
def gate_grads(name: str, tokens: int) -> tuple[torch.Tensor, ...]:
    """d sum(gy · x Tᵀ) / d gates, in float64 on the CPU: autograd through ``operator``."""
    circuit, _, gates, _ = case(name)
    x, gy = inputs(name, tokens)
    leaves = [g.clone().requires_grad_() for g in gates]
    return torch.autograd.grad(operator(circuit, leaves), leaves, grad_outputs=gy.T @ x)


def bound(dtype: torch.dtype, circuit: Circuit) -> float:
    """Normwise bound: the longest sum of one contraction step is a gate's input size times
    the dims it carries along (at most the features)."""
    return tolerance(dtype, terms=max(circuit.in_features, circuit.out_features))


def grad_bound(dtype: torch.dtype, circuit: Circuit, tokens: int) -> float:
    """A gate's gradient also sums over the tokens."""
    return tolerance(dtype, terms=max(circuit.in_features, circuit.out_features, tokens))


def on(t: torch.Tensor, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    """A fresh copy on the device (never the cached reference tensor itself)."""
    return t.to(DEVICE, dtype, copy=True).requires_grad_(grad)


# ----------------------------------------------------------------------------- compiler
def test_explicit_reference_agrees_with_the_numpy_one():
    for circuit in (SQUARE, DOWN, SMALL, Circuit(3, 2, 4).gate((2, 0), out=(2, 5)).gate((1, 0))):
        gates = [torch.randn(g.shape, dtype=torch.float64) for g in circuit.gates]
        assert rel_err(operator(circuit, gates), circuit_operator(circuit, gates)) < 1e-13


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("name", CIRCUITS)
def test_module_forward_and_gradients(name, tokens, dtype):
    """``plan.module()`` on the device, the route chosen for the bucket; gradients to the
    input and every gate (for the paper circuit at 512 tokens only: its gate reference is
    1.4 TFLOP of CPU work per token count)."""
    circuit, plan, gates, t = case(name)
    x64, gy64 = inputs(name, tokens)
    m = plan.module(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        for p, g in zip(m.gates, gates):
            p.copy_(g)
    x = on(x64, dtype, grad=True)
    y = m(x)
    assert y.device.type == DEVICE and y.dtype == dtype
    tol = bound(dtype, circuit)
    assert rel_err(y, x64 @ t.T) <= tol
    (y * on(gy64, dtype)).sum().backward()
    assert rel_err(x.grad, gy64 @ t) <= tol
    if name != "paper" or tokens == 512:
        for k, (p, want) in enumerate(zip(m.gates, gate_grads(name, tokens))):
            err = rel_err(p.grad, want)
            assert err <= grad_bound(dtype, circuit, tokens), (k, err)
    assert rel_err(m.matrix(), t) <= tol


def named_run(plan, kind: str, route: str, bucket, dtype):
    """The executor of one named route on the device."""
    d = Tuning(None).named(plan, kind, route, bucket, torch.device(DEVICE), dtype)
    return choice.build(plan, d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["square", "up", "paper"])
@pytest.mark.parametrize("kind", routes.KINDS)
def test_every_route_forced_on_the_device(kind, name, dtype):
    """Each route the planner has on this device, named (``Tuning.named``): forward at 300
    tokens of bucket 512 with gradients; the dense matrix, with gradients where the route
    records them (the light cone is forward only)."""
    circuit, plan, gates, t = case(name)
    names = [r.name for r in routes.routes_for(kind, DEVICE)]
    triton = ["triton"] if triton_route.offered_on(DEVICE) else []
    assert names == (["einsum", "schedule"] if kind == "forward"
                     else ["einsum", "schedule", "lightcone"]) + triton
    tol = bound(dtype, circuit)
    x64, gy64 = inputs(name, 300)
    for route in names:
        try:
            run = named_run(plan, kind, route, 512 if kind == "forward" else None, dtype)
        except QCError:   # the stated rule: float64 halves the triton route's budget; the
            # paper circuit's float32 backward needs more shared memory than an H100 has
            assert route == "triton" and (dtype == torch.float64 or name == "paper"), route
            continue
        g = [on(gt, dtype, grad=True) for gt in gates]
        if kind == "forward":
            x = on(x64, dtype, grad=True)
            y = run(x, g)
            assert rel_err(y, x64 @ t.T) <= tol, route
            (y * on(gy64, dtype)).sum().backward()
            assert rel_err(x.grad, gy64 @ t) <= tol, route
            grads = gate_grads(name, 300) if name != "paper" else ()
        else:
            with torch.no_grad():
                assert rel_err(run(g), t) <= tol, route
            if route == "lightcone":
                continue
            gt = torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            (run(g) * on(gt, dtype)).sum().backward()
            leaves = [c.clone().requires_grad_() for c in gates]
            grads = torch.autograd.grad(operator(circuit, leaves), leaves, grad_outputs=gt) \
                if name != "paper" else ()
        for k, want in enumerate(grads):
            assert rel_err(g[k].grad, want) <= grad_bound(dtype, circuit, 300), (route, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["square", "down", "paper"])
def test_measured_choice_on_the_device(name, dtype):
    """``plan.warm_up(device=...)`` times the candidates on the device: the winner is the
    fastest measured one, and the module then runs it exactly."""
    circuit, plan, gates, t = case(name)
    plan.warm_up(*TOKENS, device=DEVICE, dtype=dtype)
    rps = [plan.decision(n, DEVICE, dtype) for n in TOKENS]
    rps += [tuning.default().decision(plan, "dense", None, torch.device(DEVICE), d)
            for d in (dtype, torch.float64)]
    for rp in rps:
        assert rp.device_type == DEVICE and rp.how in ("measured", "wisdom", "only"), rp.explain()
        if rp.how == "measured":
            timed = {c.route: c.measured for c in rp.candidates if c.measured is not None}
            assert timed and all(v > 0 for v in timed.values()), rp.explain()
            assert rp.route == min(timed, key=timed.__getitem__), rp.explain()
    m = plan.module(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        for p, g in zip(m.gates, gates):
            p.copy_(g)
        for n in TOKENS:
            x64, _ = inputs(name, n)
            assert rel_err(m(on(x64, dtype)), x64 @ t.T) <= bound(dtype, circuit), n
        assert rel_err(m.matrix(), t) <= bound(dtype, circuit)


def test_gradcheck_on_the_device():
    plan = compile(SMALL)
    gen = torch.Generator().manual_seed(0)
    gates = tuple(torch.randn(g.shape, generator=gen, dtype=torch.float64).to(DEVICE)
                  .requires_grad_() for g in SMALL.gates)
    x = torch.randn(3, SMALL.in_features, generator=gen, dtype=torch.float64).to(DEVICE) \
        .requires_grad_()
    for route in ("einsum", "schedule") + (("triton",) if triton_route.offered_on(DEVICE) else ()):
        run = named_run(plan, "forward", route, 4, torch.float64)
        assert torch.autograd.gradcheck(lambda x, *g: run(x, g), (x, *gates)), route
        run = named_run(plan, "dense", route, None, torch.float64)
        assert torch.autograd.gradcheck(lambda *g: run(g), gates), route
    m = plan.module(dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x, *g: torch.func.functional_call(
        m, {f"gates.{i}": gi for i, gi in enumerate(g)}, (x,)), (x, *gates))


@pytest.mark.parametrize("tokens", (512, 2048, 8192))
def test_triton_route_at_the_paper_shape_in_bfloat16(tokens):
    """The fused kernels natively: bfloat16 activations, float32 gates, the paper circuit;
    forward and input gradient against ``x64 @ Tᵀ`` / ``gy64 @ T``, gate gradients against
    the one-expression route in float64 (itself checked against dense references above)."""
    if not triton_route.offered_on(DEVICE):
        pytest.skip("the triton route is offered on CUDA with Triton installed")
    circuit, plan, gates, t = case("paper")
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, circuit.in_features, generator=gen).to(DEVICE, torch.bfloat16)
    gy = torch.randn(tokens, circuit.out_features, generator=gen).to(DEVICE, torch.bfloat16)
    run = named_run(plan, "forward", "triton", tokens, torch.bfloat16)
    g32 = [on(g, torch.float32, grad=True) for g in gates]
    y = run(x.requires_grad_(), g32)
    y.backward(gy)
    x64, gy64, t64 = x.detach().double(), gy.double(), t.to(DEVICE)
    assert y.dtype == x.grad.dtype == torch.bfloat16
    assert rel_err(y, x64 @ t64.T) <= 4 * EPS_BF16
    assert rel_err(x.grad, gy64 @ t64) <= 4 * EPS_BF16
    ref = named_run(plan, "forward", "einsum", tokens, torch.float64)
    g64 = [on(g, torch.float64, grad=True) for g in gates]
    ref(x64, g64).backward(gy64)
    for k, (g, want) in enumerate(zip(g32, g64)):
        assert g.grad.dtype == torch.float32
        assert rel_err(g.grad, want.grad) <= 4 * EPS_BF16, k


def test_triton_route_replays_in_a_cuda_graph():
    """The rule for CUDA graphs: the route launches no host synchronisation and allocates
    through torch's caching allocator, so a warmed-up training step (plans decided, kernels
    compiled) captures and replays; the replay equals an eager step."""
    if not triton_route.offered_on(DEVICE):
        pytest.skip("the triton route is offered on CUDA with Triton installed")
    circuit, plan, gates, t = case("paper")
    run = named_run(plan, "forward", "triton", 16, torch.bfloat16)
    x = torch.randn(16, circuit.in_features, device=DEVICE, dtype=torch.bfloat16)
    g32 = [on(g, torch.float32, grad=True) for g in gates]

    def step():
        for g in g32:
            g.grad = None
        run(x, g32).float().square().sum().backward()
        return [g.grad for g in g32]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [g.clone() for g in step()]         # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    fresh = [g.clone() for g in step()]
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(captured, fresh))
    assert not all(torch.equal(a, b) for a, b in zip(eager, fresh))


# ----------------------------------------------------------------------------- runtime
def program(init: str = "freeze_one") -> Program:
    """Square circuit on q/v_proj, non-square ones on up_proj (64 -> 172) and down_proj."""
    up = Circuit(4, 4, 4).gate((0, 1)).gate((1, 2), out=(1, 43))
    rules = {"attn": (SQUARE, ("q_proj", "v_proj")), "up": (up, ("up_proj",)),
             "down": (DOWN, ("down_proj",))}
    return Program({k: c for k, (c, _) in rules.items()},
                   tuple(ApplyRule(k, tuple(Pattern(p) for p in pats))
                         for k, (_, pats) in rules.items()), {"init": init})


@pytest.fixture
def llama(request):
    """A function making the tiny LLaMA of conftest (same weights each call) on the device."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    config = request.getfixturevalue("tiny_llama_config")

    def make(dtype: torch.dtype = torch.float32):
        torch.manual_seed(1)
        return LlamaForCausalLM(config).eval().to(DEVICE, dtype)
    return make


@pytest.fixture
def ids(token_ids):
    return token_ids.to(DEVICE)


def perturb(adapted, amount: float = 0.05, seed: int = 7) -> None:
    """Move every trainable gate, as training would (drawn on the CPU, moved)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_((amount * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p))


def weights64(model) -> dict[str, torch.Tensor]:
    """Every Linear's weight, float64 on the CPU, by module name."""
    return {n: m.weight.detach().double().cpu() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def layer_ops(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_θ, T_θ0) of a layer from its gates, float64 on the CPU."""
    cpu = (lambda gs: [g.detach().double().cpu() for g in gs])
    return operator(layer.circuit, cpu(layer.adapter.gates)), \
        operator(layer.circuit, cpu(layer.frozen.gates))


@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_attach_keeps_the_outputs_at_init(llama, ids, init):
    from qcircuit.runtime import LayerState, attach
    model = llama()
    with torch.no_grad():
        before = model(ids).logits
    adapted = attach(model, program(init), seed=0, fold=False)
    assert all(p.device.type == DEVICE and p.dtype == torch.float32
               for p in adapted.trainable_parameters())
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, before)   # the delta is exactly zero
    model = llama()
    w0 = weights64(model)
    adapted = attach(model, program(init), seed=0)        # folded where it can
    want = LayerState.FOLDED if init == "freeze_one" else LayerState.UNFOLDED
    assert set(adapted.states.values()) == {want}
    with torch.no_grad():
        after = adapted(ids).logits
    if init == "zero_last":
        assert torch.equal(after, before)
        return
    amplification = max(abs(layer.scale) * torch.linalg.norm(layer_ops(layer)[1]).item()
                        / torch.linalg.norm(w0[name]).item() for name, layer in adapted.layers.items())
    assert rel_err(after, before) <= 64 * EPS32 * max(1.0, amplification)


def test_fold_unfold_merge_unmerge_on_the_device(llama, ids):
    """Each move writes ``W0 + offset`` rounded once (normwise within float32's eps of the
    float64 value); outputs agree across states."""
    from qcircuit.runtime import LayerState, attach
    model = llama()
    w0 = weights64(model)
    adapted = attach(model, program(), seed=1, fold=False)
    perturb(adapted)
    ops = {name: layer_ops(layer) for name, layer in adapted.layers.items()}

    def weights_hold(offset, eps):
        """Every weight within ``eps`` of ``W0 + offset`` (normwise), ``eps`` relative to the
        largest of ``‖W0‖`` and ``‖s·T_θ0‖`` it was computed through."""
        for name, layer in adapted.layers.items():
            t, t0 = ops[name]
            want = w0[name] + offset(layer.scale, t, t0)
            got = layer.base_layer.weight.detach().double().cpu()
            size = max(torch.linalg.norm(w0[name]), abs(layer.scale) * torch.linalg.norm(t0))
            err = torch.linalg.norm(got - want) / size
            assert err <= eps, (name, err.item())

    folded = (lambda s, t, t0: -s * t0)
    merged = (lambda s, t, t0: s * (t - t0))
    with torch.no_grad():
        ref = adapted(ids).logits
        adapted.fold()
        assert set(adapted.states.values()) == {LayerState.FOLDED}
        weights_hold(folded, EPS32)          # one rounding of W0 - s·T0
        assert rel_err(adapted(ids).logits, ref) < 1e-5
        adapted.merge()
        weights_hold(merged, 2 * EPS32)      # W0 + s·(T - T0) from the folded weight
        assert rel_err(adapted(ids).logits, ref) < 1e-5
        adapted.unmerge()
        assert set(adapted.states.values()) == {LayerState.FOLDED}
        weights_hold(folded, 3 * EPS32)
        adapted.unfold()
        weights_hold(lambda s, t, t0: 0.0, 4 * EPS32)
        assert rel_err(adapted(ids).logits, ref) < 1e-5


def test_bfloat16_model_with_float32_gates(llama, ids):
    from qcircuit.runtime import attach
    model = llama(torch.bfloat16)
    w0 = weights64(model)
    with torch.no_grad():
        before = model(ids).logits
    adapted = attach(model, program(), seed=0, fold=False)
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE
               for p in adapted.trainable_parameters())
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, before)
    perturb(adapted)
    model.train()
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in adapted.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all())
               and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    model.eval()
    with torch.no_grad():
        unfolded = adapted(ids).logits
        adapted.merge()
        for name, layer in adapted.layers.items():
            t, t0 = layer_ops(layer)
            want = w0[name] + layer.scale * (t - t0)
            got = layer.base_layer.weight
            assert got.dtype == torch.bfloat16
            assert rel_err(got, want) <= EPS_BF16 / 2, name   # one rounding to bfloat16
        assert rel_err(adapted(ids).logits, unfolded) < 8 * EPS_BF16


def test_save_and_load_round_trip_from_the_device(llama, ids, tmp_path):
    from qcircuit.runtime import attach, load
    adapted = attach(llama(), program(), seed=0)
    perturb(adapted)
    adapted.save(tmp_path / "ckpt")
    with torch.no_grad():
        want = adapted(ids).logits
    restored = load(llama(), tmp_path / "ckpt")
    assert restored.states == adapted.states
    for a, b in zip(adapted.trainable_parameters(), restored.trainable_parameters()):
        assert b.device.type == DEVICE and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, want)
    model_cpu = llama().to("cpu")   # the checkpoint is the same on another device
    on_cpu = load(model_cpu, tmp_path / "ckpt")
    with torch.no_grad():
        assert rel_err(on_cpu(ids.cpu()).logits, want) < 1e-5


def test_torch_compile_of_an_adapted_model_on_the_device(llama):
    """Two training steps (one shape, one compilation), compiled against eager."""
    from qcircuit.runtime import attach
    runs = []
    for compiled in (False, True):
        model = llama()
        adapted = attach(model, program(), seed=0)
        model.train()
        step = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.2)
        losses = []
        for seed in (0, 1):
            x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
            loss = step(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in adapted.trainable_parameters()]))
    (eager_losses, eager_gates), (losses, gates) = runs
    assert rel_err(torch.tensor(losses), torch.tensor(eager_losses)) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(gates, eager_gates))
