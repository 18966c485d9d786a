"""Tuning state as one object: machine constants, wisdom, decisions and executors.

A :class:`Tuning` holds everything the compiler learns about running circuits on this
machine (as FFTW's planner holds its wisdom): the cost model's calibrated constants per
thread count, the :class:`~wisdom.WisdomStore` (measured winners, in memory and on disk),
the :class:`~choice.Decision` made for each key and the executor built from it. One key names
everything that changes a decision: the circuit's signature, the kind, the token bucket, the
device, the dtype, torch's thread count and the kernel switches (on disk also the torch
version and the device's model). A process has a default instance (:func:`default`); a
module or plan can be handed another (``plan.module(tuning=...)``), and tests start from a
fresh state with one call (:func:`reset`).

**Decide, then run.** A forward only looks its key up (:meth:`Tuning.executor`). For a key
not decided yet the decision is made first, before the forward computes anything that
autograd records, on a worker thread with tensors of its own (:func:`measure.isolated`), so
neither the caller's graph nor its saved-tensor hooks, autocast or inference mode see the
measurement. A decision is made once per key and never changes while the object lives, so
every re-run of a forward — a recomputation under gradient checkpointing (reentrant or not),
a replay, a retry — runs the same route. A new token length mid-training is a new key and is
decided at its first forward the same way; ``Plan.warm_up`` (or ``attach(warm_up=...)``)
decides keys ahead of time.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import torch

from . import cachefiles, calibrate, choice, fused, kernels, routes
from . import costmodel as cm
from . import measure as measure_mod
from .lowered import Lowered
from .wisdom import WisdomStore

Key = tuple  # (signature, kind, bucket, device, dtype, threads, switches[, named route])
_FROM_ENV = object()
_MISSING = object()
UNCAST = "uncast"   # the kind of a decision among routes that take activations uncast


def switches() -> tuple[bool, bool]:
    """The kernel switches a decision depends on: the C permute kernel and the fused gate
    kernel (``QCIRCUIT_COMPILE``, ``QCIRCUIT_FUSE``, and whether they could be built)."""
    return kernels.enabled(), fused.available()


class Tuning:
    """Tuning state (see the module docstring).

    ``cache_dir``: where wisdom and calibration live (default ``$QCIRCUIT_CACHE_DIR`` or
    ``~/.cache/qcircuit``; None keeps them in memory). ``measure``: time candidates (default:
    ``QCIRCUIT_TUNE`` is not ``0``); without, the cost model's shipped constants decide on
    the CPU and the reference route runs elsewhere. ``timer`` and ``calibration`` replace the
    measurements (``{route: thunk} -> {route: seconds}`` and ``() -> Machine``; tests)."""

    def __init__(self, cache_dir: Path | str | None = _FROM_ENV, *,  # type: ignore[assignment]
                 measure: bool | None = None, timer: choice.Timer | None = None,
                 calibration: Callable[[], cm.Machine] | None = None):
        self.cache_dir = cachefiles.cache_dir() if cache_dir is _FROM_ENV else (
            None if cache_dir is None else Path(cache_dir))
        self.measure = _env_tune() if measure is None else bool(measure)
        self.timer = timer or measure_mod.fastest_times
        self.calibration = calibration or calibrate.measure_machine
        self.wisdom = WisdomStore(self.cache_dir)
        self._machines: dict[int, cm.Machine] = {}
        self._decisions: dict[Key, choice.Decision] = {}
        self._executors: dict[Key, Callable] = {}
        self._uncast: dict[Key, Callable | None] = {}
        self._lock = threading.RLock()           # decisions and executors
        self._machine_lock = threading.Lock()    # calibration (taken on the worker thread)

    def __deepcopy__(self, memo: dict) -> "Tuning":
        return self  # shared, like the machine it describes

    def __repr__(self) -> str:
        return (f"Tuning(cache_dir={self.cache_dir}, measure={self.measure}, "
                f"{len(self._decisions)} decisions)")

    # --- keys ----------------------------------------------------------------------------
    @staticmethod
    def key(lowered: Lowered, kind: str, bucket: int | None, device: torch.device,
            dtype: torch.dtype, route: str | None = None) -> Key:
        """The complete in-memory key of one decision (``route``: a named route's)."""
        k = (lowered.signature, kind, bucket, device, dtype, torch.get_num_threads(), switches())
        return k if route is None else k + (route,)

    @staticmethod
    def disk_key(key: Key) -> str:
        """The wisdom file's key: the in-memory key plus the torch version and the device's
        model (a shared home may serve other machines)."""
        signature, kind, bucket, device, dtype, threads, (kernel, fuse) = key[:7]
        return "|".join([signature, kind, str(bucket), device.type,
                         str(dtype).removeprefix("torch."), f"torch {torch.__version__}",
                         f"{cachefiles.device_name(device)} threads={threads}",
                         f"kernels={int(kernel)} fused={int(fuse)}"])

    # --- what is known -------------------------------------------------------------------
    def machine(self) -> cm.Machine:
        """The cost model's constants for this CPU at torch's current thread count: measured
        once (and cached on disk) when measuring, else the shipped ones."""
        if not self.measure:
            return cm.SHIPPED
        threads = torch.get_num_threads()
        found = self._machines.get(threads)
        if found is None:
            with self._machine_lock:
                found = self._machines.get(threads)
                if found is None:
                    found = measure_mod.isolated(
                        lambda: calibrate.load_or_measure(self.cache_dir, self.calibration))
                    self._machines[threads] = found
        return found

    def decision(self, lowered: Lowered, kind: str, bucket: int | None, device: torch.device,
                 dtype: torch.dtype) -> choice.Decision:
        """The decision for this key: remembered, else made now (see the module docstring)."""
        return self._decided(self.key(lowered, kind, bucket, device, dtype), lowered)

    def named(self, lowered: Lowered, kind: str, route: str, bucket: int | None,
              device: torch.device, dtype: torch.dtype) -> choice.Decision:
        """The decision that runs the route ``route`` for this key (a ``QCError`` where it
        cannot run this circuit or on this device)."""
        return self._decided(self.key(lowered, kind, bucket, device, dtype, route), lowered)

    def executor(self, lowered: Lowered, kind: str, bucket: int | None, device: torch.device,
                 dtype: torch.dtype, route: str | None = None) -> Callable:
        """The executor for this key (``route``: the named route's): a dict lookup once
        built — the forward's hot path."""
        k = self.key(lowered, kind, bucket, device, dtype, route)
        run = self._executors.get(k)
        return run if run is not None else self._build(k, lowered)

    def uncast_executor(self, lowered: Lowered, bucket: int, device: torch.device,
                        dtype: torch.dtype) -> Callable | None:
        """The executor of a route that takes ``dtype`` activations against float32 gates
        without a cast (``routes.uncast_routes``), or None where none can: then the caller
        casts. Decided once per key, like every decision."""
        if not routes.uncast_routes(device.type, dtype):
            return None
        k = self.key(lowered, UNCAST, bucket, device, dtype)
        run = self._uncast.get(k, _MISSING)
        return run if run is not _MISSING else self._build_uncast(k, lowered)

    @torch.compiler.disable
    def _build_uncast(self, k: Key, lowered: Lowered) -> Callable | None:
        with self._lock:
            if k not in self._uncast:
                decision = self._decided(k, lowered)
                self._uncast[k] = None if decision is None else choice.build(lowered, decision)
            return self._uncast[k]

    @torch.compiler.disable
    def _build(self, k: Key, lowered: Lowered) -> Callable:
        with self._lock:
            run = self._executors.get(k)
            if run is None:
                run = self._executors[k] = choice.build(lowered, self._decided(k, lowered))
            return run

    @torch.compiler.disable
    def _decided(self, k: Key, lowered: Lowered) -> choice.Decision | None:
        found = self._decisions.get(k, _MISSING)
        if found is not _MISSING:
            return found
        with self._lock:
            found = self._decisions.get(k, _MISSING)
            if found is _MISSING:
                found = self._decisions[k] = measure_mod.isolated(
                    lambda: self._decide(k, lowered), k[3])
            return found

    def _decide(self, k: Key, lowered: Lowered) -> choice.Decision | None:
        """Runs on the worker thread: search, and measure where needed."""
        _, kind, bucket, device, dtype = k[:5]
        machine = self.machine() if device.type == "cpu" else cm.SHIPPED
        if len(k) > 7:
            return choice.named(lowered, kind, k[7], bucket, device.type, dtype, machine)
        uncast = kind == UNCAST
        return choice.decide(lowered, "forward" if uncast else kind, bucket, device, dtype,
                             machine=machine, measure=self.measure, timer=self.timer,
                             wisdom=self.wisdom, key=self.disk_key(k),
                             gate_dtype=torch.float32 if uncast else None)

    def decisions(self) -> list[choice.Decision]:
        """Every decision made so far, oldest first."""
        return [d for d in self._decisions.values() if d is not None]

    def forget(self) -> None:
        """Drop what this object holds in memory (disk files stay)."""
        with self._lock:
            self._machines.clear()
            self._decisions.clear()
            self._executors.clear()
            self._uncast.clear()
            self.wisdom.forget()


def _env_tune() -> bool:
    return os.environ.get("QCIRCUIT_TUNE", "1") != "0"


_default: Tuning | None = None
_default_lock = threading.Lock()


def default() -> Tuning:
    """The process's default tuning state (made at first use, from the environment)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Tuning()
    return _default


def reset() -> Tuning:
    """A fresh default tuning state, read again from the environment (``QCIRCUIT_TUNE``,
    ``QCIRCUIT_CACHE_DIR``, the kernel switches); warnings are given again. What tests
    call to start from nothing."""
    global _default
    kernels.enabled.cache_clear()
    fused.available.cache_clear()
    cachefiles.forget_warnings()
    with _default_lock:
        _default = Tuning()
    return _default
