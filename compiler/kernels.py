"""Layout copies (a schedule's permutes) as a small C kernel.

ATen copies a permuted view element by element along the output's innermost axis; with the
small qudit axes of a circuit (4, 8, 16 wide) that runs at a fraction of memory speed.
``permute.c`` copies one token's features at a time (a slab that stays in L1), transposing
4×4 blocks in registers where the innermost axis moves, and splits the tokens over threads:
measured at 1.2–1.7× a plain copy for the paper circuit's permutes at 512–2048 tokens (ATen:
2.4–6.8×; the TorchInductor kernels this module used before: 1.5–2.7×).

The kernel is built once per machine, at first use, with the system C compiler (``CC``,
else ``cc``), with OpenMP when the compiler has it, and cached under ``QCIRCUIT_CACHE_DIR``
(default ``~/.cache/qcircuit``; processes starting at once wait for one build under a lock); building it takes about two seconds. Where it cannot be built
the copies stay on ATen, with one warning; the result is the same bits either way.
``QCIRCUIT_COMPILE=0`` in the environment switches the kernel off. The ATen copy moves a
kept innermost run of 8 or 16 bytes as one int64/complex128 element (2.5–5× faster).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import cachefiles

# the library: the fused gate kernel (gate_kernel.c, see fused.py), which includes permute.c
SOURCE = Path(__file__).with_name("gate_kernel.c")
SOURCES = (SOURCE, Path(__file__).with_name("permute.c"))
# compiler flags, best first: vectorised for this CPU and threaded, then plain and serial
FLAGS = (("-O3", "-march=native", "-fopenmp"), ("-O3",))
PARALLEL_NUMEL = 1 << 15     # smaller copies run on one thread (waking a second costs more)


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


# ----------------------------------------------------------------------------- ATen copy
_WIDE = {16: torch.complex128, 8: torch.int64}  # a kept run of this many bytes as one element


@functools.lru_cache(maxsize=4096)
def _wide_copy_plan(shape: tuple[int, ...], perm: tuple[int, ...], itemsize: int):
    """(wide dtype, source shape, permutation, destination shape) in wide elements, or None
    when the copy keeps no innermost run of exactly 8 or 16 bytes."""
    sizes, order = coalesce(shape, perm)
    if not order or order[-1] != len(sizes) - 1 or sizes[-1] * itemsize not in _WIDE:
        return None
    return (_WIDE[sizes[-1] * itemsize], sizes[:-1], order[:-1],
            tuple(sizes[a] for a in order[:-1]))


def _aten_copy(dst: Tensor, src: Tensor, perm: tuple[int, ...]) -> None:
    plan = _wide_copy_plan(tuple(src.shape), perm, src.element_size())
    if plan is None or not (src.is_contiguous() and dst.is_contiguous()):
        dst.copy_(src.permute(perm))
        return
    wide, src_shape, order, dst_shape = plan
    dst.view(-1).view(wide).view(dst_shape).copy_(src.reshape(-1).view(wide).view(src_shape).permute(order))


# ----------------------------------------------------------------------------- C kernel
@functools.cache
def enabled() -> bool:
    """Whether the C kernel may be used (``QCIRCUIT_COMPILE`` is not ``0``); read once per
    process (``enabled.cache_clear()`` reads it again)."""
    return os.environ.get("QCIRCUIT_COMPILE", "1") != "0"


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file itself (not a link, FIFO or device: dlopen would
    follow it, or block on it)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _cpu_id() -> str:
    """What a ``-march=native`` build depends on: a shared home may serve other machines."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(compiler: str, directory: Path) -> Path:
    """The kernel's shared library: the best build already in ``directory``, else compiled
    there with the first flags that work, by one process at a time (to a temporary name, then
    renamed over whatever held the name)."""
    source = b"\0".join(p.read_bytes() for p in SOURCES)
    targets = []
    for flags in FLAGS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        targets.append((flags, directory / f"permute-{key}.so"))
    cached = [target for _, target in targets if _regular(target)]
    if cached:
        return cached[0]
    with cachefiles.flock(directory / "build.lock"):  # one process builds, the others wait
        cached = [target for _, target in targets if _regular(target)]  # built meanwhile
        if cached:
            return cached[0]
        return _compile(compiler, targets, directory)


def _compile(compiler: str, targets, directory: Path) -> Path:
    errors = []
    for flags, target in targets:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


@functools.lru_cache(maxsize=1)
def shared_library() -> ctypes.CDLL | None:
    """The built kernels, or None (with one warning) where they cannot be built."""
    compiler = os.environ.get("CC") or "cc"
    try:
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C compiler ({compiler!r} not found)")
        directory = cachefiles.cache_dir()
        if cachefiles.writable(directory):
            return ctypes.CDLL(str(_build(compiler, directory)))
        # a read-only cache: built per process in a folder removed at once (the loaded
        # library stays mapped), so nothing is left behind
        with tempfile.TemporaryDirectory(prefix="qcircuit-") as scratch:
            return ctypes.CDLL(str(_build(compiler, Path(scratch))))
    except Exception as exc:  # no compiler, a failed build, a library that does not load
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"qcircuit: permute kernel unavailable ({type(exc).__name__}: {first}); "
                      "using the ATen copy", RuntimeWarning, stacklevel=4)
        return None


@functools.lru_cache(maxsize=1)
def _library() -> Callable | None:
    """``qc_permute`` from the built kernels, or None."""
    lib = shared_library()
    fn = getattr(lib, "qc_permute", None) if lib is not None else None
    if fn is None:
        if lib is not None:
            cachefiles.warn_once("kernels:symbol", "the permute kernel library lacks qc_permute "
                                 "(a stale or foreign file in the cache?); using the ATen copy")
        return None
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, i64p, i64p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def in_slabs(shape: Sequence[int], perm: Sequence[int]) -> bool:
    """Whether the kernel takes this copy: its outermost axis (the tokens, in a schedule)
    stays outermost and something inside moves. Copies that move the outermost axis stay on
    ATen, which is faster for them (measured 1.1–1.6× a plain copy against 1.7–3×)."""
    sizes, order = coalesce(shape, perm)
    return len(sizes) > 1 and order[0] == 0


@functools.lru_cache(maxsize=4096)
def _kernel_args(shape: tuple[int, ...], perm: tuple[int, ...], itemsize: int) -> tuple | None:
    """The kernel's description of the copy, or None where it does not take it: element
    size, rows (the outermost axis) and their stride, then one row's axes in output order
    (sizes, input strides). A kept innermost run moves as the widest element (≤ 16 bytes)
    that divides it."""
    if not in_slabs(shape, perm):
        return None
    sizes, order = map(list, coalesce(shape, perm))
    if order[-1] == len(sizes) - 1:
        run = sizes[-1] * itemsize
        itemsize = max(w for w in (1, 2, 4, 8, 16) if run % w == 0 and w >= itemsize)
        sizes[-1] = run // itemsize
    strides = [math.prod(sizes[a + 1:]) for a in range(len(sizes))]
    slab = [a for a in order[1:] if sizes[a] > 1]
    axes = ctypes.c_int64 * len(slab)
    return (itemsize, sizes[0], strides[0], len(slab), axes(*[sizes[a] for a in slab]),
            axes(*[strides[a] for a in slab]))


def permute_into(dst: Tensor, src: Tensor, perm: Sequence[int]) -> None:
    """``dst.copy_(src.permute(perm))`` for contiguous ``dst`` of the permuted shape: the C
    kernel on CPU tensors outside autograd, else the ATen copy."""
    perm = tuple(perm)
    if src.numel() == 0:
        return
    if (src.device.type != "cpu" or dst.dtype != src.dtype or not enabled()
            or not (src.is_contiguous() and dst.is_contiguous())
            or (torch.is_grad_enabled() and (src.requires_grad or dst.requires_grad))
            or torch.compiler.is_compiling()):
        _aten_copy(dst, src, perm)
        return
    args = _kernel_args(tuple(src.shape), perm, src.element_size())
    kernel = _library() if args is not None else None
    threads = torch.get_num_threads() if src.numel() >= PARALLEL_NUMEL else 1
    if kernel is None or kernel(src.data_ptr(), dst.data_ptr(), *args, threads) != 0:
        _aten_copy(dst, src, perm)
