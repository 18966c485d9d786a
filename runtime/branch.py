"""``Branch``: one circuit of an adapted layer, with its gates, frozen copy and options.

A layer's update is the sum of its branches' deltas ``scale·(T_θ − T_θ0)·dropout(x)``, one
branch per ``apply`` rule matching the layer (``bind``). A branch owns its trainable gates
(``adapter``), for ``init = freeze_one`` a frozen copy of the initial gates (``frozen``;
``zero_last`` starts its last gate at zero and keeps none), its scale and its dropout. It
holds no state: the layer it belongs to (``layer.py``) says whether its frozen circuit is
folded into the base weight, and passes that to ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn

from qcircuit import Circuit, QCError
from qcircuit.compiler import compile as compile_circuit
from qcircuit.program import check_option


def gate_dtype(weight: torch.Tensor) -> torch.dtype:
    """Gates train in float32 (float64 for float64 layers), whatever the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class Branch(nn.Module):
    """The circuit ``circuit`` (named ``name`` in its program) on a layer whose base
    weight is ``weight``: gates in ``gate_dtype(weight)`` on its device, drawn on the CPU
    from ``generator`` (Kaiming-uniform, linear gain), then moved."""

    def __init__(self, name: str, circuit: Circuit, weight: torch.Tensor, *, init: str,
                 scale: float, dropout: float, generator: torch.Generator | None = None,
                 plan=None):
        super().__init__()
        if not circuit.gates:
            raise QCError("a circuit with no gates cannot be an adapter")
        self.name = name
        self.circuit = circuit
        self.plan = compile_circuit(circuit) if plan is None else plan  # shareable
        self.init_mode = check_option("init", init)      # the ranges .qc text is held to
        self.scale = float(check_option("scale", scale))
        rate = check_option("dropout", dropout)
        self.dropout = nn.Dropout(rate) if rate > 0 else nn.Identity()
        dtype = gate_dtype(weight)
        device = torch.device("cpu") if weight.is_meta else weight.device
        self.adapter = self.plan.module(init="kaiming", generator=generator, dtype=dtype,
                                        device="cpu").to(device)
        self.frozen: nn.Module | None = None
        if self.init_mode == "zero_last":
            with torch.no_grad():
                self.adapter.gates[-1].zero_()
        else:
            self.frozen = self.plan.module(init="zeros", dtype=dtype, device=device)
            self.frozen.requires_grad_(False)
            with torch.no_grad():
                for dst, src in zip(self.frozen.gates, self.adapter.gates):
                    dst.copy_(src)

    @property
    def foldable(self) -> bool:
        """It keeps a frozen copy and has no dropout (both circuits must see the same
        input for ``T_θ0`` to move into the base weight)."""
        return self.frozen is not None and isinstance(self.dropout, nn.Identity)

    def forward(self, h: torch.Tensor, folded: bool) -> torch.Tensor:
        """``(T_θ − T_θ0)·dropout(h)``, or ``T_θ·h`` when ``folded`` (the base weight then
        holds ``−scale·T_θ0``); ``h`` is in the gates' dtype. The layer applies ``scale``
        as it adds the branches up (one pass over the output per branch)."""
        h = self.dropout(h)
        d = self.adapter(h)
        if self.frozen is not None and not folded:
            d = d - self.frozen(h)
        return d

    def extra_repr(self) -> str:
        c = self.circuit
        return (f"{self.name}: circuit={'·'.join(map(str, c.in_dims))}->"
                f"{'·'.join(map(str, c.out_dims))}, gates={len(c.gates)}, params={c.num_params}, "
                f"init={self.init_mode}, scale={self.scale}")
