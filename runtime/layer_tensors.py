"""An adapted layer's gates under their checkpoint names: the mixin both front doors use.

``AdaptedLayer`` (``layer.py``) inherits these: the key scheme of
``checkpoint_schema.branch_tensor_names`` mapped onto the layer's parameters
(``branches.<k>.adapter.gates.<i>``, ``branches.<k>.frozen.gates.<i>``), copies of the
gates to save, and copying saved gates back.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .checkpoint_schema import branch_tensor_names
from .weights import full_tensor, update_ratio


class LayerTensors:
    """Checkpoint names, copies and loads of an ``AdaptedLayer``'s gates."""

    def _saved_gates(self, name: str):
        """``(checkpoint name, branch index, part, gate index)`` of every saved tensor of
        this layer saved as ``name``, following ``checkpoint_schema.branch_tensor_names``."""
        for k, b in enumerate(self.branches):
            names = branch_tensor_names(name, b.name, len(self.branches), len(b.circuit.gates),
                                        b.frozen is not None)
            for key, (part, i) in names.items():
                yield key, k, part, i

    def checkpoint_names(self, name: str) -> dict[str, str]:
        """Checkpoint tensor name -> parameter path in this layer
        (``branches.<k>.adapter.gates.<i>`` or ``branches.<k>.frozen.gates.<i>``), for this
        layer saved as ``name`` (native checkpoints and the PEFT door both use this)."""
        return {key: f"branches.{k}.{part}.gates.{i}"
                for key, k, part, i in self._saved_gates(name)}

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of the gates (and frozen initial gates) under their checkpoint names,
        whole, on the CPU (a collective for DTensor gates: every rank must call). Gates
        made half precision (``model.to(torch.bfloat16)``) are widened to float32, exactly:
        checkpoints hold float32 or float64 gates."""
        out = {}
        for key, k, part, i in self._saved_gates(name):
            b = self.branches[k]
            gate = getattr(b, part).gates[i]
            t = full_tensor(gate, b.circuit.gates[i].shape, key).to("cpu", copy=True)
            out[key] = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return out

    def update_ratio(self, name: str, tensors: Mapping[str, torch.Tensor]) -> float | None:
        """‖Δ‖_F / ‖W0‖_F estimated from random probes with this layer's checkpoint
        ``tensors`` (``tensors(name)``): ``weights.update_ratio``."""
        return update_ratio(self, name, tensors)

    @torch.no_grad()
    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (``tensors(name)``'s names) into the gates."""
        for key, path in self.checkpoint_names(name).items():
            self.get_parameter(path).copy_(tensors[key])
