"""Small schedules run on the calling thread alone (compiler/threads.py), thread-locally."""
from __future__ import annotations

import threading

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import costmodel as cm
from qcircuit.compiler import schedule_exec, threads
from qcircuit.compiler.schedule import build_schedule
from qcircuit.compiler.schedule_exec import Workspace, run_schedule
from reference import circuit_operator, rel_err

needs_knobs = pytest.mark.skipif(threads._knobs() is None,
                                 reason="torch's OpenMP runtime offers no thread-local setting")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_knobs
def test_serial_is_thread_local_and_restores_even_on_error(two_threads):
    seen = []
    with pytest.raises(RuntimeError):
        with threads.serial():
            seen.append(torch.get_num_threads())
            other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            other.start()
            other.join()
            raise RuntimeError("boom")
    assert seen == [1, 2]  # this thread serial, a thread started inside it is not
    assert torch.get_num_threads() == 2


def test_serial_does_nothing_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threads.serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@needs_knobs
@pytest.mark.parametrize("serial_numel", [0, 1 << 16])
def test_schedule_runs_serial_below_the_threshold_with_the_same_numbers(
        two_threads, monkeypatch, serial_numel):
    c = Circuit(4, 3, 2).gate((0, 2)).gate((1, 0), out=(2, 5)).gate((2, 1))
    tokens = 6
    sched = build_schedule(c, tokens, fuse=False)
    monkeypatch.setattr(cm, "SERIAL_NUMEL", serial_numel)
    counts = []
    forward, backward = schedule_exec._apply, schedule_exec._apply_back

    def spy(real):
        def step(*args):
            counts.append(torch.get_num_threads())
            return real(*args)
        return step
    monkeypatch.setattr(schedule_exec, "_apply", spy(forward))
    monkeypatch.setattr(schedule_exec, "_apply_back", spy(backward))
    gen = torch.Generator().manual_seed(1)
    gates = [torch.randn(g.shape, generator=gen, dtype=torch.float64, requires_grad=True)
             for g in c.gates]
    x = torch.randn(tokens, c.in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(tokens, c.out_features, generator=gen, dtype=torch.float64)
    y = run_schedule(sched, x, gates, Workspace())
    got = torch.autograd.grad(y, [x, *gates], gy)
    with torch.no_grad():
        run_schedule(sched, x, gates, Workspace())
    small = serial_numel > 0
    assert counts and set(counts) == {1 if small else 2}  # forward, backward and no-grad
    assert torch.get_num_threads() == 2
    op = circuit_operator(c, gates)
    assert rel_err(y, x.detach() @ op.T) < 1e-12
    assert rel_err(got[0], gy @ op) < 1e-12
    assert torch.autograd.gradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))
