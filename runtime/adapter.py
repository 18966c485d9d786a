"""Attach QuanTA adapters to a model, and the ``Adapted`` handle on the result.

``attach``/``load`` replace every layer the program matches by an :class:`AdaptedLayer`
(``layer.py``: the math, the states and what the base weight holds in each) and leave the
model ready to train: only the gates and the modules trained whole (``train`` statements,
``attach(..., train=)``: a task head, ``trained.py``) are trainable, and with ``fold=True`` (the default)
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from qcircuit import Pattern, Program, QCError, as_program
from qcircuit.program import as_pattern

from . import checkpoint, quantized, record, trained as trained_modules
from .bind import Target, bind, by_layer
from .branch import Branch
from .install import (check_fresh, check_not_flat_sharded, install, uninstall,
                      unwrapped_under_distributed)
from .layer import AdaptedLayer, LayerState
from .moves import move_all
from .oversize import NearFullSizeWarning, near_full_size
from .record import ModuleRecord
from .weights import warn_large_updates

__all__ = ["Adapted", "AdaptedLayer", "Branch", "LayerState", "attach", "load"]


class Adapted:
    """Handle on a model whose matched layers carry circuit adapters (and whose ``trained``
    modules, by name, train whole beside them).

    Callable like the model; other attributes are looked up on the model. Once the model
    is wrapped (DDP, DataParallel, ``torch.compile``), call the wrapper, not this handle.
    """

    def __init__(self, model: nn.Module, program: Program, targets: tuple[Target, ...],
                 layers: dict[str, AdaptedLayer], requires_grad: dict[str, bool],
                 trained: tuple[str, ...] = ()):
        self.model = model
        self.program = program
        self.targets = targets
        self.layers = layers
        self.trained = trained
        self._requires_grad = requires_grad
        self._unloaded = False
        self._warned = False

    def __call__(self, *args, **kwargs):
        if not self._warned and self.model.training and torch.is_grad_enabled() \
                and unwrapped_under_distributed(self.model):
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

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules trained whole beside the circuits, by name."""
        self._live()
        return {name: self.model.get_submodule(name) for name in self.trained}

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
        check_not_flat_sharded(self.model)
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
        """Merge, then put each base layer back: the model holds only its own module types
        (trained modules keep their trained weights).

        With ``dtype``, each adapted layer becomes a plain ``nn.Linear`` (``Conv1D`` for a
        ``Conv1D`` base) in ``dtype`` holding the exact merge ``W0 + scale·(T_θ − T_θ0)``,
        computed in float64 and rounded once, with ``W0`` dequantized for a quantized
        base: the export path for a quantized model (other layers are left as they are)."""
        if dtype is None:
            if not self.merged:
                self._merge(reversible=False)
            return self._unload()
        if self.merged:
            self.unmerge()
        return self._unload({name: layer.exported(dtype) for name, layer in self._live().items()})

    def _unload(self, replacements: dict[str, nn.Module] | None = None) -> nn.Module:
        uninstall(self.model, self._live(), self._requires_grad, replacements)
        self._unloaded = True
        return self.model

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

    @contextmanager
    def disable_adapter(self) -> Iterator["Adapted"]:
        """Inside the block the model runs without its circuits: each adapted layer computes
        its base layer's ``W0·x + b`` (an unfolded layer runs the base layer alone; a folded
        one adds back the frozen circuits ``s·T_θ0·x`` that folding took out of ``W``, so it
        matches within the fold's rounding, about 1e-6 relative in float32). Nothing is
        written — no weight, buffer or gate — only a flag that each layer's forward reads,
        so a wrapper (DDP, DataParallel replicas, ``torch.compile``) runs what the block
        says, and after the block the model is bit for bit what it was. Modules trained
        whole keep their trained weights: they are part of the fine-tuned model, not an
        additive adapter. A merged adapter is refused: ``unmerge()`` first."""
        layers = self._live()
        if self.merged:
            raise QCError("disable_adapter() on a merged adapter: the update is in the base "
                          "weights; unmerge() first (disable_adapter never writes weights)")
        before = {name: layer.disabled for name, layer in layers.items()}
        for layer in layers.values():
            layer.disabled = True
        try:
            yield self
        finally:
            for name, layer in layers.items():
                layer.disabled = before[name]

    # --- parameters ----------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter gates, layer by layer, branch by branch, then the trained modules'
        parameters (what an optimizer should get)."""
        gates = [g for layer in self._live().values() for g in layer.gate_parameters()]
        return gates + [p for m in self.trained_modules().values() for p in m.parameters()]

    @property
    def num_trainable(self) -> int:
        """Trainable parameters: every gate and every trained module's parameter."""
        modules = self.trained_modules().values()
        return sum(layer.num_params for layer in self._live().values()) + \
            sum(p.numel() for m in modules for p in m.parameters())

    @property
    def num_base(self) -> int:
        """Parameters of the base model (adapter and frozen gates excluded)."""
        extra = {id(p) for layer in self._live().values() for p in layer.branches.parameters()}
        return sum(quantized.logical_numel(p) for p in self.model.parameters()
                   if id(p) not in extra)

    def print_trainable_parameters(self) -> None:
        """PEFT's line: trainable parameters, all parameters (the base model's and the
        gates; the frozen initial gates are constants and not counted), percentage."""
        gates = sum(layer.num_params for layer in self._live().values())
        total = self.num_base + gates
        print(f"trainable params: {self.num_trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * self.num_trainable / max(total, 1):.4f}")

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
        lines += [f"  trained whole: {name} ({type(m).__name__}, "
                  f"{sum(p.numel() for p in m.parameters()):,} params)"
                  for name, m in self.trained_modules().items()]
        lines.append(f"trainable parameters: {self.num_trainable:,} of {self.num_base:,} "
                     f"({pct:.4f} %)")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return f"<Adapted {type(self.model).__name__}: {len(self.layers)} layers>"

    # --- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = True) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (the gates and the
        trained modules), all or nothing (``overwrite=False`` refuses an existing
        checkpoint; a directory holding other files, such as a training run's
        ``checkpoint-*`` folders, keeps them: see ``checkpoint.write``).

        Under ``torch.distributed`` every rank must call it (sharded gates are gathered);
        rank 0 writes and the others wait for it."""
        layers = self._live()
        if self.merged:
            raise QCError("unmerge before saving: the checkpoint stores the unmerged adapter")
        check_not_flat_sharded(self.model)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors.update(layer.tensors(name))
        warn_large_updates({name: layer.update_ratio(name, tensors)
                            for name, layer in layers.items()}, "saving")
        trained = self.trained_modules()
        for name, module in trained.items():
            tensors.update(trained_modules.state_of(name, module))
        states = {name: layer.state.value for name, layer in layers.items()}
        adapter = record.from_targets(self.program, self.model, self.targets, states, trained)
        checkpoint.write(path, adapter, tensors, overwrite=overwrite)

    def restore(self, path: str | Path) -> None:
        """Copy a saved adapter's gates and trained modules into this one (the same program
        and modules on the same model): what ``transformers.Trainer`` does on resume
        (``trainer.py``). Every check of ``load`` runs first; folded layers are unfolded,
        given the saved gates (frozen ones too) and folded again."""
        saved, tensors = checkpoint.read(path)
        layers = self._live()
        if self.merged:
            raise QCError("unmerge before restoring a checkpoint")
        check_not_flat_sharded(self.model)
        trained = self.trained_modules()
        if set(saved.modules) != set(trained):
            raise QCError(f"checkpoint {path} trains the modules {sorted(saved.modules)}, this "
                          f"adapter trains {sorted(trained)}")
        record.check_fits(saved, record.layer_records(self.targets), str(path),
                          {name: ModuleRecord.of(m) for name, m in trained.items()})
        trained_modules.check_loadable(trained, saved.modules, tensors, str(path))
        folded = any(layer.folded for layer in layers.values())
        if folded:
            self._all_layers("unfold")
        for name, layer in layers.items():
            layer.load_tensors(name, tensors)
        trained_modules.copy_into(trained, tensors)
        if folded:
            self._all_layers("fold")


def _options_text(target: Target) -> str:
    return ", ".join(f"{k} {target.option(k):g}" if k != "init" else target.option(k)
                     for k in ("init", "scale", "dropout"))


def _wrap(model: nn.Module, program: Program, targets: tuple[Target, ...],
          generator: torch.Generator | None, warm_up: Sequence[int],
          trained: dict[str, nn.Module]) -> Adapted:
    """Freeze the model, let ``trained`` train, install an unfolded AdaptedLayer per layer."""
    layers, requires_grad = install(model, targets, generator, warm_up, trained)
    return Adapted(model, program, targets, layers, requires_grad, tuple(trained))


def fold_all(adapted: Adapted) -> Adapted:
    """Fold every layer that can; on any failure (no weight was changed) put the base
    layers back."""
    try:
        adapted.fold()
    except BaseException:
        adapted._unload()
        raise
    return adapted


def _with_patterns(program: Program, train: Iterable[str | Pattern] | str | Pattern) -> Program:
    """``program`` with the ``train`` patterns it does not have yet added."""
    patterns = [train] if isinstance(train, (str, Pattern)) else list(train)
    extra = [p for p in dict.fromkeys(as_pattern(p) for p in patterns) if p not in program.trained]
    return program.train(*extra) if extra else program


def attach(model: nn.Module, program_or_path: Program | str | Path, *,
           seed: int | None = None, fold: bool = True, warm_up: Sequence[int] = (),
           train: Iterable[str | Pattern] | str | Pattern = ()) -> Adapted:
    """Wrap every layer the program matches, in place; the gates and the modules the
    program's ``train`` patterns select train, nothing else.

    ``program_or_path`` is a ``Program``, a ``.qc`` path or ``.qc`` text (``as_program``);
    ``train`` adds patterns of modules to train whole (``attach(m, p, train=["classifier"])``
    is ``attach(m, p.train("classifier"))``: they are saved with the program); ``seed``
    makes the gate initialisation reproducible (one generator, target order); ``fold``
    folds ``freeze_one`` layers now (see the module doc); ``warm_up`` names token counts
    whose routes are chosen now (``Plan.warm_up``), so no forward plans."""
    program = _with_patterns(as_program(program_or_path, "attach"), train)
    check_fresh(model)
    targets = bind(model, program)
    names = trained_modules.bind_trained(model, program.trained, {t.module_name for t in targets})
    for warning in near_full_size(targets):
        warnings.warn(warning, NearFullSizeWarning, stacklevel=2)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    adapted = _wrap(model, program, targets, generator, warm_up,
                    {name: model.get_submodule(name) for name in names})
    return fold_all(adapted) if fold else adapted


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def load(model: nn.Module, path: str | Path, *, fold: bool = True,
         warm_up: Sequence[int] = ()) -> Adapted:
    """Restore a saved adapter onto a fresh base model (the one it was trained on): its
    gates and its trained modules (a task head gets the trained weights, whatever the
    model's own were). Like ``attach``, fold ``freeze_one`` layers unless ``fold=False``,
    and plan ``warm_up``. Every check runs before anything changes: a refused load leaves
    the model bit for bit as it was."""
    saved, tensors = checkpoint.read(path)   # the record's checks, hashes, finite values
    check_fresh(model)
    program = saved.program   # parsed from the config's text, includes disabled
    try:
        targets = bind(model, program)
        layers = {t.module_name for t in targets}
        bound = trained_modules.bind_trained(model, program.trained, layers)
        found = {name: _find(model, name) for name in dict.fromkeys([*saved.modules, *bound])}
        for name in (n for n, m in found.items() if m is not None):
            trained_modules.check_trainable(model, name, layers)
    except QCError as e:
        raise QCError(f"checkpoint {path} does not fit this model: {e.one_line()}") from None
    record.check_fits(saved, record.layer_records(targets), str(path),
                      {n: None if m is None else ModuleRecord.of(m) for n, m in found.items()})
    trained = {name: found[name] for name in saved.modules}
    trained_modules.check_loadable(trained, saved.modules, tensors, str(path))
    warning = record.dtype_warning(saved, model)
    if warning:
        warnings.warn(warning, stacklevel=2)
    adapted = _wrap(model, program, targets, None, warm_up, trained)
    for name, layer in adapted.layers.items():
        layer.load_tensors(name, tensors)
    warn_large_updates({name: layer.update_ratio(name, tensors)
                        for name, layer in adapted.layers.items()}, "loading")
    adapted = fold_all(adapted) if fold else adapted
    trained_modules.copy_into(trained, tensors)   # last: a refused fold left the model as it was
    return adapted
