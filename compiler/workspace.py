"""Recycled activation buffers for schedule execution.

Fresh large allocations cost page faults comparable to a GEMM on a CPU, so a schedule keeps
its buffers in a :class:`Workspace` between steps and training steps; :class:`Release` hands a
forward's saved buffers back once the autograd graph that holds them is gone.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor


class Workspace:
    """A pool of flat buffers. A buffer enters the pool only when no autograd graph and no
    caller can see it any more (when the graph that saved it is freed, at the end of the
    backward that used it as scratch, or at once without grad), so reuse never aliases live
    data; reused memory skips the page faults of a fresh allocation."""

    def __init__(self, per_key: int = 16):
        self._free: dict[tuple, list[Tensor]] = {}
        self._lock = threading.Lock()
        self._per_key = per_key

    def take(self, numel: int, like: Tensor) -> Tensor:
        key = (numel, like.dtype, like.device)
        with self._lock:
            pool = self._free.get(key)
            if pool:
                return pool.pop()
        return torch.empty(numel, dtype=like.dtype, device=like.device)

    def give(self, buf: Tensor) -> None:
        key = (buf.numel(), buf.dtype, buf.device)
        with self._lock:
            pool = self._free.setdefault(key, [])
            if len(pool) < self._per_key:
                pool.append(buf)


class Release:
    """Owns a forward's saved buffers; gives them back to the workspace when the autograd
    node that holds it is freed (so ``retain_graph`` and repeated backwards stay correct)."""

    def __init__(self, ws: Workspace, bufs: list[Tensor]):
        self.ws, self.bufs = ws, bufs

    def __del__(self):
        for b in self.bufs:
            if b is not None:
                self.ws.give(b)
