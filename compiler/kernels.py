"""Layout copies (a schedule's permutes) as generated kernels.

ATen copies a permuted view element by element along the output's innermost axis; with the
small qudit axes of a circuit (4, 8, 16 wide) that runs at a fraction of memory speed.
TorchInductor emits a tiled, vectorised transpose loop for the same copy: 2–4× faster at
512–2048 tokens on the development machine (benchmarks/adapter_speed.py measures the
schedules both ways). Each (shape, permutation, dtype) gets its own compiled kernel on first
use; when compiling fails (no C++ compiler, a backend inductor does not support) that kernel
falls back to the ATen copy for good, and the result is the same either way: a copy is exact.

Kernels are used for copies of at least ``MIN_NUMEL`` elements on the CPU, where they pay
for their compile time. ``QCIRCUIT_COMPILE=0`` in the environment switches them off.
"""
from __future__ import annotations

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
        dst.copy_(src.permute(perm))
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
    dst.copy_(src.permute(perm))
