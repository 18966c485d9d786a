"""Running a small schedule on the calling thread alone, without touching other threads.

A schedule on a few tokens is a chain of ~30 small ops; with a second intra-op thread each
of them pays for waking it (OpenMP, MKL) and for waiting on it when the host is busy. Below
``costmodel.SERIAL_NUMEL`` a step runs faster on one thread. ``torch.set_num_threads``
would change the whole process, so :func:`serial` sets the two thread-local knobs instead:
the OpenMP ``nthreads`` setting of this thread (which ATen's parallel loops and the permute
kernel read) and MKL's thread-local thread count. Where the runtime torch was built with does
not offer them, :func:`serial` does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

_LIB = Path(torch.__file__).with_name("lib")


class _Knobs(NamedTuple):
    omp_get: Callable[[], int]
    omp_set: Callable[[int], None]
    mkl_local: Callable[[int], int] | None  # returns the previous local setting (0: global)


@functools.lru_cache(maxsize=1)
def _torch_libraries() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtime and the CPU library torch itself loaded (same files, same state)."""
    libs = []
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libtorch_cpu.so"):
        for path in sorted(_LIB.glob(pattern)):
            try:
                libs.append(ctypes.CDLL(str(path)))
            except OSError:
                pass
    return tuple(libs)


def torch_symbol(name: str, restype=None, argtypes=None):
    """A C function exported by torch's own libraries (its BLAS, its OpenMP), or None."""
    for lib in _torch_libraries():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
            return fn
    return None


@functools.lru_cache(maxsize=1)
def _knobs() -> _Knobs | None:
    omp_get = torch_symbol("omp_get_max_threads", ctypes.c_int, [])
    omp_set = torch_symbol("omp_set_num_threads", None, [ctypes.c_int])
    if omp_get is None or omp_set is None:
        return None
    return _Knobs(omp_get, omp_set, mkl_local_threads())


def mkl_local_threads():
    """MKL's thread-local thread count setter (by value; the lower-case name takes a
    pointer, Fortran style), or None where torch's BLAS is not MKL."""
    return torch_symbol("MKL_Set_Num_Threads_Local", ctypes.c_int, [ctypes.c_int])


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run the body's intra-op work on this thread only; other threads keep their settings."""
    knobs = _knobs() if torch.get_num_threads() > 1 else None
    if knobs is None:
        yield
        return
    before = knobs.omp_get()
    knobs.omp_set(1)
    mkl_before = knobs.mkl_local(1) if knobs.mkl_local is not None else None
    try:
        yield
    finally:
        knobs.omp_set(before)
        if mkl_before is not None:
            knobs.mkl_local(mkl_before)
