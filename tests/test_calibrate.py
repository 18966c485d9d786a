"""Calibration of the cost model (compiler/calibrate.py): measured constants installed and
used by the model, cached beside the wisdom (empty / warm / corrupted / read-only), kept at
the shipped values with tuning off or when the measurement is unusable; a real run is bounded."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import calibrate, compile, routes, wisdom
from qcircuit.compiler import costmodel as cm

FAKE = dataclasses.replace(cm.SHIPPED, peak_flops=4.0e11, gemm_half=10.0, overhead=2.0e-6,
                           cpu="fake", threads=torch.get_num_threads())


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache directory, nothing calibrated or remembered; the shipped constants after."""
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(tmp_path / "cache"))
    wisdom.forget()
    calibrate.forget()
    yield tmp_path / "cache"
    calibrate.forget()
    wisdom.forget()


def counting(machine: cm.Machine, calls: list):
    def measure() -> cm.Machine:
        calls.append(machine)
        return machine
    return measure


def never() -> cm.Machine:
    raise AssertionError("measured")


def test_measured_constants_are_installed_and_price_the_model(cache):
    m, n, k = 4096, 256, 256   # compute-bound (with the bandwidth raised below)
    shipped = cm.gemm(m, n, k)
    assert calibrate.ensure(measure=counting(FAKE, [])) == FAKE
    assert cm.current() == FAKE
    # (time - overhead) is flops / (peak · s / (s + half)), s the smallest dimension
    want = 2.0 * m * n * k / (FAKE.peak_flops * k / (k + FAKE.gemm_half)) + FAKE.overhead
    assert cm.gemm(m, n, k) == pytest.approx(want, rel=1e-12)
    assert abs(cm.gemm(m, n, k) / shipped - 1) > 0.1
    times = []
    for peak in (FAKE.peak_flops, 2 * FAKE.peak_flops):  # twice the peak: half the time
        calibrate.forget()
        (cache / calibrate.FILE).unlink()  # measured again
        calibrate.ensure(measure=lambda: dataclasses.replace(FAKE, peak_flops=peak, bandwidth=1e13))
        times.append(cm.gemm(m, n, k) - FAKE.overhead)
    assert times[0] / times[1] == pytest.approx(2.0, rel=1e-9)


def test_choose_calibrates_before_planning(monkeypatch):
    calls: list = []
    monkeypatch.setattr(calibrate, "measure_machine", counting(FAKE, calls))
    plan = compile(Circuit(2, 3, 2).all_pairs())
    routes.choose(plan, "forward", 8, "cpu", torch.float32, tune=True,
                  measure=lambda thunks: {n: 1.0 for n in thunks})
    routes.choose(plan, "forward", 16, "cpu", torch.float32, tune=True,
                  measure=lambda thunks: {n: 1.0 for n in thunks})
    assert cm.current() == FAKE and len(calls) == 1  # once per process


def test_cache_empty_then_warm(cache):
    calls: list = []
    calibrate.ensure(measure=counting(FAKE, calls))
    entries = json.loads((cache / calibrate.FILE).read_text())["entries"]
    assert list(entries) == [calibrate.key()] and len(calls) == 1
    assert cm.Machine(**entries[calibrate.key()]["machine"]) == FAKE
    calibrate.forget()  # another process: only the file
    assert cm.current() == cm.SHIPPED
    assert calibrate.ensure(measure=never) == FAKE


def test_a_corrupted_cache_is_ignored_with_a_warning_and_replaced(cache):
    cache.mkdir(parents=True)
    bad_constants = {"version": 1, "entries": {calibrate.key(): {"machine": {"peak_flops": -1}}}}
    for garbage in ("{not json", json.dumps(bad_constants), "\xff\xfe"):
        (cache / calibrate.FILE).write_text(garbage)
        calibrate.forget()
        wisdom.forget()
        with pytest.warns(RuntimeWarning, match="corrupted|unreadable"):
            assert calibrate.ensure(measure=counting(FAKE, [])) == FAKE
        data = json.loads((cache / calibrate.FILE).read_text())
        assert data["entries"][calibrate.key()]["machine"]["cpu"] == "fake"


def test_a_read_only_cache_keeps_the_calibration_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert calibrate.ensure(measure=counting(FAKE, [])) == FAKE
    assert calibrate.ensure(measure=never) == FAKE  # installed for this process
    if os.geteuid() != 0:  # a directory without write permission (root writes anyway)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(ro))
        calibrate.forget()
        wisdom.forget()
        with pytest.warns(RuntimeWarning, match="not writable"):
            assert calibrate.ensure(measure=counting(FAKE, [])) == FAKE
        assert not list(ro.iterdir())


def test_tune_off_keeps_the_shipped_constants(cache, monkeypatch):
    monkeypatch.setattr(calibrate, "measure_machine", never)
    monkeypatch.setenv("QCIRCUIT_TUNE", "0")
    routes.tuning.cache_clear()  # the switch is read once per process
    try:
        routes.choose(compile(Circuit(2, 3, 2).all_pairs()), "forward", 8, "cpu", torch.float32)
    finally:
        monkeypatch.delenv("QCIRCUIT_TUNE")
        routes.tuning.cache_clear()
    assert cm.current() == cm.SHIPPED and not (cache / calibrate.FILE).exists()
    assert calibrate.ensure(tune=False, measure=never) == cm.SHIPPED


@pytest.mark.parametrize("broken", ["raises", "implausible"])
def test_what_cannot_measure_keeps_the_shipped_constants_and_caches_nothing(cache, broken):
    def measure() -> cm.Machine:
        if broken == "raises":
            raise RuntimeError("no timer here")
        return dataclasses.replace(FAKE, overhead=0.5)  # half a second per op: disturbed
    with pytest.warns(RuntimeWarning, match="shipped constants stay"):
        assert calibrate.ensure(measure=measure) == cm.SHIPPED
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
    assert machine.torch_version == torch.__version__ and machine.cpu == wisdom.cpu_model()
