"""The ``triton`` route: a circuit as fused Triton kernels (forward, backward, dense matrix).

Route interface (what the routes registry calls):

* :func:`runs_on` / :func:`offered_on` — where it can run (CUDA with Triton installed; the
  CPU only in Triton's interpreter, for tests) and where the measured choice considers it
  (CUDA only);
* :func:`unsupported` — ``None`` or why a circuit cannot run here (``triton_plan``'s rule:
  a gate whose matrix, dims padded to powers of two, exceeds 128×128 entries, such as a
  ``low_rank`` branch on a whole layer, or one touching 8+ qudits); those circuits, and
  any call ``search`` refuses, run on the other routes;
* :func:`search` / :func:`build` — the forward ``run(x2d, gates) -> y2d`` for a token
  bucket: a ``torch.autograd.Function`` with gradients for the input and every gate;
* :func:`dense_search` / :func:`dense_build` — ``run(gates) -> T``: the transposed
  circuit applied to the identity (generated in the kernel), rows of ``T`` in order.

Precision: activations float32, bfloat16, float16 (or float64); gates load as float32
(float64 for float64 runs); every product accumulates in float32 (float64), and the output
takes the activation's dtype. 16-bit runs round each product's operands to the 16-bit type
and keep the states between passes in it, as autocast and a 16-bit einsum would; float32
runs are float32-grade where they fit (see :func:`_precisions`). The activation dtype may differ from the gates': the
module and the layer hand 16-bit activations over uncast where :func:`takes` says so.

Backward: gradients need each pass's input; the forward saves only ``x`` and the gates,
the backward recomputes the states at its pass boundaries (transient buffers), then runs
its passes in reverse. Without gate gradients (a frozen circuit) the backward is the
transposed circuit's forward.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from qcircuit.errors import QCError
from qcircuit.ir import Circuit

from . import triton_plan as tp
from .lowered import Lowered as Plan

try:   # Triton is optional: without it the route runs nowhere
    from . import triton_kernels
except ImportError:
    triton_kernels = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HALF = (torch.bfloat16, torch.float16)
CUDA_PROGRAMS_PER_SM = 4     # persistent backward programs per multiprocessor
INTERPRETER_PROGRAMS = 2     # in the interpreter: few, so that each loops over tiles
BUDGET_SCALES = (1.0, 0.75, 0.5)   # on-chip budgets tried, largest first (see search)


def available() -> bool:
    """Whether Triton is installed (the package works without it)."""
    return triton_kernels is not None


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they
    were imported)."""
    return triton_kernels.INTERPRETED if triton_kernels is not None else \
        os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device_type: str) -> bool:
    """CUDA with Triton installed; the CPU only in the interpreter (tests)."""
    if not available():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreted())


def offered_on(device_type: str) -> bool:
    """Whether the automatic, measured choice considers this route: on CUDA only."""
    return device_type == "cuda" and runs_on("cuda")


@functools.lru_cache(maxsize=256)
def unsupported(circuit: Circuit) -> str | None:
    """``None`` when the route can run ``circuit``, else the reason (see the module doc)."""
    return tp.unsupported(circuit)


@dataclass(frozen=True)
class TritonSteps:
    """What runs: dtype names, the product precision, the passes of the forward, of the
    backward (with their recomputed inputs) and of the transposed circuit."""

    dtype: str
    acc: str
    inter: str
    precision: str
    forward: tuple[tp.Pass, ...]
    backward: tuple[tp.Pass, ...]
    recompute: tuple[tp.Pass, ...]
    adjoint: tuple[tp.Pass, ...]
    programs: int

    def describe(self) -> str:
        """One line per kind of pass: gates per pass, tokens per tile."""
        part = (lambda ps: " | ".join(f"{list(p.gates)}x{p.tokens}t" for p in ps) or "-")
        return (f"{self.dtype} (acc {self.acc}, {self.precision}): forward {part(self.forward)}; "
                f"backward {part(self.backward)}; transposed {part(self.adjoint)}")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check(plan: Plan, dtype: torch.dtype) -> None:
    if not available():
        raise QCError("the triton route needs Triton (pip install 'qcircuit[gpu]')")
    if dtype not in DTYPES:
        raise QCError(f"the triton route takes {', '.join(map(_name, DTYPES))}; got {dtype}")
    reason = unsupported(plan.circuit)
    if reason is not None:
        raise QCError(f"the triton route cannot run this circuit: {reason}")


def _programs() -> int:
    if interpreted() or not torch.cuda.is_available():
        return INTERPRETER_PROGRAMS
    return CUDA_PROGRAMS_PER_SM * torch.cuda.get_device_properties(
        torch.cuda.current_device()).multi_processor_count


def _recompute(apps: Sequence[tp.App], dims: Sequence[int], backward: Sequence[tp.Pass],
               bucket: int, budget: int) -> tuple[tp.Pass, ...]:
    """Forward passes over the backward passes' gate groups but the last: they produce
    each backward pass's input."""
    out, dims = [], list(dims)
    by_gate = {a.gate: a for a in apps}
    for p in backward[:-1]:
        group = [by_gate[g] for g in p.gates]
        out.append(tp.plan_pass(group, dims, bucket, False, budget))
        for a in group:
            for q, o in zip(a.qudits, a.out_dims):
                dims[q] = o
    if any(p is None for p in out):
        raise QCError("the triton route: a backward group does not fit a forward tile")
    return tuple(out)


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """How products may multiply, most exact first (always accumulating in float32, float64
    for float64): 16-bit runs round both operands to the activation's 16-bit type (what
    autocast does; half the shared memory of TF32 operands, which the 128×128 gates'
    backward needs); float32 runs use TF32 where torch allows it, else six bfloat16 products
    (float32-grade) or, where those do not fit the device, three (about 16 bits); float64,
    and float32 in the interpreter, multiply in IEEE."""
    if dtype in HALF:
        return ("bf16",) if dtype == torch.bfloat16 else ("fp16",)
    if dtype == torch.float64 or interpreted():
        return ("ieee",)
    return ("tf32",) if torch.backends.cuda.matmul.allow_tf32 else ("bf16x6", "bf16x3")


def _plan(plan: Plan, bucket: int, dtype: torch.dtype, scale: float,
          precision: str) -> TritonSteps:
    """The passes at ``scale`` times the on-chip budgets (halved again for float64)."""
    c = plan.circuit
    apps = tp.applications(c)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale /= acc.itemsize // 4
    fwd, bwd = int(tp.FWD_BUDGET * scale), int(tp.BWD_BUDGET * scale)
    backward = tp.partition(apps, c.in_dims, bucket, True, bwd)
    return TritonSteps(
        _name(dtype), _name(acc), _name(dtype if dtype in HALF else acc), precision,
        tp.partition(apps, c.in_dims, bucket, False, fwd), backward,
        _recompute(apps, c.in_dims, backward, bucket, fwd),
        tp.partition(tp.adjoint(apps), c.out_dims, bucket, False, fwd), _programs())


def _probe(plan: Plan, steps: TritonSteps) -> bool:
    """On a GPU, whether every kernel of ``steps`` compiles within the device's resources
    (one token forward and backward, with and without gate gradients); the interpreter
    has no such limits."""
    if interpreted() or not torch.cuda.is_available():
        return True
    from triton.runtime.errors import OutOfResources
    dtype, device = _dtype(steps.dtype), torch.device("cuda", torch.cuda.current_device())
    run = build(plan, steps)
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast("cuda", enabled=False):
            x = torch.zeros(1, plan.in_features, dtype=dtype, device=device, requires_grad=True)
            gates = [torch.zeros(g.shape, dtype=_dtype(steps.acc), device=device)
                     for g in plan.circuit.gates]
            run(x, gates).sum().backward()
            run(x, [g.requires_grad_() for g in gates]).sum().backward()
    except OutOfResources:
        return False
    return True


def search(plan: Plan, bucket: int, dtype: torch.dtype, deadline: float) -> TritonSteps:
    """The passes for ``bucket`` tokens of ``dtype`` activations (plain data); ``QCError``
    where the route cannot run them. Planning is greedy and fast (``deadline`` is not
    needed); on a GPU the kernels are compiled once here, and the budgets shrink where
    they exceed the device (``BUDGET_SCALES``), then the product precision where one is
    less exact but smaller (:func:`_precisions`)."""
    _check(plan, dtype)
    for precision in _precisions(dtype):
        for scale in BUDGET_SCALES:
            try:
                steps = _plan(plan, bucket, dtype, scale, precision)
            except ValueError as exc:
                if scale == BUDGET_SCALES[0]:
                    raise QCError(f"the triton route cannot run this circuit: {exc}") from None
                break   # smaller budgets fit even less
            if _probe(plan, steps):
                return steps
    raise QCError("the triton route: its kernels exceed this GPU's shared memory")


def _passes(passes: Sequence[tp.Pass], x: torch.Tensor | None, gates: Sequence[torch.Tensor],
            n: int, out: torch.dtype, steps: TritonSteps,
            device: torch.device | None = None) -> torch.Tensor:
    """``passes`` in turn from ``x`` (``None``: the identity); the last stores ``out``."""
    k = triton_kernels
    for i, p in enumerate(passes):
        last = i == len(passes) - 1
        x = k.forward(p, x, gates, n, out if last else _dtype(steps.inter), _dtype(steps.acc),
                      steps.precision, device)
    return x


class _Circuit(torch.autograd.Function):
    """``y = T·x`` through the fused passes; backward through the kernels too."""

    @staticmethod
    def forward(ctx, steps: TritonSteps, x2d: torch.Tensor, *gates: torch.Tensor):
        x2d = x2d.contiguous()
        gates = tuple(g.contiguous() for g in gates)
        ctx.steps = steps
        ctx.save_for_backward(x2d, *gates)
        return _passes(steps.forward, x2d, gates, x2d.shape[0], x2d.dtype, steps)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        steps: TritonSteps = ctx.steps
        x2d, *gates = ctx.saved_tensors
        need_x, need_g = ctx.needs_input_grad[1], any(ctx.needs_input_grad[2:])
        gy = gy.contiguous()
        n = x2d.shape[0]
        if not need_g:
            gx = _passes(steps.adjoint, gy, gates, n, x2d.dtype, steps) if need_x else None
            return (None, gx, *[None] * len(gates))
        k, acc, inter = triton_kernels, _dtype(steps.acc), _dtype(steps.inter)
        states = [x2d]
        for p in steps.recompute:
            states.append(k.forward(p, states[-1], gates, n, inter, acc, steps.precision))
        grads: list[torch.Tensor | None] = [None] * len(gates)
        c = gy
        for i in reversed(range(len(steps.backward))):
            p = steps.backward[i]
            gx_dtype = inter if i else (x2d.dtype if need_x else None)
            c, flat = k.backward(p, states[i], c, gates, gx_dtype, acc, steps.precision,
                                 steps.programs)
            states[i] = None
            for g, f in zip(p.gates, flat):
                grads[g] = f.view(gates[g].shape).to(gates[g].dtype)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (None, c, *grads)


def build(plan: Plan, steps: TritonSteps) -> Callable:
    """``run(x2d, gates) -> y2d``, differentiable in ``x2d`` and every gate."""
    def run(x2d: torch.Tensor, gates: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(gates) != len(plan.circuit.gates):
            raise QCError(f"the circuit has {len(plan.circuit.gates)} gates, got {len(gates)}")
        return _Circuit.apply(steps, x2d, *gates)
    return run


def dense_search(plan: Plan, dtype: torch.dtype, deadline: float) -> TritonSteps:
    """The transposed circuit's passes over ``out_features`` rows of the identity."""
    _check(plan, dtype)
    c = plan.circuit
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for scale in BUDGET_SCALES:
        budget = int(tp.FWD_BUDGET * scale / (acc.itemsize // 4))
        try:
            adj = tp.partition(tp.adjoint(tp.applications(c)), c.out_dims, plan.out_features,
                               False, budget)
        except ValueError as exc:
            raise QCError(f"the triton route cannot run this circuit: {exc}") from None
        steps = TritonSteps(_name(dtype), _name(acc), _name(acc), _precisions(dtype)[-1], (),
                            (), (), adj, 0)
        if interpreted() or not torch.cuda.is_available() or _dense_probe(plan, steps):
            return steps
    raise QCError("the triton route: its kernels exceed this GPU's shared memory")


def _dense_probe(plan: Plan, steps: TritonSteps) -> bool:
    from triton.runtime.errors import OutOfResources
    gates = [torch.zeros(g.shape, dtype=_dtype(steps.dtype), device="cuda")
             for g in plan.circuit.gates]
    try:
        dense_build(plan, steps)(gates)
    except OutOfResources:
        return False
    return True


def dense_build(plan: Plan, steps: TritonSteps) -> Callable:
    """``run(gates) -> T`` (out_features, in_features) in the gates' dtype, forward only:
    row ``i`` of ``T`` is ``Tᵀ`` applied to the unit vector ``e_i``. Accumulation in
    float64 for float64 gates (what merging and folding use), else float32: normwise error
    then within a few float32 roundings per gate of the float64 matrix."""
    def run(gates: Sequence[torch.Tensor]) -> torch.Tensor:
        gates = [g.detach().contiguous() for g in gates]
        return _passes(steps.adjoint, None, gates, plan.out_features, gates[0].dtype, steps,
                       gates[0].device)
    return run
