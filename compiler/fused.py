"""A schedule's permute fused with the gate GEMM after it (``gate_kernel.c``).

A permute step followed by a gate on the innermost axes ("suffix" form) otherwise costs a
full write and re-read of the activation between the two. The fused kernel gathers a block
of tokens at a time into a buffer that stays in L2 and multiplies it there with torch's own
BLAS (``sgemm_``/``dgemm_`` from ``libtorch_cpu``); backward scatters ``gy·G`` back through
the inverse permute and accumulates the gate's gradient from the gathered input. The steps
save the same tensors as before (the permute's input instead of its output), so memory is
unchanged. Float32 and float64 CPU tensors only; the executor keeps the two separate steps
where the kernel or torch's BLAS symbols are not there (``fusable``). Results equal the
unfused steps up to the summation order of the gate gradient. ``QCIRCUIT_FUSE=0`` (or
``QCIRCUIT_COMPILE=0``, which switches off every C kernel) keeps the steps apart.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Sequence

import torch
from torch import Tensor

from . import kernels
from .threads import mkl_local_threads, torch_symbol

BLOCK_BYTES = 1 << 18   # a block of tokens gathered at once: stays in L2 with its GEMM output
_I64P = ctypes.POINTER(ctypes.c_int64)


class _Copy(ctypes.Structure):
    """``qc_copy`` in gate_kernel.c: a permute of one block of tokens."""
    _fields_ = [("itemsize", ctypes.c_int), ("nd", ctypes.c_int),
                ("rows_per_token", ctypes.c_int64), ("row_stride", ctypes.c_int64),
                ("size", _I64P), ("stride", _I64P)]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The kernels with torch's BLAS handed over, or None where either is missing (float64
    needs ``dgemm_`` too: :func:`_has_float64`)."""
    lib = kernels.shared_library()
    sgemm = torch_symbol("sgemm_")
    if lib is None or sgemm is None or not hasattr(lib, "qc_gate_forward"):
        return None
    dgemm, local = torch_symbol("dgemm_"), mkl_local_threads()
    address = [ctypes.cast(f, ctypes.c_void_p) if f is not None else None
               for f in (sgemm, dgemm, local)]
    lib.qc_set_blas.argtypes = [ctypes.c_void_p] * 3
    lib.qc_set_blas(*address)
    common = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.qc_gate_forward.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 3 + common
                                    + [ctypes.POINTER(_Copy), ctypes.c_int, ctypes.c_int])
    lib.qc_gate_backward.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 5 + common
                                     + [ctypes.POINTER(_Copy)] * 2 + [ctypes.c_int] * 2)
    lib.qc_gate_forward.restype = lib.qc_gate_backward.restype = ctypes.c_int
    return lib


@functools.cache
def available() -> bool:
    """Whether the fused kernel may run here: switched on, built, with torch's BLAS (the
    switches are read once per process; ``available.cache_clear()`` reads them again)."""
    return (os.environ.get("QCIRCUIT_FUSE", "1") != "0" and kernels.enabled()
            and _library() is not None)


@functools.lru_cache(maxsize=1)
def _has_float64() -> bool:
    return torch_symbol("dgemm_") is not None


@functools.lru_cache(maxsize=1024)
def _copy(shape: tuple[int, ...], perm: tuple[int, ...], itemsize: int) -> _Copy | None:
    """The permute of ``shape`` (tokens first) by ``perm`` for one block of tokens."""
    args = kernels._kernel_args(shape, perm, itemsize)
    if args is None:
        return None
    isz, rows, row_stride, nd, sizes, strides = args
    if rows % shape[0]:
        return None
    c = _Copy(isz, nd, rows // shape[0], row_stride, sizes, strides)
    c._keep = (sizes, strides)  # the arrays the structure points into
    return c


def fusable(shape_in: tuple[int, ...], perm: tuple[int, ...], shape_mid: tuple[int, ...],
            back: tuple[int, ...], itemsize: int) -> bool:
    """Whether a permute ``shape_in -> shape_mid`` and the suffix gate after it run fused."""
    if itemsize not in (4, 8) or not available() or (itemsize == 8 and not _has_float64()):
        return False
    return _copy(shape_in, perm, itemsize) is not None and _copy(shape_mid, back, itemsize) is not None


def _ready(*ts: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()
                             and t.dtype in (torch.float32, torch.float64)) for t in ts)


def _sizes_fit(tokens: int, f_in: int, k: int, k2: int, x: Tensor, y: Tensor,
               gx: Tensor | None = None) -> bool:
    """The buffers hold what the kernel will read and write (it trusts its arguments)."""
    return (f_in % k == 0 and x.numel() == tokens * f_in and y.numel() == tokens * f_in // k * k2
            and (gx is None or gx.numel() == x.numel()))


def _block(tokens: int, features: int, itemsize: int, threads: int) -> int:
    return max(1, min(BLOCK_BYTES // (features * itemsize), math.ceil(tokens / threads)))


def gate_forward(y: Tensor, x: Tensor, m: Tensor, shape_in: Sequence[int],
                 perm: Sequence[int]) -> bool:
    """``y = permute(x)·mᵀ`` (flat buffers, ``m`` k2×k); False where it did not run."""
    lib, m = _library(), m.contiguous()  # a gate matrix may be a transposed view (k2×k: small)
    if lib is None or not _ready(y, x, m) or not (y.dtype == x.dtype == m.dtype):
        return False
    shape_in, perm, isz = tuple(shape_in), tuple(perm), x.element_size()
    gather = _copy(shape_in, perm, isz)
    if gather is None:
        return False
    tokens, f_in = shape_in[0], math.prod(shape_in[1:])
    k2, k = m.shape
    if not _sizes_fit(tokens, f_in, k, k2, x, y):
        return False
    threads = torch.get_num_threads()
    return lib.qc_gate_forward(isz, x.data_ptr(), y.data_ptr(), m.data_ptr(), tokens, f_in, k,
                               k2, gather, _block(tokens, f_in, isz, threads), threads) == 0


def gate_backward(x: Tensor, gy: Tensor, m: Tensor, gx: Tensor | None, gm: Tensor | None,
                  shape_in: Sequence[int], perm: Sequence[int], shape_mid: Sequence[int],
                  back: Sequence[int]) -> bool:
    """``gm += gyᵀ·permute(x)`` (``gm`` k2×k, when given) and ``gx = permute⁻¹(gy·m)`` (when
    given); False where it did not run (nothing was written then)."""
    lib, m = _library(), m.contiguous()
    if lib is None or not _ready(x, gy, m, gx, gm) or len({t.dtype for t in (x, gy, m)}) > 1:
        return False
    isz = x.element_size()
    gather = _copy(tuple(shape_in), tuple(perm), isz)
    scatter = _copy(tuple(shape_mid), tuple(back), isz)
    if gather is None or scatter is None:
        return False
    tokens, f_in = shape_in[0], math.prod(shape_in[1:])
    k2, k = m.shape
    if not _sizes_fit(tokens, f_in, k, k2, x, gy, gx) or (gm is not None and gm.shape != (k2, k)):
        return False
    threads = torch.get_num_threads()
    ptr = [t.data_ptr() if t is not None else None for t in (x, gy, m, gx, gm)]
    return lib.qc_gate_backward(isz, *ptr, tokens, f_in, k, k2, gather, scatter,
                                _block(tokens, f_in, isz, threads), threads) == 0
