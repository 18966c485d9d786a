"""The adapted layer: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus a circuit, in one named state.

An adapted layer computes ``y = W0·x + b + scale·(T_θ − T_θ0)·dropout(x)`` (DESIGN.md), where
``W0`` is the base weight the layer had at ``attach``/``load``. Its :class:`LayerState` says
what the stored base weight ``W`` holds and therefore what the forward adds to ``W·x + b``:

=========  ==========================  ================================================
state      ``W`` holds                 forward
=========  ==========================  ================================================
unfolded   ``W0``                      ``W·x + b + s·(T_θ − T_θ0)·dropout(x)``
folded     ``W0 − s·T_θ0``             ``W·x + b + s·T_θ·x``  (one circuit per step)
merged     ``W0 + s·(T_θ − T_θ0)``     ``W·x + b``            (no adapter cost)
=========  ==========================  ================================================

Only named calls move a layer between states (``fold``, ``unfold``, ``merge``, ``unmerge``,
and ``load_state_dict``, which restores the state stored with the weights); ``forward``
only reads it, so DDP, FSDP, DataParallel replicas and ``torch.compile`` all run the model
the user built. Every move adds ``offset(new) − offset(old)`` (the table's ``W − W0``)
computed in float64 from the gates and rounded once into ``W``'s dtype, after checking
that the gates and the result are finite: a bad gate is refused before ``W`` is touched.

``freeze_one`` layers keep a frozen copy of the initial gates (``frozen``). They can fold
only without dropout (both circuits must see the same ``dropout(x)``) and on real weights
(not the meta device). ``zero_last`` layers have no frozen copy (``T_θ0 = 0``): unfolded
and folded are the same weight, so they stay unfolded. Gates are float32 (float64 on a
float64 layer) whatever the base dtype, and the circuit runs with autocast disabled.
"""
from __future__ import annotations

import enum

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import Circuit, QCError
from qcircuit.program import check_option
from qcircuit.compiler import compile as compile_circuit


class LayerState(enum.Enum):
    """What a layer's base weight holds; see the module docstring's table."""

    UNFOLDED = "unfolded"
    FOLDED = "folded"
    MERGED = "merged"


_CODES = tuple(LayerState)  # the state buffer stores an index into this tuple


def gate_dtype(weight: torch.Tensor) -> torch.dtype:
    """Gates train in float32 (float64 for float64 layers), whatever the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


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


class AdaptedLayer(nn.Module):
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus a circuit adapter."""

    def __init__(self, base: nn.Module, circuit: Circuit, *, init: str, scale: float,
                 dropout: float, generator: torch.Generator | None = None, plan=None,
                 name: str = "layer"):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise QCError(f"cannot adapt a {type(base).__name__}: only nn.Linear and Conv1D")
        if not circuit.gates:
            raise QCError("a circuit with no gates cannot be an adapter")
        self.base_layer = base
        self.name = name
        self.transposed = isinstance(base, Conv1D)  # Conv1D keeps its weight as (in, out)
        self.circuit = circuit
        self.plan = compile_circuit(circuit) if plan is None else plan  # shareable
        self.init_mode = check_option("init", init)      # the ranges .qc text is held to
        self.scale = float(check_option("scale", scale))
        dropout = check_option("dropout", dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        dtype = gate_dtype(weight)
        device = torch.device("cpu") if weight.is_meta else weight.device
        # Gates are drawn on the CPU (where the generator lives), then moved.
        self.adapter = self.plan.module(init="kaiming", generator=generator, dtype=dtype,
                                        device="cpu").to(device)
        self.frozen: nn.Module | None = None
        if init == "zero_last":
            with torch.no_grad():
                self.adapter.gates[-1].zero_()
        else:
            self.frozen = self.plan.module(init="zeros", dtype=dtype, device=device)
            self.frozen.requires_grad_(False)
            with torch.no_grad():
                for dst, src in zip(self.frozen.gates, self.adapter.gates):
                    dst.copy_(src)
        self.state = LayerState.UNFOLDED
        self.rest = LayerState.UNFOLDED  # where unmerge() returns: the training form
        # [state, rest] as indices into _CODES, so model.state_dict() round trips (resume)
        self.register_buffer("adapter_state", torch.zeros(2, dtype=torch.uint8, device=device))
        self.train(base.training)

    # --- what the layer can do -----------------------------------------------------------
    @property
    def is_meta(self) -> bool:
        return self.base_layer.weight.is_meta

    @property
    def can_fold(self) -> bool:
        """A frozen copy to fold, no dropout, and real weights."""
        return self.frozen is not None and isinstance(self.dropout, nn.Identity) \
            and not self.is_meta

    @property
    def folded(self) -> bool:
        return self.state is LayerState.FOLDED

    @property
    def merged(self) -> bool:
        return self.state is LayerState.MERGED

    # --- named state changes -------------------------------------------------------------
    def fold(self) -> None:
        """unfolded -> folded: ``W ← W − s·T_θ0`` (no-op where ``can_fold`` is false)."""
        if self.state is LayerState.MERGED:
            raise QCError(f"{self.name}: unmerge before folding")
        if self.can_fold and self.state is LayerState.UNFOLDED:
            self._move(LayerState.FOLDED)
        self.rest = self.state
        self._store_state()

    def unfold(self) -> None:
        """folded -> unfolded: ``W ← W + s·T_θ0`` (back to the base weight, one rounding)."""
        if self.state is LayerState.MERGED:
            raise QCError(f"{self.name}: unmerge before unfolding")
        if self.state is LayerState.FOLDED:
            self._move(LayerState.UNFOLDED)
        self.rest = self.state
        self._store_state()

    def merge(self) -> None:
        """-> merged: ``W ← W0 + s·(T_θ − T_θ0)``; the forward is the base layer's alone."""
        if self.state is LayerState.MERGED:
            raise QCError(f"{self.name}: layer is already merged")
        if self.is_meta:
            raise QCError("cannot merge: the model's weights are on the meta device")
        self._move(LayerState.MERGED)

    def unmerge(self) -> None:
        """merged -> the state before ``merge`` (exact up to one rounding of ``W``)."""
        if self.state is not LayerState.MERGED:
            raise QCError(f"{self.name}: layer is not merged")
        self._move(self.rest)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        codes = self.adapter_state.tolist()
        if all(0 <= c < len(_CODES) for c in codes):
            self.state, self.rest = (_CODES[c] for c in codes)

    def _store_state(self) -> None:
        codes = [_CODES.index(self.state), _CODES.index(self.rest)]
        with torch.no_grad():
            self.adapter_state.copy_(torch.tensor(codes, dtype=torch.uint8))

    # --- the weight arithmetic -----------------------------------------------------------
    def _checked_gates(self, module: nn.Module, label: str) -> list[torch.Tensor]:
        """``module``'s gates, whole, after checking that every entry is finite."""
        gates = []
        for i, g in enumerate(module.gates):
            g = full_tensor(g, self.circuit.gates[i].shape, f"{self.name}: {label} {i}")
            if not bool(torch.isfinite(g).all()):
                raise QCError(f"{self.name}: {label} {i} has non-finite entries (NaN or inf); "
                              "the base weight is left untouched")
            gates.append(g)
        return gates

    def check_gates(self) -> None:
        """Refuse (``QCError`` naming layer and gate) a non-finite gate or frozen gate."""
        self._checked_gates(self.adapter, "gate")
        if self.frozen is not None:
            self._checked_gates(self.frozen, "frozen initial gate")

    def _dense64(self, module: nn.Module, label: str) -> torch.Tensor:
        """The circuit operator of ``module``'s (checked) gates in float64, (out, in)."""
        gates = [g.double() for g in self._checked_gates(module, label)]
        with torch.no_grad(), torch.autocast(gates[0].device.type, enabled=False):
            return self.plan.dense_executor()(gates)

    def _offset(self, state: LayerState, dense: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """``W − W0`` in ``state`` (float64), from the operators in ``dense``."""
        if state is LayerState.UNFOLDED:
            return 0.0
        t0 = dense["frozen"] if self.frozen is not None else 0.0
        if state is LayerState.FOLDED:
            return -self.scale * t0
        return self.scale * (dense["adapter"] - t0)

    def offset64(self) -> torch.Tensor:
        """``W − W0`` in the current state, float64 (out, in)."""
        return torch.as_tensor(self._offset(self.state, self._operators(self.state)),
                               dtype=torch.float64)

    def delta64(self) -> torch.Tensor:
        """The adapter's delta ``s·(T_θ − T_θ0)``, float64 (out, in)."""
        return self._offset(LayerState.MERGED, self._operators(LayerState.MERGED))

    def _operators(self, *states: LayerState) -> dict[str, torch.Tensor]:
        """The dense operators that ``_offset`` needs for ``states``: ``T_θ`` for merged,
        ``T_θ0`` for folded and merged (folding never multiplies out the trained gates)."""
        dense = {}
        if LayerState.MERGED in states:
            dense["adapter"] = self._dense64(self.adapter, "gate")
        if self.frozen is not None and any(s is not LayerState.UNFOLDED for s in states):
            dense["frozen"] = self._dense64(self.frozen, "frozen initial gate")
        return dense

    @torch.no_grad()
    def _move(self, new: LayerState) -> None:
        """``W ← W + offset(new) − offset(state)``, checked before anything is written."""
        dense = self._operators(new, self.state)
        step = self._offset(new, dense) - self._offset(self.state, dense)
        if not torch.is_tensor(step):
            self.state = new
            self._store_state()
            return
        weight = self.base_layer.weight
        full = full_tensor(weight, weight.shape, f"{self.name}: base weight")
        new_w = full.double() + (step.t() if self.transposed else step).to(full.device)
        limit = torch.finfo(weight.dtype).max
        if not bool(torch.isfinite(new_w).all()) or float(new_w.abs().max()) > limit:
            raise QCError(f"{self.name}: moving to {new.value} would make the base weight "
                          f"non-finite or overflow {weight.dtype} (|delta| up to "
                          f"{float(step.abs().max()):.3g}); the base weight is left untouched")
        new_w = new_w.to(weight.dtype)
        if hasattr(weight, "device_mesh"):  # DTensor: every rank holds new_w, keep its shard
            from torch.distributed.tensor import distribute_tensor
            new_w = distribute_tensor(new_w, weight.device_mesh, weight.placements)
        weight.copy_(new_w)
        self.state = new
        self._store_state()

    # --- compute -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.state is LayerState.MERGED:
            return y
        h = self.dropout(x).to(self.adapter.gates[0].dtype)
        with torch.autocast(h.device.type, enabled=False):  # the circuit runs in the gates' dtype
            d = self.adapter(h)
            if self.frozen is not None and self.state is LayerState.UNFOLDED:
                d = d - self.frozen(h)
        return y + (self.scale * d).to(y.dtype)

    def checkpoint_names(self, name: str) -> dict[str, tuple[str, int]]:
        """Checkpoint tensor name -> (``adapter`` or ``frozen``, gate index), for this layer
        saved as ``name``: ``<name>.gates.<i>`` and ``<name>.init_gates.<i>``. The one place
        of the key scheme (native checkpoints and the PEFT door)."""
        out = {}
        for kind, part in (("gates", "adapter"), ("init_gates", "frozen")):
            if getattr(self, part) is not None:
                out.update({f"{name}.{kind}.{i}": (part, i) for i in range(len(self.circuit.gates))})
        return out

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Copies of the gates (and frozen initial gates) under their checkpoint names,
        whole, on the CPU (a collective for DTensor gates: every rank must call)."""
        return {key: full_tensor(getattr(self, part).gates[i], self.circuit.gates[i].shape,
                                 key).to("cpu", copy=True)
                for key, (part, i) in self.checkpoint_names(name).items()}

    @torch.no_grad()
    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (``tensors(name)``'s names) into the gates."""
        for key, (part, i) in self.checkpoint_names(name).items():
            getattr(self, part).gates[i].copy_(tensors[key])

    def extra_repr(self) -> str:
        c = self.circuit
        return (f"circuit={'·'.join(map(str, c.in_dims))}->{'·'.join(map(str, c.out_dims))}, "
                f"gates={len(c.gates)}, params={c.num_params}, init={self.init_mode}, "
                f"scale={self.scale}, state={self.state.value}")
