"""The adapted layer: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus a sum of circuits, in one named state.

An adapted layer computes ``y = W0·x + b + Σ_k s_k·(T_θk − T_θ0k)·dropout_k(x)`` (DESIGN.md):
one term per :class:`Branch` (``branch.py``; one branch per ``apply`` rule matching the
layer), where ``W0`` is the base weight the layer had at ``attach``/``load``. Its
:class:`LayerState` says what the stored base weight ``W`` holds and therefore what the
forward adds to ``W·x + b`` (sums over branches; "foldable" branches keep a frozen copy
and have no dropout):

=========  ==================================  ==========================================
state      ``W`` holds                         forward adds, per branch
=========  ==================================  ==========================================
unfolded   ``W0``                              ``s·(T_θ − T_θ0)·dropout(x)``
folded     ``W0 − Σ_foldable s·T_θ0``          ``s·T_θ·x`` if foldable, else as unfolded
merged     ``W0 + Σ s·(T_θ − T_θ0)``           nothing (no adapter cost)
=========  ==================================  ==========================================

Only named calls move a layer between states (``fold``, ``unfold``, ``merge``, ``unmerge``,
and ``load_state_dict``, which restores the state stored with the weights); ``forward``
only reads it, so DDP, FSDP, DataParallel replicas and ``torch.compile`` all run the model
the user built. Every move adds ``offset(new) − offset(old)`` (the table's ``W − W0``)
computed in float64 from the gates and rounded once into ``W``'s dtype, after checking
that the gates and the result are finite: a bad gate is refused before ``W`` is touched.

A layer folds only on real weights (not the meta device) and when a branch is foldable;
``zero_last`` branches have no frozen copy (``T_θ0 = 0``), so a layer of those alone stays
unfolded. Gates are float32 (float64 on a float64 layer) whatever the base dtype, and the
circuits run with autocast disabled. All branches run in one call of the layer.
"""
from __future__ import annotations

import enum
from typing import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import Circuit, QCError
from qcircuit.compiler import triton_route

from .branch import Branch
from .checkpoint_schema import branch_tensor_names


class LayerState(enum.Enum):
    """What a layer's base weight holds; see the module docstring's table."""

    UNFOLDED = "unfolded"
    FOLDED = "folded"
    MERGED = "merged"


_CODES = tuple(LayerState)  # the state buffer stores an index into this tuple


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
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus one or more circuit
    branches (``branches``, built on this base layer, in rule order)."""

    def __init__(self, base: nn.Module, branches: Sequence[Branch], *, name: str = "layer"):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise QCError(f"cannot adapt a {type(base).__name__}: only nn.Linear and Conv1D")
        names = [b.name for b in branches]
        if not names or len(set(names)) != len(names):
            raise QCError(f"{name}: a layer takes one or more branches with distinct circuit "
                          f"names, got {names}")
        self.base_layer = base
        self.name = name
        self.transposed = isinstance(base, Conv1D)  # Conv1D keeps its weight as (in, out)
        self.branches = nn.ModuleList(branches)
        self.state = LayerState.UNFOLDED
        self.rest = LayerState.UNFOLDED  # where unmerge() returns: the training form
        weight = base.weight
        device = torch.device("cpu") if weight.is_meta else weight.device
        # [state, rest] as indices into _CODES, so model.state_dict() round trips (resume)
        self.register_buffer("adapter_state", torch.zeros(2, dtype=torch.uint8, device=device))
        self.train(base.training)

    @classmethod
    def of(cls, base: nn.Module, circuit: Circuit, *, init: str = "freeze_one",
           scale: float = 1.0, dropout: float = 0.0, generator: torch.Generator | None = None,
           plan=None, name: str = "layer", circuit_name: str = "c") -> "AdaptedLayer":
        """A layer with one branch: ``circuit`` with these options."""
        branch = Branch(circuit_name, circuit, base.weight, init=init, scale=scale,
                        dropout=dropout, generator=generator, plan=plan)
        return cls(base, [branch], name=name)

    # --- one-branch shorthands ------------------------------------------------------------
    @property
    def only(self) -> Branch:
        """The layer's branch, when it has one (most layers); a ``QCError`` for a sum."""
        if len(self.branches) != 1:
            raise QCError(f"{self.name} is a sum of {len(self.branches)} circuits "
                          f"({', '.join(b.name for b in self.branches)}): pick one from "
                          "layer.branches")
        return self.branches[0]

    adapter = property(lambda self: self.only.adapter, doc="The one branch's gates.")
    frozen = property(lambda self: self.only.frozen, doc="The one branch's frozen copy.")
    circuit = property(lambda self: self.only.circuit, doc="The one branch's circuit.")
    plan = property(lambda self: self.only.plan, doc="The one branch's compiled plan.")
    scale = property(lambda self: self.only.scale, doc="The one branch's scale.")
    init_mode = property(lambda self: self.only.init_mode, doc="The one branch's init.")

    @property
    def num_params(self) -> int:
        """Trainable parameters: every branch's gates."""
        return sum(b.circuit.num_params for b in self.branches)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The trainable gates, branch by branch in circuit order."""
        return [g for b in self.branches for g in b.adapter.gates]

    # --- what the layer can do -----------------------------------------------------------
    @property
    def is_meta(self) -> bool:
        return self.base_layer.weight.is_meta

    @property
    def can_fold(self) -> bool:
        """A foldable branch (frozen copy, no dropout) and real weights."""
        return any(b.foldable for b in self.branches) and not self.is_meta

    @property
    def folded(self) -> bool:
        return self.state is LayerState.FOLDED

    @property
    def merged(self) -> bool:
        return self.state is LayerState.MERGED

    # --- named state changes -------------------------------------------------------------
    def fold(self) -> None:
        """unfolded -> folded: ``W ← W − Σ_foldable s·T_θ0`` (no-op where ``can_fold`` is
        false)."""
        if self.state is LayerState.MERGED:
            raise QCError(f"{self.name}: unmerge before folding")
        if self.can_fold and self.state is LayerState.UNFOLDED:
            self._move(LayerState.FOLDED)
        self.rest = self.state
        self._store_state()

    def unfold(self) -> None:
        """folded -> unfolded: back to the base weight ``W0`` (one rounding)."""
        if self.state is LayerState.MERGED:
            raise QCError(f"{self.name}: unmerge before unfolding")
        if self.state is LayerState.FOLDED:
            self._move(LayerState.UNFOLDED)
        self.rest = self.state
        self._store_state()

    def merge(self) -> None:
        """-> merged: ``W ← W0 + Σ s·(T_θ − T_θ0)``; the forward is the base layer's alone."""
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
    def _checked_gates(self, branch: Branch, part: str) -> list[torch.Tensor]:
        """``branch``'s gates (``part``: adapter or frozen), whole, after checking that
        every entry is finite."""
        label = "gate" if part == "adapter" else "frozen initial gate"
        where = self.name if len(self.branches) == 1 else f"{self.name} ({branch.name})"
        gates = []
        for i, g in enumerate(getattr(branch, part).gates):
            g = full_tensor(g, branch.circuit.gates[i].shape, f"{where}: {label} {i}")
            if not bool(torch.isfinite(g).all()):
                raise QCError(f"{where}: {label} {i} has non-finite entries (NaN or inf); "
                              "the base weight is left untouched")
            gates.append(g)
        return gates

    def check_gates(self) -> None:
        """Refuse (``QCError`` naming layer and gate) a non-finite gate or frozen gate."""
        for b in self.branches:
            self._checked_gates(b, "adapter")
            if b.frozen is not None:
                self._checked_gates(b, "frozen")

    def _dense64(self, branch: Branch, part: str) -> torch.Tensor:
        """The circuit operator of ``branch``'s (checked) gates in float64, (out, in)."""
        gates = [g.double() for g in self._checked_gates(branch, part)]
        with torch.no_grad(), torch.autocast(gates[0].device.type, enabled=False):
            return branch.plan.dense_executor()(gates)

    def _offset(self, state: LayerState, dense: dict) -> torch.Tensor | float:
        """``W − W0`` in ``state`` (float64), from the operators in ``dense``."""
        if state is LayerState.UNFOLDED:
            return 0.0
        total: torch.Tensor | float = 0.0
        for k, b in enumerate(self.branches):
            if state is LayerState.FOLDED:
                if b.foldable:
                    total = total - b.scale * dense[k, "frozen"]
            elif b.frozen is not None:
                total = total + b.scale * (dense[k, "adapter"] - dense[k, "frozen"])
            else:
                total = total + b.scale * dense[k, "adapter"]
        return total

    def offset64(self) -> torch.Tensor:
        """``W − W0`` in the current state, float64 (out, in)."""
        return torch.as_tensor(self._offset(self.state, self._operators(self.state)),
                               dtype=torch.float64)

    def delta64(self) -> torch.Tensor:
        """The adapter's delta ``Σ s·(T_θ − T_θ0)``, float64 (out, in)."""
        return self._offset(LayerState.MERGED, self._operators(LayerState.MERGED))

    def _operators(self, *states: LayerState) -> dict[tuple[int, str], torch.Tensor]:
        """The dense operators that ``_offset`` needs for ``states``, keyed (branch index,
        part): ``T_θ`` for merged, ``T_θ0`` for folded and merged (folding never multiplies
        out the trained gates, nor the frozen gates of branches it leaves alone)."""
        dense = {}
        merged = LayerState.MERGED in states
        folded = LayerState.FOLDED in states
        for k, b in enumerate(self.branches):
            if merged:
                dense[k, "adapter"] = self._dense64(b, "adapter")
            if b.frozen is not None and (merged or (folded and b.foldable)):
                dense[k, "frozen"] = self._dense64(b, "frozen")
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
        folded = self.state is LayerState.FOLDED
        gate_dtype = self.branches[0].adapter.gates[0].dtype
        h = x if all(triton_route.takes(b.plan, x, gate_dtype) for b in self.branches) \
            else x.to(gate_dtype)   # the circuits run in the gates' dtype, or take x uncast
        with torch.autocast(h.device.type, enabled=False):  # circuits run in the gates' dtype
            d = None
            for b in self.branches:
                term = b(h, folded and b.foldable)
                if d is None:
                    d = term if b.scale == 1.0 else term * b.scale
                else:
                    d = torch.add(d, term, alpha=b.scale)
        return y + d.to(y.dtype)

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
        whole, on the CPU (a collective for DTensor gates: every rank must call)."""
        out = {}
        for key, k, part, i in self._saved_gates(name):
            b = self.branches[k]
            gate = getattr(b, part).gates[i]
            out[key] = full_tensor(gate, b.circuit.gates[i].shape, key).to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (``tensors(name)``'s names) into the gates."""
        for key, path in self.checkpoint_names(name).items():
            self.get_parameter(path).copy_(tensors[key])

    def extra_repr(self) -> str:
        return f"state={self.state.value}"
