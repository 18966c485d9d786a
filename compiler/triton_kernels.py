"""Triton kernels of the ``triton`` route: one fused pass of gates over tiles of tokens.

Imported only where Triton is (``triton_route`` guards it). A pass (``triton_plan.Pass``)
reaches the kernels as compile-time constants: tile axes, the register permute before each
gate, product sides, gate row and column axes. Kernels:

``pass_forward``   load a tile (any float dtype, or the identity for the dense matrix),
                   apply the pass's gates on-chip, store in the output's dtype
``pass_backward``  per tile: recompute the states inside the pass from its input, sweep the
                   cotangent back through the transposed gates while accumulating each
                   gate's gradient ``Σ cotangent ⊗ state``, store the input's cotangent; a
                   program loops over tiles and stores its gradient sums once (summed by
                   the caller, so the result does not depend on scheduling)

Accumulation is in ``ACC`` (float32, or float64 for float64 runs); gates load as ``ACC``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .triton_plan import Axes, Pass

#: whether these kernels run in Triton's interpreter (read when the kernels were defined)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the interpreter multiplies 16-bit dot operands wrongly (triton 3.8): there the operands
# are rounded to 16 bits and multiplied in float32, which gives the same products
_ROUNDED_IN_FP32 = tl.constexpr(INTERPRETED)


@triton.jit
def _axis(i, stride, unit: tl.constexpr):
    return tl.reshape(i * stride, unit)


@triton.jit
def _tile(tok0, n, base, EXT: tl.constexpr, DIM: tl.constexpr, STRIDE: tl.constexpr,
          UNIT: tl.constexpr):
    """Offsets (int64) and mask of a tile whose axes are ``EXT``/``DIM``/``STRIDE`` (a
    ``DIM`` of 0 marks the token axis: tokens ``tok0 …`` of ``n``)."""
    offs = base
    mask = tl.full(UNIT[0], 1, tl.int1)
    for a in tl.static_range(len(EXT)):
        i = tl.arange(0, EXT[a])
        if DIM[a] == 0:
            t = tok0 + i
            offs = offs + tl.reshape(t.to(tl.int64) * STRIDE[a], UNIT[a])
            mask = mask & tl.reshape(t < n, UNIT[a])
        else:
            offs = offs + tl.reshape(i * STRIDE[a], UNIT[a])
            if EXT[a] != DIM[a]:
                mask = mask & tl.reshape(i < DIM[a], UNIT[a])
    return offs, tl.broadcast_to(mask, offs.shape)


@triton.jit
def _flat(EXT: tl.constexpr, DIM: tl.constexpr, STRIDE: tl.constexpr, UNIT: tl.constexpr,
          SIZE: tl.constexpr):
    """A gate side's offsets and mask, its axes flattened row-major into ``SIZE``."""
    offs, mask = _tile(0, 0, 0, EXT, DIM, STRIDE, UNIT)
    return tl.reshape(offs, (SIZE,)).to(tl.int32), tl.reshape(mask, (SIZE,))


@triton.jit
def _gate(g_ptr, R: tl.constexpr, C: tl.constexpr, RN: tl.constexpr, CN: tl.constexpr,
          ACC: tl.constexpr):
    """The padded ``(RN, CN)`` matrix of a gate (zeros in the padding); ``R`` and ``C``
    are its row and column axes (extents, dims, strides, unit shapes)."""
    r, rm = _flat(R[0], R[1], R[2], R[3], RN)
    c, cm = _flat(C[0], C[1], C[2], C[3], CN)
    m = rm[:, None] & cm[None, :]
    return tl.load(g_ptr + r[:, None] + c[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def _store_grad(part_ptr, acc, R: tl.constexpr, C: tl.constexpr, RN: tl.constexpr,
                CN: tl.constexpr):
    """Store a padded gradient ``(RN, CN)`` at the gate's own offsets (padding dropped)."""
    r, rm = _flat(R[0], R[1], R[2], R[3], RN)
    c, cm = _flat(C[0], C[1], C[2], C[3], CN)
    tl.store(part_ptr + r[:, None] + c[None, :], acc, mask=rm[:, None] & cm[None, :])


@triton.jit
def _mm(a, b, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """``a @ b``: a tensor-core dot (``PREC`` "bf16"/"fp16": operands rounded to that type
    first), or multiply-adds where a side is under 16."""
    if DOT:
        if PREC == "bf16" or PREC == "fp16":
            half = tl.bfloat16 if PREC == "bf16" else tl.float16
            if _ROUNDED_IN_FP32:
                out = tl.dot(a.to(half).to(ACC), b.to(half).to(ACC), out_dtype=ACC)
            else:
                out = tl.dot(a.to(half), b.to(half), out_dtype=ACC)
        else:
            out = tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
        return out
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _apply(s, g_ptr, PERM: tl.constexpr, PIN: tl.constexpr, POUT: tl.constexpr,
           N: tl.constexpr, SOUT: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
           DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """One gate on a register tile: permute its qudits first, multiply, reshape back."""
    g = _gate(g_ptr, R, C, POUT, PIN, ACC)
    s2 = tl.reshape(tl.permute(s, PERM), (PIN, N))
    return tl.reshape(_mm(g, s2, DOT, PREC, ACC), SOUT)


@triton.jit
def _outer(tile, blocks, TOK: tl.constexpr, OUTER: tl.constexpr, OIN: tl.constexpr,
           OOUT: tl.constexpr):
    """First token and the input and output base offsets of tile ``tile`` (``OUTER``: the
    outer qudits' dims, innermost first; ``OIN``/``OOUT``: their strides)."""
    tok0 = (tile // blocks) * TOK
    rem = tile % blocks
    base_in = (rem * 0).to(tl.int64)
    base_out = base_in
    for a in tl.static_range(len(OUTER)):   # innermost outer qudit first
        i = rem % OUTER[a]
        rem = rem // OUTER[a]
        base_in += i.to(tl.int64) * OIN[a]
        base_out += i.to(tl.int64) * OOUT[a]
    return tok0, base_in, base_out


@triton.jit
def pass_forward(x_ptr, y_ptr, gates, n, blocks,
                 TOK: tl.constexpr, OUTER: tl.constexpr, OIN: tl.constexpr, OOUT: tl.constexpr,
                 LOAD: tl.constexpr, STORE: tl.constexpr, G: tl.constexpr, PERM: tl.constexpr,
                 PIN: tl.constexpr, POUT: tl.constexpr, N: tl.constexpr, SOUT: tl.constexpr,
                 ROWS: tl.constexpr, COLS: tl.constexpr, DOT: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, IDENTITY: tl.constexpr):
    """``y = pass(x)`` on tile ``program_id``; ``IDENTITY``: ``x`` is the identity matrix."""
    tok0, base_in, base_out = _outer(tl.program_id(0), blocks, TOK, OUTER, OIN, OOUT)
    offs, mask = _tile(tok0, n, base_in, LOAD[0], LOAD[1], LOAD[2], LOAD[3])
    if IDENTITY:
        row = LOAD[2][0]
        s = tl.where(mask & (offs // row == offs % row), 1.0, 0.0).to(ACC)
    else:
        s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    for j in tl.static_range(len(G)):
        s = _apply(s, gates[G[j]], PERM[j], PIN[j], POUT[j], N[j], SOUT[j], ROWS[j], COLS[j],
                   DOT[j], PREC, ACC)
    offs, mask = _tile(tok0, n, base_out, STORE[0], STORE[1], STORE[2], STORE[3])
    tl.store(y_ptr + offs, s.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pass_backward(x_ptr, c_ptr, gx_ptr, part_ptr, gates, n, blocks, tiles,
                  TOK: tl.constexpr, OUTER: tl.constexpr, OIN: tl.constexpr,
                  OOUT: tl.constexpr, LOAD: tl.constexpr, STORE: tl.constexpr,
                  G: tl.constexpr, PERM: tl.constexpr, INV: tl.constexpr, PIN: tl.constexpr,
                  POUT: tl.constexpr, N: tl.constexpr, SIN: tl.constexpr, SOUT: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr, DOT: tl.constexpr,
                  GOFF: tl.constexpr, GSIZE: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, STORE_GX: tl.constexpr):
    """Gate gradients (partial sums per program, into ``part_ptr[pid]``) and the input's
    cotangent (``gx_ptr``, if ``STORE_GX``) of a pass, from its input ``x_ptr`` and its
    output's cotangent ``c_ptr``."""
    pid = tl.program_id(0)
    accs = ()
    for j in tl.static_range(len(G)):
        accs = accs + (tl.zeros((POUT[j], PIN[j]), ACC),)
    for tile in range(pid, tiles, tl.num_programs(0)):
        tok0, base_in, base_out = _outer(tile, blocks, TOK, OUTER, OIN, OOUT)
        offs, mask = _tile(tok0, n, base_in, LOAD[0], LOAD[1], LOAD[2], LOAD[3])
        s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        states = (s,)
        for j in tl.static_range(len(G) - 1):
            s = _apply(s, gates[G[j]], PERM[j], PIN[j], POUT[j], N[j], SOUT[j], ROWS[j],
                       COLS[j], DOT[j], PREC, ACC)
            states = states + (s,)
        o_offs, o_mask = _tile(tok0, n, base_out, STORE[0], STORE[1], STORE[2], STORE[3])
        c = tl.load(c_ptr + o_offs, mask=o_mask, other=0.0).to(ACC)
        for j in tl.static_range(len(G) - 1, -1, -1):
            c2 = tl.reshape(c, (POUT[j], N[j]))
            s2 = tl.reshape(tl.permute(states[j], PERM[j]), (PIN[j], N[j]))
            grad = _mm(c2, tl.trans(s2), DOT[j], PREC, ACC)
            accs = accs[:j] + (accs[j] + grad,) + accs[j + 1:]
            gt = _gate(gates[G[j]], COLS[j], ROWS[j], PIN[j], POUT[j], ACC)
            c = tl.permute(tl.reshape(_mm(gt, c2, DOT[j], PREC, ACC), SIN[j]), INV[j])
        if STORE_GX:
            tl.store(gx_ptr + offs, c.to(gx_ptr.dtype.element_ty), mask=mask)
    for j in tl.static_range(len(G)):
        _store_grad(part_ptr + pid.to(tl.int64) * GSIZE + GOFF[j], accs[j], ROWS[j], COLS[j],
                    POUT[j], PIN[j])

# ----------------------------------------------------------------------------- launches
def _axes(ax: Axes) -> tuple:
    return ax.ext, ax.dim, ax.stride, ax.unit


def _constants(p: Pass) -> dict:
    """A pass as the kernels' compile-time constants."""
    f = p.fused
    return dict(TOK=p.tokens, OUTER=p.outer[::-1], OIN=p.outer_in[::-1], OOUT=p.outer_out[::-1],
                LOAD=_axes(p.load), STORE=_axes(p.store), G=tuple(range(len(f))),
                PERM=tuple(g.perm for g in f), PIN=tuple(g.pin for g in f),
                POUT=tuple(g.pout for g in f), N=tuple(g.n for g in f),
                SOUT=tuple(g.shape_out for g in f), ROWS=tuple(_axes(g.rows) for g in f),
                COLS=tuple(_axes(g.cols) for g in f), DOT=tuple(g.dot for g in f))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward_constants(p: Pass, acc: torch.dtype, precision: str, identity: bool) -> dict:
    """``pass_forward``'s compile-time constants (and warps) for pass ``p``."""
    return dict(_constants(p), ACC=_acc(acc), PREC=precision, IDENTITY=identity,
                num_warps=p.warps)


def _offsets(p: Pass) -> tuple[int, ...]:
    sizes = [f.size for f in p.fused]
    return tuple(sum(sizes[:j]) for j in range(len(sizes)))


def backward_constants(p: Pass, acc: torch.dtype, precision: str, store_gx: bool) -> dict:
    """``pass_backward``'s compile-time constants (and warps) for pass ``p``."""
    f = p.fused
    return dict(_constants(p), INV=tuple(g.inv for g in f), SIN=tuple(g.shape_in for g in f),
                GOFF=_offsets(p), GSIZE=sum(g.size for g in f), ACC=_acc(acc), PREC=precision,
                STORE_GX=store_gx, num_warps=p.warps)


def forward(p: Pass, x: torch.Tensor | None, gates: Sequence[torch.Tensor], n: int,
            dtype: torch.dtype, acc: torch.dtype, precision: str,
            device: torch.device | None = None) -> torch.Tensor:
    """The pass on ``n`` rows of ``x`` (``None``: the identity, ``n`` rows of it) into a
    new ``(n, out_features)`` tensor of ``dtype``."""
    device = x.device if x is not None else device
    y = torch.empty(n, p.out_features, dtype=dtype, device=device)
    if n:
        pass_forward[(p.tiles(n),)](
            y if x is None else x, y, tuple(gates[g] for g in p.gates), n, p.blocks,
            **forward_constants(p, acc, precision, x is None))
    return y


def backward(p: Pass, x: torch.Tensor, c: torch.Tensor, gates: Sequence[torch.Tensor],
             gx_dtype: torch.dtype | None, acc: torch.dtype, precision: str,
             programs: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The input's cotangent (``None`` when ``gx_dtype`` is) and the flat gradients of the
    pass's gates, from its input ``x`` and its output's cotangent ``c``."""
    n = x.shape[0]
    tiles = p.tiles(n)
    progs = max(1, min(tiles, programs))
    sizes, offsets = [f.size for f in p.fused], _offsets(p)
    part = torch.empty(progs, sum(sizes), dtype=acc, device=x.device)
    gx = None if gx_dtype is None else torch.empty(n, p.in_features, dtype=gx_dtype,
                                                   device=x.device)
    if n:
        pass_backward[(progs,)](
            x, c, part if gx is None else gx, part, tuple(gates[g] for g in p.gates), n,
            p.blocks, tiles, **backward_constants(p, acc, precision, gx is not None))
    else:
        part.zero_()
    sums = part.sum(0)
    return gx, [sums[o:o + s] for o, s in zip(offsets, sizes)]
