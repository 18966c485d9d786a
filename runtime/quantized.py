"""Quantized base layers: what an adapter may do to a 4-bit or 8-bit weight, and how.

Supported base layers (``qcircuit[quant]`` installs the libraries):

==================================  ===========================================================
layer                               stored weight
==================================  ===========================================================
bitsandbytes ``Linear4bit``         ``Params4bit``: packed NF4/FP4 codes (two per byte) and a
(NF4, FP4; any blocksize, nested    ``QuantState`` (per-block absmax, itself 8-bit quantized
statistics, storage dtype)          when nested)
bitsandbytes ``Linear8bitLt``       ``Int8Params``: int8 codes and one float32 scale per row
(``has_fp16_weights=False``)        (``SCB``)
``nn.Linear`` quantized by          ``Int8Tensor``: int8 codes and float scales per row, per
torchao (``Int8WeightOnlyConfig``,  group or per tensor
``Int8DynamicActivationInt8...``)
==================================  ===========================================================

Any other quantized weight or layer (torchao float8/int4/intx tensors, GPTQ/AWQ/HQQ
layers, a bitsandbytes layer not yet quantized or on the meta device) is refused with a
``QCError`` naming its type.

Training never writes a quantized weight: such a layer never folds (``layer.py``), so its
stored weight ``Q0`` stays as loaded and the adapter runs beside it. Its function is
``deq(Q0)·x + b + Σ s·(T_θ − T_θ0)·x``, where ``deq(Q0)`` (the dequantized weight) plays
the part of ``W0``.

``merge`` dequantizes, adds the delta in float64 (``W_m = deq(Q0) + Δ``, the exact float
merge) and encodes ``W_m`` in the layer's own scheme (same blocksize, quant type, storage
and float dtype, granularity) two ways: with the layer's current scales kept, and with
fresh scales as the library computes them; the encoding closer to ``W_m`` is written.
With the scales kept every entry of ``deq(Q0)`` is a code point, so each merged entry lies
within ``|Δ_ij|`` of ``W_m``: the merged layer is never farther from the exact merge than
the unmerged one. :class:`MergeReport` says how far it is, normwise: ``error`` relative to
``W_m`` and ``update_error`` relative to ``Δ`` (the share of the update lost to rounding).
Merging warns when ``update_error > MERGE_WARN``; ``merge_and_unload(dtype=...)`` then
gives the exact merge as plain float layers. A fixed fraction of ``‖W_m‖`` would not do:
4-bit rounding alone is about 10 % of ``‖W‖``.

``unmerge`` writes back the original storage, which ``merge`` keeps by reference (nothing
is copied, but it stays in memory while merged): for NF4 with blocksize 64 about 0.52
bytes per weight (the codes, plus 1 byte per 64 weights of nested absmax), for 8-bit 1
byte per weight plus 4 bytes per row. Unmerge is bit-exact.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from qcircuit import QCError
from qcircuit.errors import with_article

from .quant_schemes import BNB4, BNB8, EXTRA, TORCHAO_INT8, Scheme, Storage, library, nbytes

__all__ = ["EXTRA", "MERGE_WARN", "MergeReport", "Merged", "scheme_of", "unsupported",
           "dequantized", "merge", "unmerge", "linear_like", "warn_lossy", "logical_numel"]

#: ``merge`` warns when the requantized weight misses more than this share of the update
#: (``‖deq(Q(W_m)) − W_m‖ > MERGE_WARN·‖Δ‖``).
MERGE_WARN = 0.25
SUPPORTED = ("nn.Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt and torchao "
             "Int8Tensor weights")


@dataclass(frozen=True)
class MergeReport:
    """How far a quantized layer's merged weight is from the exact float merge ``W_m``."""

    layer: str
    scheme: str
    error: float          # ‖deq(Q(W_m)) − W_m‖ / ‖W_m‖
    update_error: float   # ‖deq(Q(W_m)) − W_m‖ / ‖Δ‖ (0 when both are 0)
    scales: str           # "kept" (the layer's scales) or "new" (fresh from W_m)
    kept_bytes: int       # what the original storage held for unmerge takes
    update_ratio: float = 0.0   # ‖Δ‖ / ‖W0‖

    @property
    def lossy(self) -> bool:
        return self.update_error > MERGE_WARN

    def __str__(self) -> str:
        return (f"{self.layer} ({self.scheme}): {self.error:.2e} of the weight, "
                f"{100 * self.update_error:.1f} % of the update ({self.scales} scales)")


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


@dataclass(frozen=True)
class Merged:
    """What ``unmerge`` needs: the report and the original storage (references)."""

    report: MergeReport
    original: Storage = field(repr=False)


_FOREIGN = ("qweight", "qzeros", "W_q", "_packed_params")   # GPTQ/AWQ/Marlin, HQQ, torch.ao


def _from(obj: Any, package: str) -> bool:
    return type(obj).__module__.split(".")[0] == package


def scheme_of(module: nn.Module, where: str = "layer") -> Scheme | None:
    """The scheme of a quantized linear layer, ``None`` for a plain floating-point weight;
    a ``QCError`` naming the type for anything else."""
    weight = getattr(module, "weight", None)
    if _from(module, "bitsandbytes") or _from(weight, "bitsandbytes"):
        bnb = library("bitsandbytes")
        scheme = (BNB4 if isinstance(module, bnb.nn.Linear4bit) else
                  BNB8 if isinstance(module, bnb.nn.Linear8bitLt) else None)
        if scheme is None:
            raise QCError(f"{where}: bitsandbytes {type(module).__name__} layers are not "
                          f"supported (supported: {SUPPORTED})")
    elif _from(weight, "torchao"):
        ao = library("torchao.quantization")
        if not isinstance(weight, ao.Int8Tensor):
            raise QCError(f"{where}: torchao {type(weight).__name__} weights are not supported "
                          f"(supported: {SUPPORTED})")
        scheme = TORCHAO_INT8
    elif weight is not None and (not _from(weight, "torch") or not weight.is_floating_point()):
        raise QCError(f"{where}: its weight is {with_article(type(weight).__name__)} of "
                      f"{weight.dtype}, "
                      f"not a supported quantized type (supported: {SUPPORTED})")
    else:
        return None
    if weight.is_meta:
        raise QCError(f"{where}: a quantized weight ({type(weight).__name__}) on the meta "
                      "device cannot be adapted: load the quantized model with its weights")
    scheme.check(module, where)
    return scheme


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot carry an adapter if it is a quantized layer qcircuit does not
    support (for ``bind``'s message), else ``None``."""
    if isinstance(module, nn.Linear) or _from(module, "bitsandbytes"):
        try:
            scheme_of(module, type(module).__name__)
        except QCError as e:
            return e.message
        return None
    if any(hasattr(module, a) for a in _FOREIGN):
        return (f"{type(module).__name__} is a quantized layer type qcircuit does not "
                f"support (supported: {SUPPORTED})")
    return None


# --- reading, merging, exporting ------------------------------------------------------------
def dequantized(module: nn.Module, scheme: Scheme) -> torch.Tensor:
    """A quantized layer's weight as it computes with it, float64 (out, in)."""
    return scheme.decode(module, scheme.read(module)).double()


@dataclass(frozen=True)
class Planned:
    """A quantized layer's planned state change: the storage to write and, after a merge,
    what unmerge will need (None after an unmerge)."""

    storage: Storage = field(repr=False)
    merged: Merged | None


def plan_merge(module: nn.Module, scheme: Scheme, delta: torch.Tensor, where: str) -> Planned:
    """The layer's own encoding of ``deq(Q0) + delta`` (float64), the closer of kept and
    fresh scales, with its report; nothing is written."""
    original = scheme.read(module)
    w0 = scheme.decode(module, original).double()
    target = w0 + delta.to(_device(original))
    if not bool(torch.isfinite(target).all()):
        raise QCError(f"{where}: the merged weight would be non-finite; the base weight is "
                      "left untouched")
    best = None
    for keep in (True, False):
        candidate = scheme.encode(module, original, target, keep)
        gap = _norm(scheme.decode(module, candidate).double() - target)
        if best is None or gap < best[0]:
            best = (gap, keep, candidate)
    gap, keep, encoded = best
    norm_w, norm_d, norm_0 = _norm(target), _norm(delta), _norm(w0)
    report = MergeReport(where, scheme.describe(module), gap / norm_w if norm_w else 0.0,
                         gap / norm_d if norm_d else (0.0 if gap == 0 else math.inf),
                         "kept" if keep else "new", nbytes(original),
                         norm_d / norm_0 if norm_0 else math.inf)
    return Planned(encoded, Merged(report, original))


def _device(s: Storage) -> torch.device:
    return next(v for v in s.values() if torch.is_tensor(v)).device


def plan_unmerge(module: nn.Module, scheme: Scheme, merged: Merged | None, where: str) -> Planned:
    """Writing back the storage ``merge`` replaced, bit for bit; nothing is written."""
    if merged is None:
        raise QCError(f"{where}: the original quantized weight is not in memory (the merged "
                      "state came from a state dict): reload the quantized base model")
    device = _device(scheme.read(module))
    if _device(merged.original) != device:
        raise QCError(f"{where}: the layer moved to {device} after merging; move it back to "
                      f"{_device(merged.original)} to unmerge")
    return Planned(merged.original, None)


def write(module: nn.Module, scheme: Scheme, planned: Planned) -> None:
    """Write a planned merge or unmerge into the layer's storage."""
    scheme.write(module, planned.storage)


def linear_like(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype,
                transposed: bool = False) -> nn.Module:
    """A plain layer in ``dtype`` with ``weight`` (float64, (out, in)) and ``module``'s bias:
    an ``nn.Linear``, or a ``Conv1D`` for a ``Conv1D`` base."""
    n_out, n_in = weight.shape
    bias = getattr(module, "bias", None)
    if transposed:
        from transformers.pytorch_utils import Conv1D
        layer = Conv1D(n_out, n_in).to(device=weight.device, dtype=dtype)
        weight = weight.t()
    else:
        layer = nn.Linear(n_in, n_out, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
    return layer.train(module.training).requires_grad_(False)


def warn_lossy(reports: Mapping[str, MergeReport], stacklevel: int = 3,
               named: bool = True) -> None:
    """One warning when merged layers lost more than ``MERGE_WARN`` of their update to
    requantization, naming them (``named``) or, for a caller that merges one layer at a
    time, in words that stay the same so Python shows it once."""
    lossy = [r for r in reports.values() if r.lossy]
    if not lossy:
        return
    which = "some quantized layers (each layer's report says how much)"
    if named:
        which = (f"{len(lossy)} of {len(reports)} quantized layers ("
                 + "; ".join(str(r) for r in lossy[:3])
                 + (f"; and {len(lossy) - 3} more" if len(lossy) > 3 else "") + ")")
    warnings.warn(f"requantizing the merged weights lost more than {MERGE_WARN:.0%} of the "
                  f"adapter's update in {which}; the unmerged adapter is exact, and "
                  "merge_and_unload(dtype=torch.bfloat16) exports the exact merge as plain "
                  "layers", stacklevel=stacklevel)


def logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for (a 4-bit one packs two per byte)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None and _from(p, "bitsandbytes") \
        else p.numel()
