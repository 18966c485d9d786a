"""``QuanTALayer``: PEFT's per-module adapter container over qcircuit's ``AdaptedLayer``.

Each named adapter on a module is one ``AdaptedLayer`` (``runtime/layer.py``: the math,
the states, merge and the dtype rules) around the module's one base layer. This class
only keeps PEFT's bookkeeping: which adapter is active, which are merged, whether adapters
are disabled. Its forward picks the active ``AdaptedLayer`` and calls it.

Rule for several adapters on one weight: the layers here stay *unfolded* (``W`` holds
``W0``, or ``W0`` plus the merged adapters' deltas). Every state move of an
``AdaptedLayer`` adds its own offset to ``W``, and unfolded offsets are zero, so adapters
never see each other's folds, merges add up, and switching adapters touches no weight.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from qcircuit import QCError
from qcircuit.runtime import AdaptedLayer, quantized
from qcircuit.runtime.layer import Move, full_tensor
from qcircuit.runtime.weights import warn_large_updates

from .landing import Arrivals, AwaitsTensors


class QuanTALayer(AwaitsTensors, nn.Module, BaseTunerLayer):
    """A base ``nn.Linear``/``Conv1D`` with one ``AdaptedLayer`` per named adapter."""

    # PEFT toggles requires_grad on everything under adapter_layer_names: only the
    # trainable gate modules go there (an AdaptedLayer also holds the base layer and the
    # frozen initial gates); qc_adapters holds the AdaptedLayers. Neither name contains
    # the PEFT prefix ("quanta_") on purpose: PEFT reports every model key with the prefix
    # that a checkpoint leaves unfilled as missing, and these containers hold aliases (the
    # base layer, each gate module twice) that a checkpoint never stores. Completeness is
    # checked by qcircuit (record.check_fits, checkpoint.check_tensors) when it is read.
    adapter_layer_names = ("qc_gates",)
    other_param_names = ("qc_adapters",)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.qc_adapters = nn.ModuleDict()
        self.qc_gates = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = []
        # adapters injected for a checkpoint whose tensors have not all arrived (landing.py)
        self.qc_pending: dict[str, Arrivals] = {}
        self.register_state_dict_post_hook(_hide_pending)

    def add(self, adapter_name: str, layer: AdaptedLayer) -> None:
        """Install ``layer`` (built on this module's base layer) as ``adapter_name``."""
        if layer.base_layer is not self.base_layer:
            raise QCError(f"{layer.name}: the adapter was built on another base layer")
        if adapter_name in self.qc_adapters:
            raise QCError(f"{layer.name}: adapter {adapter_name!r} already exists")
        self.qc_adapters[adapter_name] = layer
        self.qc_gates[adapter_name] = nn.ModuleList(b.adapter for b in layer.branches)

    def delete_adapter(self, adapter_name: str) -> None:
        self.settle(adapter_name)
        super().delete_adapter(adapter_name)

    # --- PEFT's named state changes ----------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise QCError(f"QuanTA layers run one adapter at a time, got {names}: activate one "
                          "with set_adapter(name), or merge several with "
                          "merge_adapter(adapter_names=[...])")
        super().set_adapter(names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabling unmerges first, so the forward is the base layer's own."""
        if not enabled and self.merged:
            warnings.warn("disabling merged QuanTA adapters: unmerging them first")
            self.unmerge()
        super().enable_adapters(enabled)

    def to_merge(self, adapter_names: Optional[list[str]] = None) -> list[str]:
        """The adapters a merge of ``adapter_names`` (default: the active ones) merges here:
        those this layer has and has not merged yet."""
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.qc_adapters and n not in self.merged_adapters]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, *,
              reversible: bool = True) -> None:
        """Merge each named adapter (default: the active ones) this layer has into its weight.

        ``AdaptedLayer.plan_move`` always checks the gates and the new weight before writing
        (what ``safe_merge`` asks for) and, with ``reversible``, that unmerging gives the
        weight back; if a later adapter fails, the weight is put back exactly as it was."""
        # an adapter need not cover every layer: layers without it have nothing to merge
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.qc_adapters]
        for name in names:
            self.check_loaded(name)
        weight = self.base_layer.weight
        quantized_base = bool(names) and self.qc_adapters[names[0]].quant is not None
        old = full_tensor(weight, weight.shape, "base weight").clone() \
            if len(names) > 1 and not quantized_base else None
        done = []
        try:
            for name in names:
                layer = self.qc_adapters[name]
                move = layer.plan_move("merge", reversible=reversible)
                warn_large_updates({f"{layer.name} ({name})": move.update_ratio})
                layer.apply(move)
                done.append(name)
        except BaseException:
            if quantized_base:   # each unmerge writes back the storage its merge kept: exact
                for name in reversed(done):
                    self.qc_adapters[name].unmerge()
            for name in [] if quantized_base else done:   # the exact old weight and states
                layer = self.qc_adapters[name]
                layer.apply(Move("unmerge", layer.rest, old))
            raise
        self.merged_adapters.extend(done)
        quantized.warn_lossy({name: self.qc_adapters[name].quant_merged.report for name in done
                              if self.qc_adapters[name].quant_merged is not None}, named=False)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.Module:
        """PEFT's ``merge_and_unload``/``unload`` for this layer: merging for good needs no
        unmerge, so it is not held to the reversibility bound."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names, reversible=False)
        return self.base_layer

    def unmerge(self) -> None:
        """Unmerge every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self.qc_adapters[self.merged_adapters[-1]].unmerge()
            self.merged_adapters.pop()

    def exported(self, dtype: torch.dtype, adapter_names: Optional[list[str]] = None) -> nn.Module:
        """A plain layer in ``dtype`` holding the exact merge into the base weight (dequantized
        for a quantized base: ``AdaptedLayer.exported``) of the adapters merged already and
        the named ones (default: the active ones); the merged ones are unmerged first."""
        wanted = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in dict.fromkeys([*self.merged_adapters, *wanted])
                 if n in self.qc_adapters]
        if self.merged:
            self.unmerge()
        if not names:
            return self.base_layer
        for name in names:
            self.check_loaded(name)
        layer = self.qc_adapters[names[0]].exported(torch.float64)
        with torch.no_grad():   # PEFT layers stay unfolded: each adds its delta to W0
            for name in names[1:]:
                layer.weight += self.qc_adapters[name].delta64().to(layer.weight.device)
        return layer.to(dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str,
                                              device: Optional[torch.device] = None) -> None:
        """Device only: the gates keep the dtype ``AdaptedLayer`` chose (float32/64)."""
        weight = self.base_layer.weight
        target = device if device is not None else weight.device
        if adapter_name in self.qc_adapters and not weight.is_meta:
            self.qc_adapters[adapter_name].to(target)

    # --- compute ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        if len(self.active_adapters) > 1:
            raise QCError(f"QuanTA layers run one adapter at a time, {self.active_adapters} "
                          "are active")
        self.check_loaded(self.active_adapters[0])
        layer = self.qc_adapters[self.active_adapters[0]] \
            if self.active_adapters[0] in self.qc_adapters else None
        return self.base_layer(x, *args, **kwargs) if layer is None else layer(x)

    def __repr__(self) -> str:
        """The base layer and one line per adapter (the containers hold aliases)."""
        rows = [f"(base_layer): {self.base_layer!r}"]
        rows += [f"({name}): AdaptedLayer({layer.extra_repr()})"
                 for name, layer in self.qc_adapters.items()]
        return "quanta.QuanTALayer(\n  " + "\n  ".join(rows) + "\n)"


def _hide_pending(layer: QuanTALayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """A pending adapter's state is its landing slots: its gates (still their random init)
    are left out, so no loader reports them missing and no save writes them."""
    for name in layer.qc_pending:
        heads = tuple(f"{prefix}{container}.{name}." for container in
                      layer.adapter_layer_names + layer.other_param_names)
        for key in [k for k in state_dict if k.startswith(heads)]:
            del state_dict[key]
