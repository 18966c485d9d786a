"""Attach QuanTA adapters to a model, and the ``Adapted`` handle on the result.

``attach``/``load`` replace every layer the program matches by an :class:`AdaptedLayer`
(``layer.py``: the math, the states and what the base weight holds in each) and leave the
model ready to train: only the gates are trainable, and with ``fold=True`` (the default)
every ``freeze_one`` layer that can fold is folded right away, ``W ← W0 − scale·T_θ0``
computed in float64 and rounded once, so training runs one circuit per layer. After that
no forward changes anything: wrap the model (DDP, FSDP, DataParallel, ``torch.compile``)
and train.

Precision of the fold: folded and unfolded are the same function up to float rounding,
but ``W'·x`` and ``T_θ·x`` are larger than ``W0·x`` and cancel, so float32 outputs move by
about 1e-6 relative and bfloat16 ones by 1–2e-2. ``fold=False`` keeps every layer unfolded
(two circuits per forward; the adapted model then equals the base model bit for bit at
init, in any precision); ``zero_last`` is exact at init either way.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qcircuit import Circuit, Program, QCError, as_program
from qcircuit.compiler import compile as compile_circuit

from . import checkpoint, quantized, record
from .bind import Target, bind, by_layer
from .branch import Branch
from .layer import AdaptedLayer, LayerState
from .moves import move_all
from .weights import warn_large_updates

__all__ = ["Adapted", "AdaptedLayer", "Branch", "LayerState", "attach", "load"]


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


class Adapted:
    """Handle on a model whose matched layers carry circuit adapters.

    Callable like the model; other attributes are looked up on the model. Once the model
    is wrapped (DDP, DataParallel, ``torch.compile``), call the wrapper, not this handle.
    """

    def __init__(self, model: nn.Module, program: Program, targets: tuple[Target, ...],
                 layers: dict[str, AdaptedLayer], requires_grad: dict[str, bool]):
        self.model = model
        self.program = program
        self.targets = targets
        self.layers = layers
        self._requires_grad = requires_grad
        self._unloaded = False
        self._warned = False

    def __call__(self, *args, **kwargs):
        if not self._warned and self.model.training and torch.is_grad_enabled() \
                and _unwrapped_under_distributed(self.model):
            self._warned = True
            warnings.warn("training through the Adapted handle while torch.distributed runs "
                          "with several ranks: this calls the unwrapped model, so gradients "
                          "are not synchronised; call the DDP/FSDP wrapper instead",
                          stacklevel=2)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        model = self.__dict__.get("model")
        if model is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(model, name)

    def _live(self) -> dict[str, AdaptedLayer]:
        if self._unloaded:
            raise QCError("the adapter was merged and unloaded; this handle is no longer usable")
        return self.layers

    # --- state ---------------------------------------------------------------------------
    @property
    def states(self) -> dict[str, LayerState]:
        """Each adapted layer's state (what its base weight holds; see ``layer.py``)."""
        return {name: layer.state for name, layer in self._live().items()}

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self._live().values())

    def _all_layers(self, call: str, *, reversible: bool = True) -> None:
        """``layer.<call>()`` on every layer, or on none: every move is planned and checked
        before any weight is written (``moves.move_all``)."""
        _check_not_flat_sharded(self.model)
        move_all(self._live(), call, reversible=reversible)

    def merge(self) -> None:
        """``W ← W0 + scale·(T_θ − T_θ0)`` in every layer: no adapter cost at inference.
        Refused, with nothing written, where ``unmerge`` could not give a layer's weight
        back within rounding (``layer.py``); ``merge_and_unload`` needs no such promise.
        Quantized layers are requantized (``merge_reports`` says how closely; a warning
        names those that lost more than ``quantized.MERGE_WARN`` of their update)."""
        self._merge(reversible=True)

    def _merge(self, reversible: bool) -> None:
        if self.merged:
            raise QCError("the adapter is already merged")
        if any(layer.is_meta for layer in self._live().values()):
            raise QCError("cannot merge: the model's weights are on the meta device")
        self._all_layers("merge", reversible=reversible)
        quantized.warn_lossy(self.merge_reports)

    @property
    def merge_reports(self) -> dict[str, quantized.MergeReport]:
        """Per merged quantized layer, how far its requantized weight is from the exact
        merge (``quantized.MergeReport``); empty when nothing quantized is merged."""
        return {name: layer.quant_merged.report for name, layer in self._live().items()
                if layer.quant_merged is not None}

    def unmerge(self) -> None:
        """Undo ``merge`` (each weight within the merge bound of ``layer.py``)."""
        if not self.merged:
            raise QCError("the adapter is not merged")
        self._all_layers("unmerge")

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge, then put each base layer back: the model holds only its own module types.

        With ``dtype``, each adapted layer becomes a plain ``nn.Linear`` (``Conv1D`` for a
        ``Conv1D`` base) in ``dtype`` holding the exact merge ``W0 + scale·(T_θ − T_θ0)``,
        computed in float64 and rounded once, with ``W0`` dequantized for a quantized
        base: the export path for a quantized model (other layers are left as they are)."""
        if dtype is None:
            if not self.merged:
                self._merge(reversible=False)
            return _unwrap(self)
        if self.merged:
            self.unmerge()
        return _unwrap(self, {name: layer.exported(dtype)
                              for name, layer in self._live().items()})

    def fold(self) -> None:
        """Fold every layer that can (``attach``/``load`` do this unless ``fold=False``)."""
        if self.merged:
            raise QCError("unmerge before folding")
        self._all_layers("fold")

    def unfold(self) -> None:
        """Put ``W0`` back in every folded layer: the exact two-circuit form."""
        if self.merged:
            raise QCError("unmerge before unfolding")
        self._all_layers("unfold")

    # --- parameters ----------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter gates, layer by layer, branch by branch (what an optimizer should get)."""
        return [g for layer in self._live().values() for g in layer.gate_parameters()]

    @property
    def num_trainable(self) -> int:
        return sum(layer.num_params for layer in self._live().values())

    @property
    def num_base(self) -> int:
        """Parameters of the base model (adapter and frozen gates excluded)."""
        extra = {id(p) for layer in self._live().values() for p in layer.branches.parameters()}
        return sum(quantized.logical_numel(p) for p in self.model.parameters()
                   if id(p) not in extra)

    def summary(self) -> str:
        layers = self._live()
        rows = [(t.module_name, f"{t.in_features} -> {t.out_features}", t.circuit_name,
                 _options_text(t), f"{t.circuit.num_params:,}",
                 layers[t.module_name].state.value)
                for branches in by_layer(self.targets).values() for t in branches]
        titles = ("module", "in -> out", "circuit", "options", "params", "state")
        widths = [max(len(r[i]) for r in rows + [titles]) for i in range(6)]
        fmt = "  {:<%d}  {:>%d}  {:<%d}  {:<%d}  {:>%d}  {:<%d}" % tuple(widths)
        pct = 100.0 * self.num_trainable / max(self.num_base, 1)
        sums = sum(len(layer.branches) > 1 for layer in layers.values())
        lines = [f"QuanTA adapter on {type(self.model).__name__}: {len(layers)} layers"
                 + (f", {sums} of them sums of circuits" if sums else ""),
                 fmt.format(*titles).rstrip()]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines.append(f"trainable parameters: {self.num_trainable:,} of {self.num_base:,} "
                     f"({pct:.4f} %)")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return f"<Adapted {type(self.model).__name__}: {len(self.layers)} layers>"

    # --- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = True) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``, all or nothing
        (``overwrite=False`` refuses an existing checkpoint; see ``checkpoint.write``).

        Under ``torch.distributed`` every rank must call it (sharded gates are gathered);
        rank 0 writes and the others wait for it."""
        layers = self._live()
        if self.merged:
            raise QCError("unmerge before saving: the checkpoint stores the unmerged adapter")
        _check_not_flat_sharded(self.model)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors.update(layer.tensors(name))
        warn_large_updates({name: layer.update_ratio(name, tensors)
                            for name, layer in layers.items()}, "saving")
        states = {name: layer.state.value for name, layer in layers.items()}
        adapter = record.from_targets(self.program, self.model, self.targets, states)
        checkpoint.write(path, adapter, tensors, overwrite=overwrite)


def _options_text(target: Target) -> str:
    return ", ".join(f"{k} {target.option(k):g}" if k != "init" else target.option(k)
                     for k in ("init", "scale", "dropout"))


def _unwrapped_under_distributed(model: nn.Module) -> bool:
    """Several ranks run, and ``model`` is not sharded in place (FSDP2 ``fully_shard``):
    then a direct call bypasses the wrapper (DDP, FSDP1) that synchronises gradients."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before FSDP2's public name: nothing shards in place
        return True
    return not isinstance(model, FSDPModule)


def _check_not_flat_sharded(model: nn.Module) -> None:
    """Refuse to read or write weights while FSDP1 units in ``model`` hold flat shards: on
    some ranks a parameter can look whole while on others it is not there at all."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._common_utils import TrainingState
    except ImportError:  # pragma: no cover - FSDP1 is part of every supported torch
        return
    units = FullyShardedDataParallel.fsdp_modules(model)
    if any(u.training_state is not TrainingState.SUMMON_FULL_PARAMS for u in units):
        raise QCError("the model's FSDP1 units hold flat shards: call merge/unmerge/fold/save "
                      "on every rank inside `FullyShardedDataParallel.summon_full_params("
                      "wrapped_model, writeback=True)`")


def _check_fresh(model: nn.Module) -> None:
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise QCError("this model already carries a qcircuit adapter: merge_and_unload() it "
                      "or start from a fresh model")


def check_not_shared(model: nn.Module, targets: tuple[Target, ...]) -> None:
    """Refuse a target whose module or weight also lives elsewhere in the model (tied
    embeddings, one Linear reused): folding or merging would change the other user too."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for t in targets:
        weight = model.get_submodule(t.module_name).weight
        names = owners.get(id(weight), [])
        others = [n for n in names if n != f"{t.module_name}.weight"]
        if others:
            raise QCError(
                f"module {t.module_name!r} shares its weight with {', '.join(others)} (tied "
                "weights or a reused layer): folding or merging the adapter would change both. "
                "Untie them first (e.g. tie_word_embeddings=False and a cloned weight) or "
                "leave this module out of the program")


def build_layers(model: nn.Module, targets: tuple[Target, ...],
                 generator: torch.Generator | None) -> dict[str, AdaptedLayer]:
    """One unfolded ``AdaptedLayer`` per adapted module (``model.get_submodule`` gives its
    base layer) with one branch per target on it; gates drawn in target order from
    ``generator``; one plan per distinct circuit. Nothing in ``model`` changes (both front
    doors, native and PEFT, build layers here)."""
    plans: dict[Circuit, object] = {}
    branches: dict[str, list[Branch]] = {}
    for t in targets:
        if t.circuit not in plans:
            plans[t.circuit] = compile_circuit(t.circuit)
        base = model.get_submodule(t.module_name)
        branches.setdefault(t.module_name, []).append(Branch(
            t.circuit_name, t.circuit, base.weight, init=t.option("init"),
            scale=t.option("scale"), dropout=t.option("dropout"), generator=generator,
            plan=plans[t.circuit]))
    return {name: AdaptedLayer(model.get_submodule(name), found, name=name)
            for name, found in branches.items()}


def _wrap(model: nn.Module, program: Program, targets: tuple[Target, ...],
          generator: torch.Generator | None, warm_up: Sequence[int] = ()) -> Adapted:
    """Freeze the model and replace every target layer by an unfolded AdaptedLayer."""
    if not targets:
        raise QCError("the program applies no circuit to this model")
    if any(not t.module_name for t in targets):
        raise QCError("the model itself is a single layer: wrap it in a container first")
    check_not_shared(model, targets)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = build_layers(model, targets, generator)
    if warm_up:   # choose (and measure) each circuit's routes now, not in a forward
        branches = (b for layer in layers.values() for b in layer.branches)
        for branch in {id(b.plan): b for b in branches}.values():
            gate = branch.adapter.gates[0]
            branch.plan.warm_up(*warm_up, device=gate.device, dtype=gate.dtype)
    model.requires_grad_(False)
    for name, layer in layers.items():  # nothing is replaced until every layer was built
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, layer)
    return Adapted(model, program, targets, layers, requires_grad)


def _unwrap(adapted: Adapted, replacements: dict[str, nn.Module] | None = None) -> nn.Module:
    """Put each base layer back (or its replacement, by module name) and restore the
    parameters' ``requires_grad``."""
    model, replacements = adapted.model, replacements or {}
    for name, layer in adapted.layers.items():
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, replacements.get(name, layer.base_layer))
    for name, param in model.named_parameters():
        param.requires_grad_(adapted._requires_grad.get(name, param.requires_grad))
    adapted._unloaded = True
    return model


def fold_all(adapted: Adapted) -> Adapted:
    """Fold every layer that can; on any failure (no weight was changed) put the base
    layers back."""
    try:
        adapted.fold()
    except BaseException:
        _unwrap(adapted)
        raise
    return adapted


def attach(model: nn.Module, program_or_path: Program | str | Path, *,
           seed: int | None = None, fold: bool = True, warm_up: Sequence[int] = ()) -> Adapted:
    """Wrap every layer the program matches, in place; only the adapter gates train.

    ``seed`` makes the gate initialisation reproducible (one generator, target order);
    ``fold`` folds ``freeze_one`` layers now (see the module doc); ``warm_up`` names token
    counts whose routes are chosen now (``Plan.warm_up``), so no forward plans."""
    program = as_program(program_or_path, "attach")
    _check_fresh(model)
    targets = bind(model, program)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    adapted = _wrap(model, program, targets, generator, warm_up)
    return fold_all(adapted) if fold else adapted


def load(model: nn.Module, path: str | Path, *, fold: bool = True,
         warm_up: Sequence[int] = ()) -> Adapted:
    """Restore a saved adapter onto a fresh base model (the one it was trained on); like
    ``attach``, fold ``freeze_one`` layers unless ``fold=False``, and plan ``warm_up``."""
    saved, tensors = checkpoint.read(path)   # the record's checks, hashes, finite values
    _check_fresh(model)
    program = saved.program   # parsed from the config's text, includes disabled
    try:
        targets = bind(model, program)
    except QCError as e:
        raise QCError(f"checkpoint {path} does not fit this model: {e.one_line()}") from None
    record.check_fits(saved, record.layer_records(targets), str(path))
    warning = record.dtype_warning(saved, model)
    if warning:
        warnings.warn(warning, stacklevel=2)
    adapted = _wrap(model, program, targets, None, warm_up)
    for name, layer in adapted.layers.items():
        layer.load_tensors(name, tensors)
    warn_large_updates({name: layer.update_ratio(name, tensors)
                        for name, layer in adapted.layers.items()}, "loading")
    return fold_all(adapted) if fold else adapted
