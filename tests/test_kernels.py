"""Generated permute kernels (compiler/kernels.py): the same bits as the ATen copy, one kernel
per pattern for every token count, a schedule that uses them still exact with gradients, and a
clean fallback when compiling fails or is switched off."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import kernels
from qcircuit.compiler.schedule import build_schedule
from qcircuit.compiler.schedule_exec import Workspace, run_schedule
from reference import circuit_operator


# inductor builds its kernels with this compiler; without one every copy falls back to ATen
HAVE_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None


@pytest.fixture
def small_kernels(monkeypatch):
    """Generated kernels for every copy, however small, and a fresh kernel table."""
    monkeypatch.setenv("QCIRCUIT_COMPILE", "1")
    monkeypatch.setattr(kernels, "MIN_NUMEL", 1)
    monkeypatch.setattr(kernels, "_kernels", {})
    return kernels


def test_generated_permute_is_bit_exact_and_shared_across_token_counts(small_kernels):
    perm = (3, 0, 2, 1)  # token axis (0 in the source) ends up second
    for tokens in (5, 9):
        src = torch.randn(tokens, 4, 3, 2)
        dst = torch.empty(2, tokens, 3, 4)
        with torch.no_grad():
            kernels.permute_into(dst, src, perm, token_axis=0)
        assert torch.equal(dst, src.permute(perm))
    assert len(kernels._kernels) == 1  # one dynamic-size kernel served both token counts
    compiled = kernels._kernels[((-1, 4, 3, 2), perm, torch.float32)] is not kernels._ATEN
    assert compiled == HAVE_COMPILER


def test_schedule_with_generated_permutes_matches_reference_with_gradients(small_kernels, monkeypatch):
    c = Circuit(4, 3, 2).gate((0, 2)).gate((1, 0), out=(2, 5)).gate((2, 1))
    sched = build_schedule(c, 6, fuse=False)
    assert any(s.kind == "permute" for s in sched.steps)
    gen = torch.Generator().manual_seed(0)
    gates = [torch.randn(g.shape, generator=gen, dtype=torch.float64, requires_grad=True)
             for g in c.gates]
    x = torch.randn(6, c.in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, c.out_features, generator=gen, dtype=torch.float64)

    def step():
        y = run_schedule(sched, x, gates, Workspace())
        return [y.detach(), *torch.autograd.grad(y, [x, *gates], gy)]
    got = step()
    assert any(k is not kernels._ATEN for k in kernels._kernels.values()) == HAVE_COMPILER
    want = x.detach() @ circuit_operator(c, gates).T
    assert (got[0] - want).abs().max() < 1e-12
    monkeypatch.setenv("QCIRCUIT_COMPILE", "0")
    for a, b in zip(got, step()):  # copies are exact: output and every gradient, bit for bit
        assert torch.equal(a, b)
    monkeypatch.setenv("QCIRCUIT_COMPILE", "1")
    assert torch.autograd.gradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))


def test_failed_compile_falls_back_to_aten_with_one_warning(small_kernels, monkeypatch):
    def broken():
        def kernel(*args):
            raise RuntimeError("no C++ compiler")
        return kernel
    monkeypatch.setattr(kernels, "_compile", broken)
    src, dst = torch.randn(3, 4, 5), torch.empty(5, 3, 4)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="ATen copy"):
        kernels.permute_into(dst, src, (2, 0, 1), token_axis=0)
    assert torch.equal(dst, src.permute(2, 0, 1))
    with torch.no_grad():  # the key is marked: no second attempt, no second warning
        kernels.permute_into(dst, src + 1, (2, 0, 1), token_axis=0)
    assert torch.equal(dst, (src + 1).permute(2, 0, 1))
    assert list(kernels._kernels.values()) == [kernels._ATEN]


def test_switched_off_small_or_under_autograd_uses_aten(small_kernels, monkeypatch):
    src, dst = torch.randn(4, 3, 2), torch.empty(2, 4, 3)
    monkeypatch.setenv("QCIRCUIT_COMPILE", "0")
    with torch.no_grad():
        kernels.permute_into(dst, src, (2, 0, 1), token_axis=0)
    monkeypatch.setenv("QCIRCUIT_COMPILE", "1")
    kernels.permute_into(dst, src, (2, 0, 1), token_axis=0)  # grad mode on: plain copy
    monkeypatch.setattr(kernels, "MIN_NUMEL", 1 << 20)
    with torch.no_grad():
        kernels.permute_into(dst, src, (2, 0, 1), token_axis=0)
    assert torch.equal(dst, src.permute(2, 0, 1)) and kernels._kernels == {}
    assert not kernels.uses_kernel(1 << 21, torch.device("meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aten_copy_moves_kept_runs_as_wide_elements_bit_exactly(dtype):
    """A permute whose innermost axis stays innermost (8 or 16 bytes) moves each run as one
    int64/complex128 element: every bit pattern, NaN payloads included, arrives unchanged."""
    cases = [((3, 5, 2, 8, 4), (0, 3, 2, 1, 4)), ((6, 4, 1, 2), (1, 0, 2, 3)),
             ((2, 3, 5, 2), (2, 1, 0, 3)), ((4, 6, 3), (1, 0, 2)), ((5, 7), (1, 0))]
    isz = torch.empty((), dtype=dtype).element_size()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[isz]
    widened = 0
    for shape, perm in cases:
        bits = torch.randint(-2**(8 * isz - 1), 2**(8 * isz - 1) - 1, shape, dtype=ints)
        src = bits.view(dtype)
        dst = torch.empty([shape[a] for a in perm], dtype=dtype)
        widened += kernels.wide_run(shape, perm, isz) is not None
        with torch.no_grad():
            kernels.permute_into(dst, src, perm)
        assert torch.equal(dst.view(ints), bits.permute(perm))
    assert widened == {4: 3, 2: 1, 8: 2}[isz]


def test_coalesce_merges_axes_that_move_together():
    assert kernels.coalesce((7, 16, 8, 8, 4), (0, 1, 3, 2, 4)) == ((112, 8, 8, 4), (0, 2, 1, 3))
    assert kernels.coalesce((7, 1, 8, 4), (1, 3, 0, 2)) == ((56, 4), (1, 0))
    assert kernels.coalesce((2, 3, 4), (0, 1, 2)) == ((24,), (0,))
    assert kernels.coalesce((1, 1), (1, 0)) == ((), ())
