"""Running a :class:`~qcircuit.compiler.schedule.Schedule`: step matrices, GEMM kernels and
the fused autograd function. Planning lives in ``schedule.py``, buffers in ``workspace.py``,
the dense matrix in ``dense.py``."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from qcircuit.errors import QCError

from . import costmodel as cm
from . import fused
from .kernels import permute_into
from .schedule import Schedule, Step
from .step_matrices import step_matrices
from .threads import serial
from .workspace import Release, Workspace


class Bound(NamedTuple):
    """A step with its sizes worked out for one token count (computed once, then cached)."""

    kind: str
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    numel_in: int
    numel_out: int
    p: int                      # rows before the block, block size in and out, rows after
    k: int
    k2: int
    s: int
    perm: tuple[int, ...]       # permute steps: forward and backward axis orders
    back: tuple[int, ...]
    mid: tuple[int, ...] = ()   # a "gather" step (permute + suffix gate): the permuted shape
    bmm_gram: bool = False      # see Step.bmm_gram


def _bind_step(step: Step, tokens: int) -> Bound:
    shape_in = tuple(tokens if d == -1 else d for d in step.shape_in)
    shape_out = tuple(tokens if d == -1 else d for d in step.shape_out)
    a, b = step.start, step.start + len(step.block)
    return Bound(step.kind, shape_in, shape_out, math.prod(shape_in), math.prod(shape_out),
                 math.prod(shape_in[:a]), math.prod(step.block_in), math.prod(step.block_out),
                 math.prod(shape_in[b:]),
                 tuple(step.layout_in.index(x) for x in step.layout_out),
                 tuple(step.layout_out.index(x) for x in step.layout_in), bmm_gram=step.bmm_gram)


class _ByIdentity:
    """A hot-path cache keyed by an object's identity plus a small key: a dict lookup instead
    of hashing a whole schedule or step tuple. Each entry holds its object, so the id cannot
    be reused while the entry lives."""

    def __init__(self, limit: int = 1024):
        self._entries: dict[tuple, tuple[object, object]] = {}
        self._limit = limit

    def get(self, obj: object, key, make: Callable[[], object]):
        hit = self._entries.get((id(obj), key))
        if hit is not None and hit[0] is obj:
            return hit[1]
        if len(self._entries) > self._limit:
            self._entries.clear()
        value = make()
        self._entries[(id(obj), key)] = (obj, value)
        return value


_bound = _ByIdentity()
_fused = _ByIdentity()
_small = _ByIdentity()


def bound_steps(schedule: Schedule, tokens: int) -> tuple[Bound, ...]:
    """The schedule's steps bound to ``tokens`` rows, cached per schedule and token count
    (the hot path then does no shape arithmetic)."""
    return _bound.get(schedule, tokens,
                      lambda: tuple(_bind_step(st, tokens) for st in schedule.steps))


def _fuse_gathers(bound: tuple[Bound, ...], itemsize: int) -> tuple[Bound, ...]:
    """Each permute followed by a suffix gate step becomes one "gather" step where the fused
    kernel takes it (:mod:`fused`): the permuted activation is never written out."""
    out: list[Bound] = []
    for b in bound:
        prev = out[-1] if out else None
        if (b.kind == "suffix" and prev is not None and prev.kind == "permute"
                and fused.fusable(prev.shape_in, prev.perm, prev.shape_out, prev.back, itemsize)):
            out[-1] = b._replace(kind="gather", shape_in=prev.shape_in, numel_in=prev.numel_in,
                                 perm=prev.perm, back=prev.back, mid=prev.shape_out)
        else:
            out.append(b)
    return tuple(out)


def fuse_gathers(bound: tuple[Bound, ...], x: Tensor) -> tuple[Bound, ...]:
    """:func:`_fuse_gathers` for float32/float64 CPU inputs with the kernel on; else ``bound``."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) \
            or not fused.available():
        return bound
    isz = x.element_size()
    return _fused.get(bound, isz, lambda: _fuse_gathers(bound, isz))


# ----------------------------------------------------------------------------- kernels
def _gemm(b: Bound, x: Tensor, m: Tensor, out: Tensor | None = None) -> Tensor:
    """A gate step's GEMM in its form; into the flat buffer ``out``, or (``out=None``) as an
    ordinary differentiable op that allocates its result."""
    p, k, k2, s = b.p, b.k, b.k2, b.s

    def into(*shape):
        return None if out is None else out.view(*shape)
    if b.kind in ("suffix", "gather"):  # a gather step's input, already permuted
        return torch.mm(x.view(p, k), m.t(), out=into(p, k2))
    if b.kind == "prefix":
        return torch.mm(m, x.view(k, s), out=into(k2, s))
    if b.kind == "rot_front":
        return torch.mm(m, x.view(p, k).t(), out=into(k2, p))
    if b.kind == "rot_back":
        return torch.mm(x.view(k, s).t(), m.t(), out=into(s, k2))
    return torch.matmul(m, x.view(p, k, s), out=into(p, k2, s))


def _apply(b: Bound, x: Tensor, m: Tensor, out: Tensor) -> None:
    """Forward of one step from contiguous ``x`` into the flat buffer ``out``."""
    if b.kind == "permute":
        permute_into(out.view(b.shape_out), x.view(b.shape_in), b.perm)
    elif b.kind == "gather":
        if not fused.gate_forward(out, x, m, b.shape_in, b.perm):
            mid = torch.empty(b.mid, dtype=x.dtype, device=x.device)
            permute_into(mid, x.view(b.shape_in), b.perm)
            torch.mm(mid.view(b.p, b.k), m.t(), out=out.view(b.p, b.k2))
    else:
        _gemm(b, x, m, out)


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for tall ``a`` (p×m) and ``b`` (p×n): one GEMM, or for narrow gates a batched
    product over row blocks plus a sum, where :func:`costmodel.gram_factor` says it is faster."""
    p, m = a.shape
    n = b.shape[1]
    blocks = max(2, torch.get_num_threads())
    if cm.gram_factor(max(m, n), p) >= 1.0 or p % blocks:
        return a.t() @ b
    return torch.bmm(a.view(blocks, p // blocks, m).transpose(1, 2),
                     b.view(blocks, p // blocks, n)).sum(0)


def _apply_back(b: Bound, x: Tensor, m: Tensor, gy: Tensor, gx: Tensor | None,
                need_m: bool, ws: Workspace) -> Tensor | None:
    """Backward of one step: returns ``grad_m`` (or None) and writes ``grad_x`` into ``gx``;
    scratch comes from ``ws``."""
    if b.kind == "permute":
        if gx is not None:
            permute_into(gx.view(b.shape_in), gy.view(b.shape_out), b.back)
        return None
    p, k, k2, s = b.p, b.k, b.k2, b.s
    gm = None
    if b.kind == "gather":
        gm = x.new_zeros(k2, k) if need_m else None
        if fused.gate_backward(x, gy, m, gx, gm, b.shape_in, b.perm, b.mid, b.back):
            return gm
        mid = torch.empty(b.mid, dtype=x.dtype, device=x.device)  # the unfused steps
        permute_into(mid, x.view(b.shape_in), b.perm)
        gm = _gram(gy.view(p, k2), mid.view(p, k)) if need_m else None
        if gx is not None:
            torch.mm(gy.view(p, k2), m, out=mid.view(p, k))
            permute_into(gx.view(b.shape_in), mid, b.back)
        return gm
    if b.kind == "suffix":
        if need_m:
            gm = _gram(gy.view(p, k2), x.view(p, k))
        if gx is not None:
            torch.mm(gy.view(p, k2), m, out=gx.view(p, k))
    elif b.kind == "prefix":
        if need_m:
            gm = gy.view(k2, s) @ x.view(k, s).t()
        if gx is not None:
            torch.mm(m.t(), gy.view(k2, s), out=gx.view(k, s))
    elif b.kind == "rot_front":
        if need_m:
            gm = gy.view(k2, p) @ x.view(p, k)
        if gx is not None:
            torch.mm(gy.view(k2, p).t(), m, out=gx.view(p, k))
    elif b.kind == "rot_back":
        if need_m:
            gm = gy.view(s, k2).t() @ x.view(k, s).t()
        if gx is not None:
            torch.mm(m.t(), gy.view(s, k2).t(), out=gx.view(k, s))
    else:
        if need_m:
            gy3, x3 = gy.view(p, k2, s), x.view(p, k, s)
            if b.bmm_gram:
                # per-batch products into a recycled buffer: a fresh one as large as the
                # activation would fault in its pages on every step (measured 2.7 vs 7 ms)
                parts = ws.take(p * k2 * k, x)
                gm = torch.bmm(gy3, x3.transpose(1, 2), out=parts.view(p, k2, k)).sum(0)
                ws.give(parts)
            else:
                gm = torch.tensordot(gy3, x3, dims=([0, 2], [0, 2]))
        if gx is not None:
            torch.matmul(m.t(), gy.view(p, k2, s), out=gx.view(p, k, s))
    return gm


def _forward(bound: Sequence[Bound], x: Tensor, mats, ws: Workspace, keep: bool):
    """Run the steps; with ``keep`` return every step's input for backward."""
    saved, cur, mi = [], x, 0
    for n, b in enumerate(bound):
        out = ws.take(b.numel_out, x)  # the last step's is the result: it leaves the pool for good
        m = None
        if b.kind != "permute":
            m, mi = mats[mi], mi + 1
        _apply(b, cur, m, out)
        if keep and b.kind != "permute":
            saved.append(cur)  # a gate step's backward needs its input; a permute's does not
        else:
            if keep:
                saved.append(None)
            if n > 0:
                ws.give(cur)
        cur = out
    return cur, saved


def _plain_forward(bound: Sequence[Bound], x: Tensor, mats) -> Tensor:
    """The same steps with ordinary (differentiable, allocating) ops: double backward."""
    cur, mi = x, 0
    for b in bound:
        if b.kind in ("permute", "gather"):
            cur = cur.view(b.shape_in).permute(b.perm).reshape(-1)
            if b.kind == "permute":
                continue
        cur, mi = _gemm(b, cur, mats[mi]).reshape(-1), mi + 1
    return cur


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _hooks_active() -> bool:
    """Whether saved-tensor hooks are installed (non-reentrant gradient checkpointing,
    activation offloading): then every tensor backward needs goes through
    ``save_for_backward``, so the hooks can drop or move it (where torch does not say, the
    hooks are assumed installed)."""
    return True if _top_hooks is None else _top_hooks(False) is not None


class _RunSchedule(torch.autograd.Function):
    """The whole circuit as one autograd node; backward is a loop of GEMMs in the same layouts,
    gradients ping-ponging between two workspace buffers.

    The steps' inputs that backward needs are kept on the node and go back to the workspace
    when the node is freed (:class:`Release`), except under saved-tensor hooks: then they
    are saved like any tensor, so checkpointing frees them after the forward and recomputes
    them for backward (they are not recycled then)."""

    @staticmethod
    def forward(ctx, bound, ws, x, *mats):
        with _threads(bound):
            y, saved = _forward(bound, x, mats, ws, keep=True)
        ctx.bound, ctx.ws, ctx.n_mats = bound, ws, len(mats)
        bufs = saved[1:]
        if _hooks_active():
            ctx.slots = [b is not None for b in bufs]
            ctx.saved = None
            ctx.save_for_backward(x, *mats, *[b for b in bufs if b is not None])
        else:
            ctx.saved = Release(ws, bufs)  # None where a permute step's input was freed
            ctx.save_for_backward(x, *mats)
        return y

    @staticmethod
    def _inputs(ctx) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """``x``, the step matrices and every step's saved input (None for permutes)."""
        x, *rest = ctx.saved_tensors
        mats, kept = rest[:ctx.n_mats], iter(rest[ctx.n_mats:])
        if ctx.saved is not None:
            return x, mats, ctx.saved.bufs
        return x, mats, [next(kept) if slot else None for slot in ctx.slots]

    @staticmethod
    def backward(ctx, gy):
        # unpacking may run a checkpointed segment's recomputation: outside the serial region
        # below, so that segment sees (and keys its decisions by) the caller's thread count
        x, mats, bufs = _RunSchedule._inputs(ctx)
        if torch.is_grad_enabled():  # create_graph: a differentiable backward, by recomputation
            with torch.enable_grad():
                y = _plain_forward(ctx.bound, x, mats)
                want = [t for t in (x, *mats) if t.requires_grad]
                got = iter(torch.autograd.grad(y, want, gy, create_graph=True, allow_unused=True))
            grads = [next(got) if t.requires_grad else None for t in (x, *mats)]
            return (None, None, *grads)
        with _threads(ctx.bound):
            return _RunSchedule._backward(ctx, gy, x, mats, bufs)

    @staticmethod
    def _backward(ctx, gy, x, mats, bufs):
        inputs = [x] + bufs
        bound, ws = ctx.bound, ctx.ws
        need_x = ctx.needs_input_grad[2]
        need_m = ctx.needs_input_grad[3:]
        gms: list = [None] * len(mats)
        g, owned = gy.contiguous(), False
        mi = len(mats)
        for n in range(len(bound) - 1, -1, -1):
            b = bound[n]
            m = None
            if b.kind != "permute":
                mi -= 1
                m = mats[mi]
            if n > 0:
                gx = ws.take(b.numel_in, x)
            else:  # grad_x leaves the pool for good: a free ping-pong buffer, not a new one
                gx = ws.take(x.numel(), x) if need_x else None
            gm = _apply_back(b, inputs[n], m, g, gx, m is not None and need_m[mi], ws)
            if gm is not None:
                gms[mi] = gm
            if owned:
                ws.give(g)
            g, owned = gx, n > 0
        gx0 = g.view(x.shape) if need_x else None
        return (None, None, gx0, *gms)


def _threads(bound: Sequence[Bound]):
    """One thread for a small schedule (:func:`costmodel.runs_serial`), else the caller's."""
    small = _small.get(bound, None, lambda: cm.runs_serial(
        max(max(b.numel_in, b.numel_out) for b in bound)))
    return serial() if small else contextlib.nullcontext()


def run_bound(bound: Sequence[Bound], x: Tensor, mats: Sequence[Tensor], ws: Workspace) -> Tensor:
    """Bound steps on the flat input ``x``: one autograd node when anything needs a gradient,
    else a plain forward that keeps nothing."""
    bound = fuse_gathers(tuple(bound), x)
    if torch.is_grad_enabled() and (x.requires_grad or any(m.requires_grad for m in mats)):
        return _RunSchedule.apply(bound, ws, x, *mats)
    with _threads(bound):
        return _forward(bound, x, mats, ws, keep=False)[0]


def run_schedule(schedule: Schedule, x2d: Tensor, gates: Sequence[Tensor],
                 workspace: Workspace | None = None) -> Tensor:
    """``y2d = T·x`` row by row: ``x2d`` is (tokens, in_features) -> (tokens, out_features).
    Computes in the gates' dtype; differentiable in ``x2d`` and every gate."""
    if schedule.dense:
        raise QCError("this schedule plans the dense matrix: use dense_matrix")
    if x2d.dim() != 2 or x2d.shape[1] != schedule.in_features:
        raise QCError(f"expected input of shape (tokens, {schedule.in_features}), got {tuple(x2d.shape)}")
    tokens = x2d.shape[0]
    ref = gates[0] if len(gates) else x2d
    x = x2d.to(ref.dtype).contiguous().reshape(-1)
    if not schedule.steps:
        return x2d.to(ref.dtype).clone()
    ws = workspace if workspace is not None else Workspace()
    y = run_bound(bound_steps(schedule, tokens), x, step_matrices(schedule, gates), ws)
    return y.view(tokens, schedule.out_features)
