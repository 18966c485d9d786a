"""The numbers behind "reversible" and "unreasonable" for an adapter's weight moves.

``merge`` adds the update ``Δ`` to the base weight ``W`` (float64, rounded once to ``W``'s
dtype) and ``unmerge`` subtracts it again the same way. Each rounding moves an entry by at
most half an ulp of its value, so ``unmerge`` returns ``W`` up to about
``½eps·(‖W + Δ‖ + ‖W‖)``: within rounding when ``Δ`` is of the size of ``W`` or smaller, and
not at all when ``Δ`` dwarfs ``W`` (a diverged run: rounding ``W + Δ`` erases ``W``).
:func:`reversal_error` computes exactly what ``unmerge`` would give, before ``merge``
writes anything; ``merge`` is refused when it exceeds :func:`merge_bound`,
``MERGE_ROUNDING·eps`` of ``‖W‖`` (normwise, Frobenius; ``eps`` of ``W``'s dtype). Any
``‖Δ‖`` up to ``‖W‖`` passes with room (at worst ``1.5·eps``; measured on random weights,
``0.3·eps``); refusals start between ``‖Δ‖ ≈ 6‖W‖`` (every rounding at its worst) and
``≈ 19‖W‖`` (measured: the error grows as about ``0.21·eps·‖Δ‖/‖W‖``, in float32 and
bfloat16 alike).

An update larger than ``LARGE_UPDATE`` times the base weight (Frobenius norms) is
reported with a warning at ``merge`` (exactly), and at ``save`` and ``load`` (estimated
from a few random probes, ``AdaptedLayer.update_ratio``, so neither multiplies out a dense
operator).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch

from qcircuit import Circuit, QCError

from . import quantized

__all__ = ["MERGE_ROUNDING", "LARGE_UPDATE", "merge_bound", "reversal_error",
           "warn_large_updates", "apply_circuit", "full_tensor", "update_ratio"]

#: ``unmerge`` must give ``W`` back within ``MERGE_ROUNDING·eps·‖W‖`` (Frobenius).
MERGE_ROUNDING = 4
#: An update ``‖Δ‖ > LARGE_UPDATE·‖W0‖`` is reported: training probably diverged.
LARGE_UPDATE = 10.0


def merge_bound(dtype: torch.dtype) -> float:
    """The relative (normwise) error ``unmerge`` may leave in a weight of ``dtype``."""
    return MERGE_ROUNDING * torch.finfo(dtype).eps


def reversal_error(weight: torch.Tensor, merged: torch.Tensor, step: torch.Tensor) -> float:
    """``‖unmerge(merge(W)) − W‖ / ‖W‖``: ``merged`` is ``W + step`` rounded to ``W``'s
    dtype; unmerge subtracts the same float64 ``step`` and rounds again."""
    back = (merged.double() - step).to(weight.dtype)
    w = weight.double()
    error = torch.linalg.norm(back.double() - w)
    size = torch.linalg.norm(w)
    if size == 0:
        return 0.0 if error == 0 else float("inf")
    return float(error / size)


def warn_large_updates(ratios: Mapping[str, float | None], when: str = "merging") -> None:
    """One warning naming the layers whose ``‖Δ‖/‖W0‖`` exceeds ``LARGE_UPDATE``."""
    large = sorted(((r, name) for name, r in ratios.items() if r is not None and r > LARGE_UPDATE),
                   reverse=True)
    if not large:
        return
    worst, name = large[0]
    warnings.warn(f"{when}: the adapter's update is more than {LARGE_UPDATE:g} times the base "
                  f"weight in {len(large)} layer(s) (largest {worst:.3g} times, in {name}): "
                  "training probably diverged (a learning rate too high?)", stacklevel=3)


def apply_circuit(circuit: Circuit, gates: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``T·x`` for the rows of ``x`` (``k × in_features``): each gate contracted with its
    qudits' axes in turn, first gate first (the dense reference's order, no planning)."""
    h = x.reshape(x.shape[0], *circuit.in_dims)
    for spec, gate in zip(circuit.gates, gates):
        axes = [q + 1 for q in spec.qudits]
        n = len(axes)
        h = torch.tensordot(h, gate, dims=(axes, list(range(n, 2 * n))))
        h = torch.movedim(h, list(range(h.dim() - n, h.dim())), axes)
    return h.reshape(x.shape[0], -1)


def full_tensor(t: torch.Tensor, shape: torch.Size | tuple[int, ...], what: str) -> torch.Tensor:
    """``t`` as one whole local tensor: a DTensor is gathered (a collective: every rank must
    call); a flattened shard (FSDP1) is refused with what to do instead."""
    if hasattr(t, "full_tensor") and hasattr(t, "device_mesh"):  # a DTensor (FSDP2, TP)
        t = t.full_tensor()
    if tuple(t.shape) != tuple(shape):
        raise QCError(f"{what} is sharded (shape {tuple(t.shape)}, expected {tuple(shape)}): "
                      "with FSDP1 call this inside `FullyShardedDataParallel.summon_full_params"
                      "(wrapped_model, writeback=True)`")
    return t.detach()


@torch.no_grad()
def update_ratio(layer, name: str, tensors: Mapping[str, torch.Tensor],
                 probes: int = 8) -> float | None:
    """``‖Δ‖_F / ‖W0‖_F`` of an ``AdaptedLayer`` estimated from ``probes`` fixed Gaussian
    vectors ``x`` (``E‖M·x‖² = ‖M‖_F²``), with its checkpoint ``tensors`` (saved as
    ``name``); None on the meta device. Cheap: no dense operator is formed."""
    if layer.is_meta:
        return None
    gates: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, k, part, i in layer._saved_gates(name):
        gates.setdefault((k, part), {})[i] = tensors[key].double()
    x = torch.randn(probes, layer.branches[0].circuit.in_features, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    delta, folded = 0.0, 0.0
    for k, b in enumerate(layer.branches):
        def run(part: str) -> torch.Tensor:
            return apply_circuit(b.circuit, [g for _, g in sorted(gates[k, part].items())], x)
        t0 = run("frozen") if b.frozen is not None else 0.0
        delta = delta + b.scale * (run("adapter") - t0)
        folded = folded + (b.scale * t0 if b.foldable else 0.0)
    if layer.quant is not None:   # a quantized base: the weight it computes with
        w = quantized.dequantized(layer.base_layer, layer.quant)
        wx = (x.to(w.device) @ w.t()).cpu()
    else:
        weight = layer.base_layer.weight
        w = full_tensor(weight, weight.shape, f"{layer.name}: base weight")
        wx = (x.to(w.device, w.dtype) @ (w if layer.transposed else w.t())).double().cpu()
    w0x = wx - {"unfolded": 0.0, "folded": -folded, "merged": delta}[layer.state.value]
    size = torch.linalg.norm(torch.as_tensor(w0x))
    return float(torch.linalg.norm(torch.as_tensor(delta)) /
                 size.clamp_min(torch.finfo(torch.float64).tiny))
