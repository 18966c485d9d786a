"""The storage formats of quantized weights: how each is read, decoded, encoded and written.

One stateless scheme per supported kind (``quantized.py`` decides which applies and what
merging does): bitsandbytes 4-bit (``Params4bit`` codes, two per byte, and a
``QuantState``), bitsandbytes int8 (``Int8Params`` codes and per-row ``SCB``) and torchao's
``Int8Tensor`` (codes and scales per row, group or tensor). A *storage* is a mapping of a
weight's stored parts (tensors, and bitsandbytes' ``QuantState``) by name. ``read`` takes
references, ``write`` swaps them into the layer's own weight object (the Parameter stays
the same object), ``decode`` dequantizes, and ``encode`` quantizes a float weight in the
layer's scheme, either on the scales of a given storage (``keep``) or on fresh scales
computed as the library computes them.
"""
from __future__ import annotations

import copy
import importlib
from typing import Any, Mapping

import torch
from torch import nn

from qcircuit import QCError

EXTRA = "pip install 'qcircuit[quant]'"
Storage = Mapping[str, Any]   # a quantized weight's stored parts, by name


def library(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise QCError(f"this layer is quantized by {name}, which cannot be imported ({e}): "
                      f"{EXTRA}") from None


# --- the schemes ----------------------------------------------------------------------------
class Scheme:
    """How one kind of quantized weight is read, decoded, encoded and written (stateless)."""

    name = "?"

    def check(self, module: nn.Module, where: str) -> None:
        """QCError if this module cannot be adapted."""

    def describe(self, module: nn.Module) -> str:
        return self.name

    def read(self, module: nn.Module) -> Storage:
        raise NotImplementedError

    def write(self, module: nn.Module, s: Storage) -> None:
        raise NotImplementedError

    def decode(self, module: nn.Module, s: Storage) -> torch.Tensor:
        """The weight ``s`` stands for, (out, in), float."""
        raise NotImplementedError

    def encode(self, module: nn.Module, s: Storage, w: torch.Tensor, keep: bool) -> Storage:
        """``w`` in this module's scheme: on the scales of ``s`` (``keep``) or fresh ones."""
        raise NotImplementedError


def nbytes(obj: Any, depth: int = 0) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, a mapping, or an object's attributes)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if depth > 2 or obj is None or isinstance(obj, (int, float, str, bool, torch.dtype)):
        return 0
    items = obj.values() if isinstance(obj, Mapping) else vars(obj).values() \
        if hasattr(obj, "__dict__") else ()
    return sum(nbytes(v, depth + 1) for v in items)


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the code point nearest each of ``values`` (values in [-1, 1]),
    by the midpoints of the sorted code, as bitsandbytes encodes."""
    order = torch.argsort(code)
    ranked = code[order]
    return order[torch.bucketize(values, (ranked[:-1] + ranked[1:]) / 2)]


class _Bnb4(Scheme):
    name = "bitsandbytes 4-bit"

    def check(self, module, where):
        bnb = library("bitsandbytes")
        w = module.weight
        if w.is_meta or not isinstance(w, bnb.nn.Params4bit) or w.quant_state is None:
            raise QCError(f"{where}: a bitsandbytes {type(module).__name__} whose weight is not "
                          f"quantized ({type(w).__name__} {w.dtype} on {w.device}): load the "
                          "model with its weights on a device (bitsandbytes quantizes as it "
                          "moves them there)")

    def describe(self, module):
        qs = module.weight.quant_state
        return f"bitsandbytes {qs.quant_type} blocksize {qs.blocksize}"

    def read(self, module):
        return {"data": module.weight.data, "quant_state": module.weight.quant_state}

    def write(self, module, s):
        module.weight.data = s["data"]
        module.weight.quant_state = s["quant_state"]
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = s["quant_state"]

    @staticmethod
    def _canonical(s: Storage):
        """Codes and state in bitsandbytes' portable layout: an eval forward on an AVX512-BF16
        CPU repacks them for its kernel; a copy is turned back as bitsandbytes saves it."""
        data, qs = s["data"], s["quant_state"]
        if getattr(qs, "packing_format_for_cpu", False):
            import bitsandbytes.functional as F
            data, qs = F._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        return data, qs

    def decode(self, module, s):
        import bitsandbytes.functional as F
        data, qs = self._canonical(s)
        return F.dequantize_4bit(data, qs)

    def encode(self, module, s, w, keep):
        import bitsandbytes.functional as F
        data, qs = self._canonical(s)
        if not keep:
            packed, state = F.quantize_4bit(w.to(qs.dtype), blocksize=qs.blocksize,
                                            compress_statistics=qs.nested,
                                            quant_type=qs.quant_type, quant_storage=data.dtype)
            return {"data": packed, "quant_state": state}
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        flat = w.to(qs.dtype).float().reshape(-1)
        scale = absmax.float().repeat_interleave(qs.blocksize)[:flat.numel()]
        codes = _nearest((flat / scale.clamp(min=1e-38)).clamp(-1, 1), qs.code.to(flat.device))
        codes = codes.to(torch.uint8)
        if codes.numel() % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        packed = ((codes[::2] << 4) | codes[1::2]).view(data.dtype).reshape(data.shape)
        return {"data": packed, "quant_state": copy.deepcopy(qs)}


class _Bnb8(Scheme):
    name = "bitsandbytes int8"

    def check(self, module, where):
        library("bitsandbytes")
        w = module.weight
        if module.state.has_fp16_weights or w.dtype != torch.int8 or self._scb(module) is None:
            raise QCError(f"{where}: a bitsandbytes Linear8bitLt that holds {w.dtype} weights "
                          f"(has_fp16_weights={module.state.has_fp16_weights}): only quantized "
                          "ones (has_fp16_weights=False, moved to their device) are supported")

    @staticmethod
    def _scb(module):
        """The row scales: on the weight until the first forward, then on the layer's state."""
        scb = getattr(module.weight, "SCB", None)
        return module.state.SCB if scb is None else scb

    def read(self, module):
        return {"data": module.weight.data, "SCB": self._scb(module)}

    def write(self, module, s):
        on_state = module.state.SCB is not None
        on_weight = getattr(module.weight, "SCB", None) is not None or not on_state
        module.weight.data = s["data"]
        if on_weight:
            module.weight.CB, module.weight.SCB = s["data"], s["SCB"]
        if on_state:
            module.state.CB, module.state.SCB = s["data"], s["SCB"]

    def decode(self, module, s):
        import bitsandbytes.functional as F
        return F.int8_vectorwise_dequant(s["data"], s["SCB"])

    def encode(self, module, s, w, keep):
        import bitsandbytes.functional as F
        if not keep:   # as Int8Params quantizes: from float16, row-wise absmax
            codes, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            return {"data": codes, "SCB": scb}
        scb = s["SCB"].float()
        codes = torch.round(w.float() * (127.0 / scb.clamp(min=1e-38)).unsqueeze(1))
        return {"data": codes.clamp(-127, 127).to(torch.int8), "SCB": scb.clone()}


class _TorchaoInt8(Scheme):
    name = "torchao int8"

    def check(self, module, where):
        w = module.weight
        if w.dim() != 2 or any(getattr(w, k, None) is not None
                               for k in ("act_quant_scale", "act_pre_scale")):
            raise QCError(f"{where}: a torchao Int8Tensor with static activation scales or "
                          f"{w.dim()} dims is not supported (only 2-D weights quantized by "
                          "Int8WeightOnlyConfig or Int8DynamicActivationInt8WeightConfig)")
        zero = getattr(w, "zero_point", None)
        if zero is not None and bool(zero.any()):
            raise QCError(f"{where}: a torchao Int8Tensor with nonzero zero points (asymmetric) "
                          "is not supported")

    def describe(self, module):
        rows, cols = module.weight.block_size
        n_out, n_in = module.weight.shape
        what = ("per tensor" if (rows, cols) == (n_out, n_in) else "per row" if cols == n_in
                else f"per group of {cols}")
        return f"torchao int8 {what}"

    def read(self, module):
        w = module.weight
        return {k: getattr(w, k) for k in w.__tensor_flatten__()[0]}

    def write(self, module, s):
        for k, t in s.items():   # the same Parameter object: only its inner tensors change
            setattr(module.weight, k, t)

    def _tensor(self, module, s):
        w = module.weight
        names, meta = w.__tensor_flatten__()
        return type(w).__tensor_unflatten__(dict(s), meta, w.shape, w.stride())

    def decode(self, module, s):
        return self._tensor(module, s).dequantize()

    def encode(self, module, s, w, keep):
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
        current = module.weight
        rows, cols = current.block_size
        granularity = (PerTensor() if (rows, cols) == tuple(current.shape) else
                       PerRow() if cols == current.shape[1] else PerGroup(cols))
        kept = {"scale": s["scale"], "zero_point": s.get("zero_point")} if keep else {}
        new = type(current).from_hp(w.to(current.dtype), granularity=granularity,
                                    act_quant_kwargs=current.act_quant_kwargs,
                                    reduce_range=current.reduce_range, **kept)
        return {k: getattr(new, k) for k in new.__tensor_flatten__()[0]}


_BNB4, _BNB8, _AO8 = _Bnb4(), _Bnb8(), _TorchaoInt8()
_FOREIGN = ("qweight", "qzeros", "W_q", "_packed_params")   # GPTQ/AWQ/Marlin, HQQ, torch.ao


BNB4, BNB8, TORCHAO_INT8 = _Bnb4(), _Bnb8(), _TorchaoInt8()
