"""Calibration of the cost model (compiler/calibrate.py): measured constants held by a Tuning
and pricing its decisions, once per thread count, cached beside the wisdom (empty / warm /
hostile files / read-only), the shipped values with tuning off or when the measurement is
unusable; a real run is bounded."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import Tuning, cachefiles, calibrate, compile
from qcircuit.compiler import costmodel as cm

FAKE = dataclasses.replace(cm.SHIPPED, peak_flops=4.0e11, gemm_half=10.0, overhead=2.0e-6,
                           cpu="fake", threads=torch.get_num_threads())
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path):
    """A fresh cache directory."""
    return tmp_path / "cache"


def counting(machine: cm.Machine, calls: list):
    def measure() -> cm.Machine:
        calls.append(machine)
        return machine
    return measure


def never() -> cm.Machine:
    raise AssertionError("measured")


def equal_times(thunks):
    return {n: 1.0 for n in thunks}


def test_measured_constants_price_the_model(cache):
    m, n, k = 4096, 256, 256   # compute-bound (with the bandwidth raised below)
    tuning = Tuning(cache, calibration=counting(FAKE, []), timer=equal_times)
    assert tuning.machine() == FAKE
    # (time - overhead) is flops / (peak · s / (s + half)), s the smallest dimension
    want = 2.0 * m * n * k / (FAKE.peak_flops * k / (k + FAKE.gemm_half)) + FAKE.overhead
    assert cm.gemm(FAKE, m, n, k) == pytest.approx(want, rel=1e-12)
    assert abs(cm.gemm(FAKE, m, n, k) / cm.gemm(cm.SHIPPED, m, n, k) - 1) > 0.1
    plan = compile(Circuit(2, 3, 2).all_pairs())
    decision = tuning.decision(plan, "forward", 8, CPU, torch.float32)
    einsum = next(c for c in decision.candidates if c.route == "einsum")
    assert einsum.predicted == cm.einsum_reference(FAKE, 8, plan.in_dims, plan.circuit.gates)
    times = []
    for peak in (FAKE.peak_flops, 2 * FAKE.peak_flops):  # twice the peak: half the time
        fast = dataclasses.replace(FAKE, peak_flops=peak, bandwidth=1e13)
        times.append(cm.gemm(fast, m, n, k) - FAKE.overhead)
    assert times[0] / times[1] == pytest.approx(2.0, rel=1e-9)


def test_decisions_calibrate_once_per_thread_count(cache):
    calls: list = []
    tuning = Tuning(cache, calibration=counting(FAKE, calls), timer=equal_times)
    plan = compile(Circuit(2, 3, 2).all_pairs())
    tuning.decision(plan, "forward", 8, CPU, torch.float32)
    tuning.decision(plan, "forward", 16, CPU, torch.float32)
    assert tuning.machine() == FAKE and len(calls) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert tuning.machine() == FAKE and len(calls) == 2   # another key: measured again
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2


def test_cache_empty_then_warm(cache):
    calls: list = []
    assert Tuning(cache, calibration=counting(FAKE, calls)).machine() == FAKE
    entries = json.loads((cache / calibrate.FILE).read_text())["entries"]
    assert list(entries) == [calibrate.key()] and len(calls) == 1
    assert cm.Machine(**entries[calibrate.key()]["machine"]) == FAKE
    assert Tuning(cache, calibration=never).machine() == FAKE   # another process: the file


def _fifo(path):
    os.mkfifo(path)


def _zero_link(path):
    os.symlink("/dev/zero", path)


@pytest.mark.parametrize("garbage", [
    "{not json", b"\xff\xfe", json.dumps([1, 2]), "[" * 100_000 + "]" * 100_000,
    json.dumps({"version": 1, "entries": {"KEY": {"machine": {"peak_flops": -1}}}}),
    json.dumps({"version": 1, "entries": {"KEY": {"machine": {"peak_flops": "fast"}}}}),
    json.dumps({"version": 1, "entries": {"KEY": {"machine": dict(
        dataclasses.asdict(FAKE), threads="two")}}}),
    _fifo, _zero_link, " " * (2 << 20)])
def test_a_bad_cache_file_is_ignored_with_a_warning_and_replaced(cache, garbage):
    cache.mkdir(parents=True)
    path = cache / calibrate.FILE
    if callable(garbage):
        garbage(path)
    else:
        data = garbage.replace("KEY", calibrate.key()) if isinstance(garbage, str) else garbage
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="ignored|not a calibration"):
        assert Tuning(cache, calibration=counting(FAKE, [])).machine() == FAKE
    assert time.monotonic() - start < 5.0
    data = json.loads(path.read_text())
    assert data["entries"][calibrate.key()]["machine"]["cpu"] == "fake"


def test_a_read_only_cache_keeps_the_calibration_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tuning = Tuning(blocker / "cache", calibration=counting(FAKE, []))  # cannot be created
    cachefiles.forget_warnings()
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert tuning.machine() == FAKE
    tuning.calibration = never
    assert tuning.machine() == FAKE  # kept by this object
    if os.geteuid() != 0:  # a directory without write permission (root writes anyway)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cachefiles.forget_warnings()
        with pytest.warns(RuntimeWarning, match="not writable"):
            assert Tuning(ro, calibration=counting(FAKE, [])).machine() == FAKE
        assert not list(ro.iterdir())


def test_tune_off_keeps_the_shipped_constants(cache, monkeypatch):
    monkeypatch.setenv("QCIRCUIT_TUNE", "0")
    tuning = Tuning(cache, calibration=never)
    assert not tuning.measure
    decision = tuning.decision(compile(Circuit(2, 3, 2).all_pairs()), "forward", 8, CPU,
                               torch.float32)
    assert decision.how in ("model", "only")
    assert tuning.machine() == cm.SHIPPED and not (cache / calibrate.FILE).exists()


@pytest.mark.parametrize("broken", ["raises", "implausible"])
def test_what_cannot_measure_keeps_the_shipped_constants_and_caches_nothing(cache, broken):
    def measure() -> cm.Machine:
        if broken == "raises":
            raise RuntimeError("no timer here")
        return dataclasses.replace(FAKE, overhead=0.5)  # half a second per op: disturbed
    cachefiles.forget_warnings()
    with pytest.warns(RuntimeWarning, match="shipped constants stay"):
        assert Tuning(cache, calibration=measure).machine() == cm.SHIPPED
    assert not (cache / calibrate.FILE).exists()  # the next process measures again


def test_fit_gemm_recovers_peak_and_half_width():
    peak, half = 1.5e11, 24.0
    widths = (32, 128, 512)
    got = calibrate.fit_gemm(widths, tuple(peak * s / (s + half) for s in widths))
    assert got == pytest.approx((peak, half), rel=1e-9)
    # noise making wider GEMMs slower: the fastest rate, no width effect
    assert calibrate.fit_gemm(widths, (3e10, 2e10, 1e10)) == (3e10, 0.0)


def test_a_real_calibration_is_bounded_and_gives_positive_finite_constants():
    start = time.monotonic()
    machine = calibrate.measure_machine()
    took = time.monotonic() - start
    # each part stops at its share of the budget; a part's last run may pass it (busy host)
    assert took < 3 * calibrate.BUDGET, took
    values = {f.name: getattr(machine, f.name) for f in dataclasses.fields(machine)
              if f.name in calibrate.PLAUSIBLE}
    assert all(math.isfinite(v) for v in values.values()), values
    assert all(v > 0 for k, v in values.items() if k not in ("gemm_half", "fault_per_byte"))
    assert values["gemm_half"] >= 0 and values["fault_per_byte"] >= 0
    assert machine.threads == torch.get_num_threads()
    assert machine.torch_version == torch.__version__ and machine.cpu == cachefiles.cpu_model()
