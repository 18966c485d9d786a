"""``QuanTAModel``: PEFT's tuner for QuanTA adapters, on top of qcircuit's runtime.

Matching is qcircuit's ``bind`` (the program's ``apply`` rules, ``qudits auto``), run on
the model as it was before any adapter; the layers are ``AdaptedLayer``s built in target
order from one generator, exactly as ``attach`` builds them, and installed into
``QuanTALayer`` containers. Checkpoint tensors use qcircuit's names
(``AdaptedLayer.tensors``: ``<module>.gates.<i>``, ``<module>.init_gates.<i>``), so one
directory serves both front doors.

Loading goes through PEFT's hooks (``_remap_adapter_state_dict_for_load``, which also
checks each tensor's sha256), except behind ``inject_adapter_in_model`` when the loader is
transformers 5's own: there a saved adapter waits in landing slots (landing.py).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from torch import nn

from qcircuit import QCError
from qcircuit.runtime import AdaptedLayer, bind
from qcircuit.runtime import checkpoint, record, trained
from qcircuit.runtime.install import build_layers, check_not_shared  # the native layer and refusal
from qcircuit.runtime.moves import check_all, held_interrupts
from qcircuit.runtime.oversize import NearFullSizeWarning, near_full_size
from qcircuit.runtime.weights import warn_large_updates

from .config import QuanTAConfig, check_target_modules
from .head import LANDING, QuanTAHead, check_heads, trained_heads, wrap_heads
from .landing import Arrivals, HeadArrivals, add_slots
from .layer import QuanTALayer

_PEFT_PREFIX = "base_model.model."


def _plain(module: nn.Module) -> nn.Module:
    """What a QuanTA container stands for: a ``QuanTALayer``'s base layer, a
    ``QuanTAHead``'s original module."""
    if isinstance(module, QuanTALayer):
        return module.base_layer
    return module.original_module if isinstance(module, QuanTAHead) else module


class _BaseView:
    """The model as ``bind`` sees it: each ``QuanTALayer`` stands for its base layer and
    each ``QuanTAHead`` for its original module, and nothing else inside one is visible
    (a second adapter binds to the same plain modules)."""

    def __init__(self, model: nn.Module):
        self._model = model

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, nn.Module]]:
        seen: set[int] = set()

        def walk(name: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
            if remove_duplicate and id(module) in seen:
                return
            seen.add(id(module))
            plain = _plain(module)
            yield name, plain
            if isinstance(module, QuanTALayer):
                return
            for child_name, child in plain.named_children():
                yield from walk(f"{name}.{child_name}" if name else child_name, child)

        yield from walk("", self._model)

    def get_submodule(self, name: str) -> nn.Module:
        module = _plain(self._model)
        for part in name.split(".") if name else ():
            module = _plain(module.get_submodule(part))
        return module


def adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, AdaptedLayer]]:
    """qcircuit module name -> (name in ``model``, the adapter's ``AdaptedLayer``), for a
    ``PeftModel`` (names under ``base_model.model.``) or a model with injected layers."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuanTALayer) and adapter_name in module.qc_adapters:
            out[name.removeprefix(_PEFT_PREFIX)] = (name, module.qc_adapters[adapter_name])
    return out


def checkpoint_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under qcircuit's checkpoint names (``AdaptedLayer.tensors``;
    a trained module's ``<module>.<tensor>``)."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, (full_name, layer) in adapted_layers(model, adapter_name).items():
        model.get_submodule(full_name).check_loaded(adapter_name)
        if layer.merged:
            raise QCError("unmerge before saving: the checkpoint stores the unmerged adapter")
        tensors.update(layer.tensors(module_name))
    for module_name, (_, head) in trained_heads(model, adapter_name).items():
        head.check_loaded(adapter_name)
        tensors.update(trained.state_of(module_name, head.modules_to_save[adapter_name]))
    return tensors


class QuanTAModel(BaseTuner):
    """Creates QuanTA adapters on a model from a :class:`QuanTAConfig` (a qcircuit program)."""

    prefix: str = "quanta_"
    # All state lives in the layers, so PEFT's ``inject_adapter_in_model`` (the door of
    # transformers' ``load_adapter``/``add_adapter``) may build this tuner. Loaders behind
    # that door skip this class's key-mapping hooks: an adapter injected there for a saved
    # checkpoint waits for its tensors in landing slots (landing.py) and refuses to run
    # until they have all arrived and been verified.
    uses_shared_state: bool = False
    tuner_layer_cls = QuanTALayer
    target_module_mapping: dict = {}

    def __init__(self, model: nn.Module, peft_config, adapter_name: str,
                 low_cpu_mem_usage: bool = False,
                 state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        # PeftModel hands the tuner a dict of configs and loads through the hooks below;
        # inject_adapter_in_model hands it one config and returns only the model.
        self._bare_door = isinstance(peft_config, PeftConfig)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                         state_dict=state_dict)

    # --- injection -------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False,
                       state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Bind the program, build every layer (target order, one generator), then let
        PEFT install them through ``_create_and_replace``."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, QuanTAConfig):
            raise QCError(f"QuanTA adapters take a QuanTAConfig, got {type(config).__name__}")
        if low_cpu_mem_usage or _new_parameters_are_meta():
            raise QCError("QuanTA adapters do not support low_cpu_mem_usage=True (gates are "
                          "drawn and checked on real tensors)")
        program = config.to_program()
        saved = config.record if config.record is not None and \
            config.record.tensors is not None else None   # a checkpoint's: tensors to come
        view = _BaseView(model)
        targets = bind(view, program)
        check_not_shared(view, targets)
        layers = {t.module_name for t in targets}
        check_target_modules(config.target_modules, [n for n, _ in view.named_modules() if n],
                             layers)
        if saved is None:   # a new adapter, as attach warns (a loaded one was chosen already)
            for warning in near_full_size(targets):
                warnings.warn(warning, NearFullSizeWarning, stacklevel=2)
        heads = dict.fromkeys([*trained.bind_trained(view, program.trained, layers),
                               *trained.peft_trained(view, config.modules_to_save, layers)])
        current = record.from_targets(program, model, targets,
                                      trained={n: view.get_submodule(n) for n in heads})
        if saved is not None:  # it must describe these very layers and modules
            found = {n: current.modules.get(n) for n in dict.fromkeys([*saved.modules, *heads])}
            record.check_fits(saved, current.layers, "adapter config", found)
            current = current.with_tensors(saved.tensors)   # what the loaded tensors must be
        check_heads(model, heads)
        generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
        self._pending = build_layers(view, targets, generator)   # attach's order
        config.record = current
        if self._bare_door:  # new layers run what the model's other QuanTA layers run
            self.active_adapter = _model_active(model) or adapter_name
        # heads first, so that PEFT's own modules_to_save pass finds them wrapped already
        wrap_heads(model, heads, adapter_name, self.active_adapters, config.inference_mode)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=False, state_dict=None)
        finally:
            self._pending = {}
        wrap_heads(model, heads, adapter_name, self.active_adapters, config.inference_mode)
        if saved is not None and self._bare_door:
            _await_checkpoint(model, config, adapter_name)

    @staticmethod
    def _prepare_adapter_config(peft_config: QuanTAConfig, model_config: dict) -> QuanTAConfig:
        return peft_config

    def _check_target_module_exists(self, peft_config: QuanTAConfig, key: str) -> bool:
        return key in self._pending

    def _check_tied_module_exists(self, peft_config: QuanTAConfig, key: str) -> bool:
        return False

    def _create_and_replace(self, peft_config: QuanTAConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str,
                            parameter_name: Optional[str] = None) -> None:
        layer = self._pending[current_key]
        if isinstance(target, QuanTALayer):
            target.add(adapter_name, layer)
            return
        new = QuanTALayer(target)
        new.add(adapter_name, layer)
        new.set_adapter(self.active_adapters[:1] if self.active_adapters else [adapter_name])
        self._replace_module(parent, target_name, new, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing to do: ``AdaptedLayer`` already keeps gates in float32 (float64 on float64
        layers); PEFT's generic cast would also reach the base layer inside it."""

    # --- named state changes ---------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise QCError(f"QuanTA runs one adapter at a time, got {names}: activate one with "
                          "set_adapter(name)")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise QCError("QuanTA does not support mixed adapter batches (adapter_names=...); "
                          "run one batch per adapter with set_adapter(name)")
        yield

    def _planned_merges(self, adapter_names: Optional[list[str]]) -> dict[str, AdaptedLayer]:
        """Every layer a merge of ``adapter_names`` would move, labelled for messages."""
        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, QuanTALayer):
                for adapter in module.to_merge(adapter_names):
                    module.check_loaded(adapter)
                    out[f"{name} ({adapter})"] = module.qc_adapters[adapter]
        return out

    def merge_adapter(self, adapter_names: Optional[list[str]] = None,
                      safe_merge: bool = False) -> None:
        """PEFT's merge, all or nothing: every layer's merge is planned and checked first
        (qcircuit's ``moves.check_all``), then PEFT's loop writes them, Ctrl-C held."""
        check_all(self._planned_merges(adapter_names), "merge")
        with held_interrupts():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        """``merge_and_unload``/``unload``: with ``merge``, every layer is checked first (a
        merge for good needs no unmerge: no reversibility bound)."""
        if merge:
            check_all(self._planned_merges(adapter_names), "merge", reversible=False)
        with held_interrupts():
            return super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                adapter_names=adapter_names)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
        """PEFT's ``merge_and_unload``; with ``dtype``, each adapted layer becomes a plain
        ``nn.Linear`` (``Conv1D``) in ``dtype`` holding the exact merge, its base weight
        dequantized if quantized (``QuanTALayer.exported``): the export path for a
        quantized base model."""
        if dtype is None:
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                            adapter_names=adapter_names)
        self._check_merge_allowed()
        for name in [n for n, m in self.model.named_modules() if isinstance(m, QuanTALayer)]:
            parent, target, child = _get_submodules(self.model, name)
            setattr(parent, child, target.exported(dtype, adapter_names))
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # --- checkpoints: qcircuit's tensor names ----------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: QuanTAConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        tensors = checkpoint_tensors(model, adapter_name)
        warn_large_updates({name: layer.update_ratio(name, tensors) for name, (_, layer)
                            in adapted_layers(model, adapter_name).items()}, "saving")
        # PEFT writes the config after this hook: it then carries the tensors' hashes, so
        # qcircuit's own reader verifies a save_pretrained directory like a native one
        config.record = config.record.with_tensors(checkpoint.tensor_records(tensors))
        return tensors

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # checkpoint names never carry the adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: QuanTAConfig,
                                           adapter_name: str, state_dict: dict[str, torch.Tensor]
                                           ) -> dict[str, torch.Tensor]:
        """qcircuit names -> this model's parameter names, after checking that the
        tensors are exactly the ones the adapter's layers need (and, where the config
        records them, the very tensors that were saved)."""
        layers = adapted_layers(model, adapter_name)
        heads = trained_heads(model, adapter_name)
        landed = f".{LANDING}."   # a pending head's load map sent its keys there
        state_dict = {k.replace(landed, ".", 1) if landed in k else k: v
                      for k, v in state_dict.items()}
        where, saved = f"checkpoint of adapter {adapter_name!r}", config.record
        if saved.tensors is not None:   # the very tensors that were saved
            checkpoint.check_tensors(where, saved.tensors, state_dict)
        else:   # a state dict for a fresh adapter: the names and shapes its layers need
            checkpoint.check_unrecorded(where, saved, state_dict)
        checkpoint.check_circuits(where, saved, state_dict)
        copies = {name: head.modules_to_save[adapter_name] for name, (_, head) in heads.items()}
        trained.check_loadable(copies, saved.modules, state_dict, where)
        warn_large_updates({name: layer.update_ratio(name, state_dict)
                            for name, (_, layer) in layers.items()}, "loading")
        out = {}
        for module_name, (full_name, layer) in layers.items():
            here = f"{full_name}.qc_adapters.{adapter_name}"
            for key, path in layer.checkpoint_names(module_name).items():
                out[f"{here}.{path}"] = state_dict[key]
        for module_name, (full_name, _) in heads.items():
            for local in trained.entries(copies[module_name]):
                out[f"{full_name}.modules_to_save.{adapter_name}.{local}"] = \
                    state_dict[f"{module_name}.{local}"]
        for full_name, _ in [*layers.values(), *heads.values()]:  # inject_adapter_in_model's
            model.get_submodule(full_name).settle(adapter_name)  # slots: PEFT copies these in
        return out


def _new_parameters_are_meta() -> bool:
    """True inside ``init_empty_weights`` (how PEFT's ``low_cpu_mem_usage`` builds layers)."""
    probe = nn.Module()
    probe.register_parameter("p", nn.Parameter(torch.zeros(1)))
    return probe.p.is_meta


def _model_active(model: nn.Module) -> list[str]:
    """The adapters the model's QuanTA layers run (the first layer's), if it has any."""
    for module in model.modules():
        if isinstance(module, QuanTALayer):
            return list(module.active_adapters)
    return []


def _await_checkpoint(model: nn.Module, config: QuanTAConfig, adapter_name: str) -> None:
    """Landing slots on each layer and trained module of ``adapter_name`` for its recorded
    tensors."""
    for module_name, (full_name, layer) in adapted_layers(model, adapter_name).items():
        keys = layer.checkpoint_names(module_name)
        owner = model.get_submodule(full_name)
        arrivals = Arrivals(owner, adapter_name, module_name, config.record, keys)
        add_slots(owner, arrivals)
        owner.await_tensors(arrivals)
    for module_name, (_, head) in trained_heads(model, adapter_name).items():
        keys = [f"{module_name}.{local}" for local, _ in config.record.modules[module_name].tensors]
        arrivals = HeadArrivals(head, adapter_name, module_name, config.record, keys)
        add_slots(head, arrivals)
        head.await_tensors(arrivals)

