"""Calibration: the cost model's machine constants measured on this CPU, once, and remembered.

:func:`measure_machine` is a micro-benchmark bounded by ``BUDGET`` seconds, in float32 with
torch's current thread count: per-op overhead (the intercept of two cache-resident copies
that run on every thread, at least a tiny op's dispatch), contiguous copy bandwidth, GEMM
throughput at a few widths (fitted to the model's peak and half-width, :func:`fit_gemm`)
and the first-touch cost of freshly mapped memory. Each figure is the
fastest of a few repeats: noise on a shared machine only ever adds time.

The result is cached the way route wisdom is: ``machine.json`` in the cache directory, keyed
by the CPU model, the thread count and the torch version, written atomically under the same
lock, so one process measures and the others read (:func:`load_or_measure`; the
:class:`tuning.Tuning` that plans holds the result). The file is untrusted: bounded, schema-
and range-checked; a bad one is ignored with one warning and measured again. With tuning off
(``QCIRCUIT_TUNE=0``), or where nothing can be measured, the shipped constants price: plans
are then reproducible across machines.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import cachefiles
from . import costmodel as cm
from .caps import CALIBRATION_MAX_BYTES, CALIBRATION_MAX_ENTRIES

FILE = "machine.json"
BUDGET = 1.0               # seconds for the whole micro-benchmark (each part stops early)
MIN_REPEATS = 2            # timed runs of each part at least (after one warm-up) ...
MAX_REPEATS = 100          # ... and at most, while its share of the budget lasts
TINY_OPS = 64              # tiny matmuls per sample of the serial dispatch cost
SMALL_COPIES = (1 << 16, 1 << 18)  # cache-resident copies big enough to run on every thread
COPY_NUMEL = 1 << 23       # 32 MiB copied (a 2048-token activation of a 4096 layer): beyond
                           # the caches of most CPUs, as the activations the model prices
GEMM_NUMEL = 1 << 18       # elements of the GEMM's activation, (GEMM_NUMEL / s) × s: cached,
                           # so the GEMM times its compute (the model prices traffic apart)
WIDTHS = (32, 128, 512)    # gate widths s timed: (rows × s) · (s × s)
FRESH_NUMEL = 9 << 20      # 36 MiB: above glibc's largest mmap threshold, so freshly mapped
# what any CPU can measure; outside, the run was disturbed (a busy machine): not installed
PLAUSIBLE = {"peak_flops": (1e9, 1e14), "gemm_half": (0.0, 4096.0), "bandwidth": (1e9, 1e13),
             "copy_bandwidth": (1e9, 1e13), "overhead": (1e-8, 1e-4),
             "fault_per_byte": (0.0, 1e-8)}

VERSION = 1


def key() -> str:
    """What a calibration holds for: the CPU model, torch's thread count and version."""
    return "|".join(["calibration", cachefiles.cpu_model(), f"threads={torch.get_num_threads()}",
                     f"torch {torch.__version__}"])


def fit_gemm(widths: tuple[int, ...], rates: tuple[float, ...]) -> tuple[float, float]:
    """``(peak, half)`` such that ``rate(s) ≈ peak · s / (s + half)``: a least-squares line
    ``1/rate = 1/peak + (half/peak) · 1/s`` through the measured points."""
    xs, ys = [1.0 / s for s in widths], [1.0 / r for r in rates]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    if intercept <= 0 or slope < 0:  # noise bent the line: the fastest rate, no width effect
        return max(rates), 0.0
    return 1.0 / intercept, slope / intercept


def _fastest(fn: Callable[[], object], deadline: float) -> float:
    """The fastest timed run after one warm-up: runs until ``deadline`` (between
    ``MIN_REPEATS`` and ``MAX_REPEATS``), so a busy machine has more chances of a quiet one."""
    fn()
    best = math.inf
    for i in range(MAX_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i + 1 >= MIN_REPEATS and time.monotonic() > deadline:
            break
    return best


def _net(t: float, overhead: float) -> float:
    """``t`` less the per-op overhead, but never less than half of it: an overhead estimate
    that large was spoiled by a busy moment (``plausible`` then judges the result)."""
    return t - min(overhead, t / 2)


def measure_machine(budget: float = BUDGET) -> cm.Machine:
    """This CPU's constants, measured within about ``budget`` seconds (see the module)."""
    start = time.monotonic()
    parts = 5 + len(WIDTHS)

    def until(done: int) -> float:  # a share of the budget for each part, in order
        return start + budget * done / parts

    f32 = dict(dtype=torch.float32, device="cpu")  # whatever the defaults say
    with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
        tiny, out = torch.ones(8, 8, **f32), torch.empty(8, 8, **f32)

        def ops() -> None:
            for _ in range(TINY_OPS):
                torch.mm(tiny, tiny, out=out)
        serial = _fastest(ops, until(1)) / TINY_OPS
        # an op on every thread costs more to start: the intercept of two cached copies
        (n1, n2), times = SMALL_COPIES, []
        for i, n in enumerate(SMALL_COPIES):
            src, dst = torch.rand(n, **f32), torch.empty(n, **f32)
            times.append(_fastest(lambda: dst.copy_(src), until(2 + i)))
        overhead = max(times[0] - (times[1] - times[0]) * n1 / (n2 - n1), serial)

        src = torch.rand(COPY_NUMEL, **f32)
        dst = torch.empty_like(src)
        t_copy = _net(_fastest(lambda: dst.copy_(src), until(4)), overhead)
        copy_bandwidth = 2.0 * src.nbytes / t_copy
        del src, dst

        rates = []
        for i, s in enumerate(WIDTHS):
            x, w = torch.rand(GEMM_NUMEL // s, s, **f32), torch.rand(s, s, **f32)
            y = torch.empty(GEMM_NUMEL // s, s, **f32)
            t = _net(_fastest(lambda: torch.mm(x, w, out=y), until(5 + i)), overhead)
            rates.append(2.0 * GEMM_NUMEL * s / t)
        del x, w, y
        peak, half = fit_gemm(WIDTHS, tuple(rates))

        warm = torch.empty(FRESH_NUMEL, **f32)
        t_fill = _fastest(lambda: warm.fill_(1.0), until(parts - 1))
        t_fresh = _fastest(lambda: torch.empty(FRESH_NUMEL, **f32).fill_(1.0), until(parts))
        fault = max(t_fresh - t_fill, 0.0) / warm.nbytes

    ratio = cm.SHIPPED.bandwidth / cm.SHIPPED.copy_bandwidth  # GEMM streams as copies do
    return cm.Machine(peak_flops=peak, gemm_half=half, bandwidth=copy_bandwidth * ratio,
                      copy_bandwidth=copy_bandwidth, overhead=overhead, fault_per_byte=fault,
                      cpu=cachefiles.cpu_model(), threads=torch.get_num_threads(),
                      torch_version=torch.__version__)


def plausible(machine: cm.Machine) -> bool:
    """Whether every constant lies in ``PLAUSIBLE`` (finite, positive where it must be)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
               for v, (lo, hi) in ((getattr(machine, c), r) for c, r in PLAUSIBLE.items()))


def parse_entry(value: object) -> cm.Machine | None:
    """A cached calibration entry as a plausible :class:`~costmodel.Machine`, or None."""
    try:
        machine = cm.Machine(**value["machine"])  # type: ignore[index, arg-type]
    except (TypeError, KeyError):
        return None
    texts = (machine.cpu, machine.torch_version)
    if not all(isinstance(t, str) and len(t) <= 256 for t in texts) \
            or isinstance(machine.threads, bool) or not isinstance(machine.threads, int):
        return None
    return machine if plausible(machine) else None


def _entries(directory: Path) -> dict[str, dict]:
    """The file's entries ({} with one warning when the file is not a usable calibration)."""
    path = directory / FILE
    try:
        data = cachefiles.read_json(path, CALIBRATION_MAX_BYTES)
    except cachefiles.CacheFileError as exc:
        cachefiles.warn_once(f"calibrate:read {path}", f"calibration file {path} ignored ({exc}); "
                             "measured again", 6)
        return {}
    if data is None:
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION \
        else None
    if not isinstance(entries, dict) or len(entries) > CALIBRATION_MAX_ENTRIES:
        cachefiles.warn_once(f"calibrate:parse {path}", f"calibration file {path} is not a "
                             f"calibration of version {VERSION}; ignored, measured again", 6)
        return {}
    return entries


def _measured(measure: Callable[[], cm.Machine]) -> cm.Machine | None:
    try:
        machine = measure()
    except Exception as exc:  # noqa: BLE001 - anything that cannot measure keeps the defaults
        cachefiles.warn_once("calibrate:failed", f"cost model calibration failed "
                             f"({type(exc).__name__}: {exc}); the shipped constants stay", 6)
        return None
    if not plausible(machine):
        cachefiles.warn_once("calibrate:implausible", "cost model calibration measured "
                             f"implausible constants (a busy machine?): {machine}; the shipped "
                             "constants stay", 6)
        return None
    return machine


def load_or_measure(directory: Path | None, measure: Callable[[], cm.Machine]) -> cm.Machine:
    """This machine's constants for torch's current thread count: read from ``machine.json``
    in ``directory``, else measured with ``measure`` (one process at a time, under the
    directory's lock) and written there; the shipped constants where the measurement fails.
    ``directory=None``: measured, kept nowhere."""
    k = key()
    if directory is None:
        return _measured(measure) or cm.SHIPPED
    entry = _entries(directory).get(k)
    found = parse_entry(entry)
    if found is not None:
        return found
    if entry is not None:
        cachefiles.warn_once(f"calibrate:entry {directory}", f"the calibration cached in "
                             f"{directory / FILE} for this machine is malformed; ignored, "
                             "measured again", 6)
    with cachefiles.measuring(directory) as locked:
        entries = _entries(directory) if locked else {}
        found = parse_entry(entries.get(k))
        if found is not None:
            return found
        machine = _measured(measure)
        if machine is None:
            return cm.SHIPPED
        if locked:
            good = {n: e for n, e in entries.items() if parse_entry(e) is not None}
            good[k] = {"machine": dataclasses.asdict(machine)}
            try:
                cachefiles.write_json(directory / FILE, {"version": VERSION, "entries": good})
            except OSError as exc:
                cachefiles.warn_once(f"calibrate:write {directory}", f"cannot write the "
                                     f"calibration to {directory} ({exc}); kept in memory only", 6)
        return machine
