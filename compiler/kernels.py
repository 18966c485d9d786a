"""Layout copies (a schedule's permutes) as generated kernels.

ATen copies a permuted view element by element along the output's innermost axis; with the
small qudit axes of a circuit (4, 8, 16 wide) that runs at a fraction of memory speed.
TorchInductor emits a tiled, vectorised transpose loop for the same copy: 2–4× faster at
512–2048 tokens on the development machine (benchmarks/adapter_speed.py measures the
schedules both ways). Each (shape, permutation, dtype) gets its own compiled kernel on first
use; when compiling fails (no C++ compiler, a backend inductor does not support) that kernel
falls back to the ATen copy for good, and the result is the same either way: a copy is exact.

Kernels are used for copies of at least ``MIN_NUMEL`` elements on the CPU, where they pay
for their compile time. ``QCIRCUIT_COMPILE=0`` in the environment switches them off. The
ATen copy that serves the rest moves a kept innermost run of 8 or 16 bytes (a 2- or 4-wide
innermost qudit in float32) as one int64/complex128 element (:func:`wide_run`).
"""
from __future__ import annotations

import functools
import math
import os
import types
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

MIN_NUMEL = 1 << 18          # smaller copies stay on ATen (compile time would not pay back)
_ATEN = "aten"               # marks a key whose kernel failed to compile
_kernels: dict[tuple, Callable | str] = {}


def _copy_permuted(src: Tensor, dst: Tensor, perm: tuple[int, ...]) -> None:
    dst.copy_(src.permute(perm))


# a kept innermost run of exactly this many bytes moves as one element of this dtype
_WIDE = {16: torch.complex128, 8: torch.int64}


def coalesce(shape: Sequence[int], perm: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same permuted copy on fewer axes: size-1 axes dropped, and input axes that stay
    adjacent and in order in the output merged (``(t, 16, 8, 8, 4)`` permuted ``(0, 1, 3, 2,
    4)`` is ``(t·16, 8, 8, 4)`` permuted ``(0, 2, 1, 3)``)."""
    live = [a for a in range(len(shape)) if shape[a] > 1]
    shape = [shape[a] for a in live]
    keep = [live.index(a) for a in perm if a in live]
    groups: list[list[int]] = []
    for a in keep:
        if groups and a == groups[-1][-1] + 1:
            groups[-1].append(a)
        else:
            groups.append([a])
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    sizes = [math.prod(shape[a] for a in groups[g]) for g in order]
    return tuple(sizes), tuple(order.index(g) for g in range(len(groups)))


@functools.lru_cache(maxsize=4096)
def _wide_copy_plan(shape: tuple[int, ...], perm: tuple[int, ...], itemsize: int):
    """(wide dtype, source shape, permutation, destination shape) in wide elements, or None
    when the copy keeps no innermost run of exactly 8 or 16 bytes."""
    sizes, order = coalesce(shape, perm)
    if not order or order[-1] != len(sizes) - 1 or sizes[-1] * itemsize not in _WIDE:
        return None
    return (_WIDE[sizes[-1] * itemsize], sizes[:-1], order[:-1],
            tuple(sizes[a] for a in order[:-1]))


def wide_run(shape: Sequence[int], perm: Sequence[int], itemsize: int) -> torch.dtype | None:
    """The dtype whose single element is the copy's kept innermost run, when that run is
    exactly 8 or 16 bytes: ATen then moves 2–4× fewer elements (measured 2.5–5× faster for
    the 4-wide innermost qudit of the paper circuit). A bit-exact move either way."""
    plan = _wide_copy_plan(tuple(shape), tuple(perm), itemsize)
    return None if plan is None else plan[0]


def _aten_copy(dst: Tensor, src: Tensor, perm: tuple[int, ...]) -> None:
    plan = _wide_copy_plan(tuple(src.shape), perm, src.element_size())
    if plan is None or not (src.is_contiguous() and dst.is_contiguous()):
        dst.copy_(src.permute(perm))
        return
    wide, src_shape, order, dst_shape = plan
    dst.view(-1).view(wide).view(dst_shape).copy_(src.reshape(-1).view(wide).view(src_shape).permute(order))


def enabled() -> bool:
    """Whether generated kernels may be used (``QCIRCUIT_COMPILE`` is not ``0``)."""
    return os.environ.get("QCIRCUIT_COMPILE", "1") != "0"


def large_enough(numel: int, tokens: int | None) -> bool:
    """Whether a copy of ``numel`` elements (``tokens`` rows, when it has a token axis) is
    worth a generated kernel: the executor's rule, and the planner prices it the same way."""
    return numel >= MIN_NUMEL and (tokens is None or tokens >= 2)


def uses_kernel(numel: int, device: torch.device, tokens: int | None = None) -> bool:
    """Whether a copy of ``numel`` elements on ``device`` goes through a generated kernel."""
    return enabled() and large_enough(numel, tokens) and device.type == "cpu"


def _compile() -> Callable:
    # a fresh code object per kernel: dynamo caches compiled graphs per code object, so each
    # (shape, perm) keeps its own entry instead of counting against one recompile limit
    code = _copy_permuted.__code__.replace()
    fn = types.FunctionType(code, _copy_permuted.__globals__, "_copy_permuted")
    return torch.compile(fn, dynamic=False, fullgraph=True)


def permute_into(dst: Tensor, src: Tensor, perm: Sequence[int], token_axis: int | None = None) -> None:
    """``dst.copy_(src.permute(perm))`` for contiguous ``dst`` of the permuted shape.
    ``token_axis`` (an axis of ``src``) is compiled as a dynamic size, so one kernel serves
    every token count."""
    perm = tuple(perm)
    tokens = None if token_axis is None else src.shape[token_axis]
    if (not uses_kernel(src.numel(), src.device, tokens) or torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        _aten_copy(dst, src, perm)
        return
    shape = tuple(-1 if a == token_axis else d for a, d in enumerate(src.shape))
    key = (shape, perm, src.dtype)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = _compile()
    if kernel is not _ATEN:
        try:
            if token_axis is not None:
                torch._dynamo.mark_dynamic(src, token_axis)
                torch._dynamo.mark_dynamic(dst, perm.index(token_axis))
            kernel(src, dst, perm)
            return
        except Exception as exc:  # no compiler, unsupported backend: this copy stays on ATen
            _kernels[key] = _ATEN
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"qcircuit: generated permute kernel unavailable ({type(exc).__name__}: "
                          f"{first}); using the ATen copy", RuntimeWarning, stacklevel=2)
    _aten_copy(dst, src, perm)
