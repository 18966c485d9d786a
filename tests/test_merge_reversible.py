"""Reversible means reversible (issue 22, case 3).

``merge()`` computes, before writing anything, exactly what ``unmerge()`` would give back
and refuses unless it is within ``MERGE_ROUNDING·eps`` of the weight before the merge
(normwise, ``eps`` of the weight's dtype); ``merge_and_unload()`` needs no unmerge and
stays allowed. Updates far larger than the base weight are reported at save, load and
merge. The issue's reproduction: four SGD steps at learning rate 1e4 on a tiny LLaMA give
finite gates in the thousands; merge + unmerge then used to leave ``|W − W0| ≈ 1000`` on
weights of about 0.08.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from qcircuit import QCError, parse
from qcircuit.runtime import attach
from qcircuit.runtime.weights import MERGE_ROUNDING, merge_bound, reversal_error
from test_doors import DOORS, assert_unchanged, snapshot
from test_peft import PROGRAM, logits, rel

DIVERGED = r"more than 10 times the base weight"


def train(make_llama, token_ids, lr: float, steps: int = 4, dtype=torch.float32):
    """``steps`` of plain SGD on the language-model loss of the tiny LLaMA."""
    model = make_llama().to(dtype)
    adapted = attach(model, parse(PROGRAM), seed=0)
    optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        adapted(input_ids=token_ids, labels=token_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return adapted


def weights(adapted) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in adapted.layers.items()}


def test_the_bound_admits_any_update_up_to_the_weights_size():
    """Exactly what unmerge gives back, for random weights and updates of a given size:
    within the bound up to ‖Δ‖ = ‖W‖ in every dtype, far outside it at 1000 times."""
    gen = torch.Generator().manual_seed(0)
    w64 = torch.randn(96, 64, generator=gen, dtype=torch.float64) * 0.05
    d = torch.randn(96, 64, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = w64.to(dtype)
        for ratio, ok in ((0.0, True), (0.1, True), (1.0, True), (1000.0, False)):
            step = d * (ratio * torch.linalg.norm(w.double()) / torch.linalg.norm(d))
            merged = (w.double() + step).to(dtype)
            error = reversal_error(w, merged, step)
            assert (error <= merge_bound(dtype)) == ok, (dtype, ratio, error)
        assert reversal_error(w, w.clone(), torch.zeros_like(w64)) == 0.0
    assert merge_bound(torch.float32) == MERGE_ROUNDING * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_gives_the_weights_back_within_the_bound(make_llama, token_ids,
                                                                     dtype):
    adapted = train(make_llama, token_ids, lr=1e-2, dtype=dtype)
    before = weights(adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a sane update is not reported
        adapted.merge()
    adapted.unmerge()
    for name, w in weights(adapted).items():
        assert rel(w, before[name]) <= merge_bound(dtype), name


def test_a_diverged_run_saves_with_a_warning_and_its_merge_is_refused(make_llama, token_ids,
                                                                      tmp_path):
    adapted = train(make_llama, token_ids, lr=1e4)
    gates = torch.cat([g.detach().reshape(-1) for g in adapted.trainable_parameters()])
    assert bool(torch.isfinite(gates).all()) and float(gates.abs().max()) > 100
    with pytest.warns(UserWarning, match=f"saving: the adapter's update is {DIVERGED}"):
        adapted.save(tmp_path / "c")              # saved as it is: a checkpoint of the run
    model, before = adapted.model, snapshot(adapted.model)
    with pytest.raises(QCError, match=r"merge\(\) refused: unmerge\(\) could not give this "
                                      r"layer's base weight back .* nothing was written\. Use "
                                      r"merge_and_unload\(\)"):
        adapted.merge()
    assert_unchanged(model, before)
    assert not adapted.merged
    with pytest.warns(UserWarning, match=DIVERGED):
        plain = adapted.merge_and_unload()     # merging for good needs no unmerge
    assert not any(type(m).__name__ == "AdaptedLayer" for m in plain.modules())


def test_a_diverged_checkpoint_is_reported_by_every_door(make_llama, token_ids, tmp_path):
    adapted = train(make_llama, token_ids, lr=1e4)
    with pytest.warns(UserWarning):
        adapted.save(tmp_path / "c")
    for door, call in DOORS.items():
        with pytest.warns(UserWarning, match=f"loading: the adapter's update is {DIVERGED}"):
            call(make_llama(), tmp_path / "c")


def test_peft_merge_of_a_diverged_adapter_is_refused_and_merge_and_unload_is_not(
        make_llama, token_ids, tmp_path):
    from peft import PeftModel
    adapted = train(make_llama, token_ids, lr=1e4)
    with pytest.warns(UserWarning):
        adapted.save(tmp_path / "c")
    with pytest.warns(UserWarning, match=DIVERGED):
        model = PeftModel.from_pretrained(make_llama(), tmp_path / "c")
    want = logits(model, token_ids)
    before = snapshot(model)
    with pytest.raises(QCError, match=r"merge\(\) refused"):
        model.merge_adapter()
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match=DIVERGED):
        plain = model.merge_and_unload()
    got = logits(plain, token_ids)
    assert bool(torch.isfinite(got).all()) and rel(got, want) <= 1e-3
