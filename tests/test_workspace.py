"""Workspace buffers: huge-page advice on fresh large CPU buffers, recycling."""
from __future__ import annotations

import pytest
import torch

from qcircuit.compiler import workspace
from qcircuit.compiler.workspace import ALWAYS_MAPPED, HUGE_PAGE, Workspace, fresh


@pytest.fixture
def advice(monkeypatch):
    """Record madvise calls instead of making them."""
    calls = []

    def record(start, length, flag):
        calls.append((start, length, flag))
        return 0
    monkeypatch.setattr(workspace, "_madvise", lambda: record)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_buffer_is_advised_inside_its_own_aligned_pages(advice, dtype):
    like = torch.empty(0, dtype=dtype)
    numel = ALWAYS_MAPPED // like.element_size() + 5  # start and end seldom aligned
    buf = fresh(numel, like)
    assert buf.shape == (numel,) and buf.dtype == dtype
    [(start, length, flag)] = advice
    begin, end = buf.data_ptr(), buf.data_ptr() + numel * buf.element_size()
    assert flag == workspace.MADV_HUGEPAGE
    assert start % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and length > 0
    assert begin <= start and start + length <= end
    assert start - begin < HUGE_PAGE and end - (start + length) < HUGE_PAGE  # no page left out


def test_small_buffer_is_not_advised(advice):
    numel = ALWAYS_MAPPED // 4 - 1  # glibc recycles this size from its heap
    buf = fresh(numel, torch.empty(0))
    assert buf.numel() == numel and not advice


def test_workspace_advises_only_on_a_miss(advice):
    ws, like = Workspace(), torch.empty(0)
    a = ws.take(ALWAYS_MAPPED // 4, like)
    ws.give(a)
    assert ws.take(ALWAYS_MAPPED // 4, like) is a
    assert len(advice) == 1


def test_real_advice_leaves_the_buffer_usable():
    n = ALWAYS_MAPPED // 4  # 32 MiB, advised for real where Linux allows it
    buf = fresh(n, torch.empty(0))
    buf.copy_(torch.arange(n, dtype=torch.float32))
    assert buf[-1].item() == n - 1 and buf.double().sum().item() == n * (n - 1) / 2
