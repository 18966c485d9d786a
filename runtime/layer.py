"""The adapted layer: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus a sum of circuits, in one named state.

An adapted layer computes ``y = W0·x + b + Σ_k s_k·(T_θk − T_θ0k)·dropout_k(x)`` (DESIGN.md):
one term per :class:`Branch` (``branch.py``; one branch per ``apply`` rule matching the
layer), where ``W0`` is the base weight the layer had at ``attach``/``load``. Its
:class:`LayerState` says what the stored base weight ``W`` holds and therefore what the
forward adds to ``W·x + b`` (sums over branches; "foldable" branches keep a frozen copy
and have no dropout):

=========  ==============================  =======================================  ================================
state      ``W`` holds                     forward adds, per branch                 leaving it gives back
=========  ==============================  =======================================  ================================
unfolded   ``W0``                          ``s·(T_θ − T_θ0)·dropout(x)``            (the start)
folded     ``W0 − Σ_foldable s·T_θ0``      ``s·T_θ·x`` if foldable, else unfolded   ``W0``, one rounding
merged     ``W0 + Σ s·(T_θ − T_θ0)``       nothing (no adapter cost)                ``W`` before merge, within
                                                                                    ``4·eps·‖W‖`` (else refused)
=========  ==============================  =======================================  ================================

A *quantized* base layer (bitsandbytes 4-bit/8-bit, torchao int8: ``quantized.py``) keeps
its stored weight ``Q0`` and ``W0`` means ``deq(Q0)``, the weight it computes with:

=========  ==================================  ==========================================
state      stored weight holds                 forward adds, per branch
=========  ==================================  ==========================================
unfolded   ``Q0``, untouched by training       as above (``zero_last``: ``s·T_θ·x``)
folded     never: a quantized layer never folds
merged     ``Q(W0 + Σ s·(T_θ − T_θ0))``: the   nothing; ``Q0`` is kept in memory and
           sum in float64, requantized in the  ``unmerge`` writes it back bit for bit
           layer's own scheme
=========  ==================================  ==========================================

Only named calls move a layer between states (``fold``, ``unfold``, ``merge``, ``unmerge``,
and ``load_state_dict``, which restores the state stored with the weights); ``forward``
only reads it, so DDP, FSDP, DataParallel replicas and ``torch.compile`` all run the model
the user built. Every move adds ``offset(new) − offset(old)`` (the table's ``W − W0``)
computed in float64 from the gates and rounded once into ``W``'s dtype. ``plan_move`` computes
and checks a move and writes nothing (finite gates, a result that fits ``W``'s dtype);
``apply`` writes it. A refused move leaves ``W`` bit for bit as it was, and
``moves.move_all`` plans every layer before it writes any.

Reversible means reversible: ``merge`` also computes, before writing, exactly the weight
``unmerge`` would give back, and refuses (a ``QCError`` naming the layer and pointing to
``merge_and_unload``, which needs no unmerge) unless it is within
``MERGE_ROUNDING·eps = 4·eps`` of the weight before the merge, normwise
(``‖U − W‖_F ≤ 4·eps·‖W‖_F``, ``eps`` of ``W``'s dtype: 4.8e-7 for float32, 3.1e-2 for
bfloat16). Two roundings cost at most ``½eps·(‖W + Δ‖ + ‖W‖)``, so any update up to the
size of ``W`` passes with room; one of 6 to 20 times ``W`` or more (a diverged run) does
not. Updates over ``LARGE_UPDATE`` (10) times ``‖W0‖`` are reported when merged, saved or
loaded (``weights.py``).

A layer folds only on real weights (not the meta device) and when a branch is foldable;
``zero_last`` branches have no frozen copy (``T_θ0 = 0``), so a layer of those alone stays
unfolded. Gates are float32 (float64 on a float64 layer) whatever the base dtype, and the
circuits run with autocast disabled. All branches run in one call of the layer.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import Circuit, QCError
from qcircuit.errors import with_article
from qcircuit.ir import OPTION_DEFAULTS

from . import quantized
from .branch import Branch
from .layer_tensors import LayerTensors
from .weights import MERGE_ROUNDING, full_tensor, merge_bound, reversal_error, warn_large_updates

__all__ = ["AdaptedLayer", "LayerState", "Move", "full_tensor"]


@dataclass(frozen=True)
class Move:
    """A checked state change of one layer (``AdaptedLayer.plan_move``): the call that makes it,
    the state it reaches, the new base weight (None: ``W`` does not change) and, for a
    merge, ‖Δ‖_F / ‖W0‖_F."""

    call: str
    state: "LayerState"
    weight: torch.Tensor | None = None
    update_ratio: float | None = None
    quantized: "quantized.Planned | None" = None   # a quantized layer's storage to write


class LayerState(enum.Enum):
    """What a layer's base weight holds; see the module docstring's table."""

    UNFOLDED = "unfolded"
    FOLDED = "folded"
    MERGED = "merged"


_CODES = tuple(LayerState)  # the state buffer stores an index into this tuple


class AdaptedLayer(LayerTensors, nn.Module):
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus one or more circuit
    branches (``branches``, built on this base layer, in rule order). ``disabled`` (set by
    ``Adapted.disable_adapter``) makes the forward the base layer's own: see ``forward``."""

    def __init__(self, base: nn.Module, branches: Sequence[Branch], *, name: str = "layer"):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise QCError(f"cannot adapt {with_article(type(base).__name__)}: only nn.Linear "
                          "and Conv1D")
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
        self.disabled = False  # forward as the base layer (Adapted.disable_adapter)
        # a quantized base (quantized.py): its scheme, and while merged what unmerge needs
        self.quant = quantized.scheme_of(base, name)
        self.quant_merged: quantized.Merged | None = None
        weight = base.weight
        device = torch.device("cpu") if weight.is_meta else weight.device
        # [state, rest] as indices into _CODES, so model.state_dict() round trips (resume)
        self.register_buffer("adapter_state", torch.zeros(2, dtype=torch.uint8, device=device))
        self.train(base.training)

    @classmethod
    def of(cls, base: nn.Module, circuit: Circuit, *, init: str = OPTION_DEFAULTS["init"],
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
        return any(b.foldable for b in self.branches) and not self.is_meta and self.quant is None

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
        self.apply(self.plan_move("fold"))

    def unfold(self) -> None:
        """folded -> unfolded: back to the base weight ``W0`` (one rounding)."""
        self.apply(self.plan_move("unfold"))

    def merge(self, *, reversible: bool = True) -> None:
        """-> merged: ``W ← W0 + Σ s·(T_θ − T_θ0)``; the forward is the base layer's alone.
        Refused, before anything is written, where ``unmerge`` could not give ``W`` back
        within the bound of the module doc (``reversible=False``: no such check, for
        ``merge_and_unload``); an update over ``LARGE_UPDATE``·‖W0‖ is reported."""
        move = self.plan_move("merge", reversible=reversible)
        warn_large_updates({self.name: move.update_ratio})
        self.apply(move)

    def unmerge(self) -> None:
        """merged -> the state before ``merge`` (``W`` within the merge bound)."""
        self.apply(self.plan_move("unmerge"))

    def _target(self, call: str) -> LayerState:
        """The state ``call`` moves this layer to (its preconditions checked)."""
        merged = self.state is LayerState.MERGED
        if call in ("fold", "unfold") and merged:
            raise QCError(f"{self.name}: unmerge before {call}ing")
        if call == "fold":
            fold = self.can_fold and self.state is LayerState.UNFOLDED
            return LayerState.FOLDED if fold else self.state
        if call == "unfold":
            return LayerState.UNFOLDED
        if call == "merge":
            if merged:
                raise QCError(f"{self.name}: layer is already merged")
            if self.is_meta:
                raise QCError("cannot merge: the model's weights are on the meta device")
            return LayerState.MERGED
        if call == "unmerge":
            if not merged:
                raise QCError(f"{self.name}: layer is not merged")
            return self.rest
        raise ValueError(f"unknown state change {call!r}")

    @torch.no_grad()
    def plan_move(self, call: str, *, reversible: bool = True) -> "Move":
        """What ``call`` (``fold``, ``unfold``, ``merge`` or ``unmerge``) does to this layer,
        computed in float64 and checked; nothing is written (``apply`` writes it)."""
        new = self._target(call)
        if self.quant is not None and call in ("merge", "unmerge"):
            return self._plan_quantized(call, new)
        dense = self._operators(new, self.state)
        before = self._offset(self.state, dense)
        step = self._offset(new, dense) - before
        if not torch.is_tensor(step):
            return Move(call, new)
        weight = self.base_layer.weight
        full = full_tensor(weight, weight.shape, f"{self.name}: base weight")
        as_weight = (lambda t: t.t() if self.transposed else t)
        step = as_weight(step).to(full.device)
        new_w = full.double() + step
        limit = torch.finfo(weight.dtype).max
        if not bool(torch.isfinite(new_w).all()) or float(new_w.abs().max()) > limit:
            raise QCError(f"{self.name}: moving to {new.value} would make the base weight "
                          f"non-finite or overflow {weight.dtype} (|delta| up to "
                          f"{float(step.abs().max()):.3g}); the base weight is left untouched")
        rounded = new_w.to(weight.dtype)
        if new is not LayerState.MERGED:
            return Move(call, new, rounded)
        w0 = full.double() - (as_weight(before).to(full.device) if torch.is_tensor(before) else 0)
        ratio = float(torch.linalg.norm(as_weight(self._offset(new, dense)).to(full.device))
                      / torch.linalg.norm(w0).clamp_min(torch.finfo(torch.float64).tiny))
        if reversible:
            error, bound = reversal_error(full, rounded, step), merge_bound(weight.dtype)
            if error > bound:
                raise QCError(
                    f"{self.name}: merge() refused: unmerge() could not give this layer's base "
                    f"weight back (the update is {ratio:.3g} times the base weight, and "
                    f"rounding W + update to {str(weight.dtype)[6:]} would lose "
                    f"{error:.2g} of W, over the bound {MERGE_ROUNDING}·eps = {bound:.2g}); "
                    "nothing was written. Use merge_and_unload(), which needs no unmerge, or "
                    "check the training run (an update this large usually means it diverged)")
        return Move(call, new, rounded, ratio)

    def _plan_quantized(self, call: str, new: LayerState) -> "Move":
        """A quantized layer's merge (``W0 + Δ`` in float64, requantized in its own scheme)
        or unmerge (the storage kept at merge, bit for bit); nothing is written."""
        if call == "merge":
            planned = quantized.plan_merge(self.base_layer, self.quant, self.delta64(), self.name)
            return Move(call, new, update_ratio=planned.merged.report.update_ratio,
                        quantized=planned)
        return Move(call, new, quantized=quantized.plan_unmerge(
            self.base_layer, self.quant, self.quant_merged, self.name))

    @torch.no_grad()
    def apply(self, move: "Move") -> None:
        """Write a planned move: the new base weight (if any), the state, ``rest``."""
        if move.quantized is not None:
            quantized.write(self.base_layer, self.quant, move.quantized)
            self.quant_merged = move.quantized.merged
        if move.weight is not None:
            weight, new_w = self.base_layer.weight, move.weight
            if hasattr(weight, "device_mesh"):  # DTensor: every rank holds new_w, keep its shard
                from torch.distributed.tensor import distribute_tensor
                new_w = distribute_tensor(new_w, weight.device_mesh, weight.placements)
            weight.copy_(new_w)
        self.state = move.state
        if move.call in ("fold", "unfold"):
            self.rest = self.state
        self._store_state()

    def exported(self, dtype: torch.dtype) -> nn.Module:
        """A plain ``nn.Linear`` (``Conv1D`` for a ``Conv1D`` base) in ``dtype`` holding the
        exact merge ``W0 + Σ s·(T_θ − T_θ0)`` (float64, rounded once); ``W0`` is
        dequantized for a quantized base. Call it unmerged; the layer is not changed."""
        if self.merged:
            raise QCError(f"{self.name}: unmerge before exporting")
        if self.quant is not None:
            base = quantized.dequantized(self.base_layer, self.quant)
        else:
            weight = full_tensor(self.base_layer.weight, self.base_layer.weight.shape,
                                 f"{self.name}: base weight").double()
            base = (weight.t() if self.transposed else weight) - self.offset64().to(weight.device)
        return quantized.linear_like(self.base_layer, base + self.delta64().to(base.device),
                                     dtype, self.transposed)

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

    # --- compute -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W·x + b`` plus what the state table says; with ``disabled``, the base layer's
        own function ``W0·x + b``: nothing more while unfolded, and while folded the frozen
        circuits ``s·T_θ0·x`` that the fold took out of ``W`` (within the fold's rounding).
        It reads the state and writes nothing."""
        y = self.base_layer(x)
        merged, folded = self.state is LayerState.MERGED, self.state is LayerState.FOLDED
        if self.disabled and merged:
            raise QCError(f"{self.name}: a merged layer cannot run without its adapter: "
                          "unmerge() first")
        if merged or (self.disabled and not folded):
            return y
        gate_dtype = self.branches[0].adapter.gates[0].dtype
        h = x if all(b.adapter.takes_uncast(x) for b in self.branches) \
            else x.to(gate_dtype)   # the circuits run in the gates' dtype, or take x uncast
        with torch.autocast(h.device.type, enabled=False):  # circuits run in the gates' dtype
            d = None
            for b in self.branches:
                if self.disabled and not b.foldable:
                    continue
                term = b.frozen(h) if self.disabled else b(h, folded and b.foldable)
                if d is None:
                    d = term if b.scale == 1.0 else term * b.scale
                else:
                    d = torch.add(d, term, alpha=b.scale)
        return y if d is None else y + d.to(y.dtype)

    def extra_repr(self) -> str:
        return f"state={self.state.value}"
