"""``QuanTAHead``: PEFT's ``ModulesToSaveWrapper`` for a module a QuanTA adapter trains whole.

A task head (``modules_to_save``, ``task_type``, a program's ``train`` statement) behaves
as PEFT makes it behave for LoRA: one trained copy per adapter beside the original
module, switched by ``set_adapter``, bypassed by ``disable_adapter``, put in place by
``merge_and_unload``. What differs is its checkpoint: its tensors are part of the QuanTA
record (``<module>.<tensor>``, hashed like the gates), so PEFT's own key handling for
wrappers is off (``adapter_state_dict`` and ``adapter_state_dict_load_map`` give nothing)
and the tuner's hooks save and load them. Only behind transformers' ``load_adapter``,
where no hook runs, do the tensors land in slots (``landing.py``, under ``qc_landing``),
and the head refuses to run for that adapter until they have all arrived and been checked.
"""
from __future__ import annotations

from typing import Iterable

from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from qcircuit import QCError

from .landing import Arrivals, AwaitsTensors

LANDING = "qc_landing"
_PEFT_PREFIX = "base_model.model."


class QuanTAHead(AwaitsTensors, ModulesToSaveWrapper):
    """A module trained whole by QuanTA adapters: the original and one copy per adapter."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__(module, adapter_name)
        self.qc_pending: dict[str, Arrivals] = {}
        self.register_state_dict_post_hook(_hide_pending)

    def adapter_state_dict(self, adapter_name, state_dict):
        return {}   # saved by the tuner, under qcircuit's names

    def adapter_state_dict_load_map(self, adapter_name):
        """Nothing for PEFT to rename, except for an adapter waiting in landing slots: its
        tensors (``<module>.<tensor>``) are sent there (``<module>.qc_landing.<tensor>``)."""
        pending = self.qc_pending.get(adapter_name)
        if pending is None:
            return {}
        head = pending.module_name + "."
        return {k.removeprefix(head): f"{LANDING}.{k.removeprefix(head)}" for k in pending.records}

    def delete_adapter(self, adapter_name, new_active_adapters):
        self.settle(adapter_name)
        super().delete_adapter(adapter_name, new_active_adapters)

    def forward(self, *args, **kwargs):
        if not self.disable_adapters:
            for name in self.active_adapters:
                self.check_loaded(name)
        return super().forward(*args, **kwargs)


def _hide_pending(head: QuanTAHead, state_dict: dict, prefix: str, local_metadata) -> None:
    """A pending adapter's copy still holds the original's weights: left out of the state
    dict, so no loader reports it missing and no save writes it."""
    for name in head.qc_pending:
        stem = f"{prefix}modules_to_save.{name}."
        for key in [k for k in state_dict if k.startswith(stem)]:
            del state_dict[key]


def trained_heads(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, QuanTAHead]]:
    """qcircuit module name -> (name in ``model``, its ``QuanTAHead``), for every module
    the adapter trains whole."""
    return {name.removeprefix(_PEFT_PREFIX): (name, module) for name, module in
            model.named_modules() if isinstance(module, QuanTAHead)
            and adapter_name in module.modules_to_save}


def _full_name(model: nn.Module, name: str) -> str:
    """The name in ``model`` (a ``PeftModel``'s or a plain one) of qcircuit module ``name``."""
    prefixed = _PEFT_PREFIX + name
    return prefixed if any(n == prefixed for n, _ in model.named_modules()) else name


def check_heads(model: nn.Module, heads: Iterable[str]) -> None:
    """Each module to train whole is plain or already a ``QuanTAHead`` (another adapter's)."""
    for name in heads:
        module = model.get_submodule(_full_name(model, name))
        if isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, QuanTAHead):
            raise QCError(f"module {name} is already wrapped by PEFT's {type(module).__name__} "
                          "(another method's modules_to_save): QuanTA cannot train it too")


def wrap_heads(model: nn.Module, heads: Iterable[str], adapter_name: str, active: list[str],
               inference_mode: bool) -> None:
    """Put each module to train whole in a ``QuanTAHead`` (or add ``adapter_name`` to the
    one there and set its trainability again), as PEFT's ``_set_trainable`` does for LoRA's
    ``modules_to_save``."""
    for name in heads:
        full = _full_name(model, name)
        module = model.get_submodule(full)
        if isinstance(module, QuanTAHead):
            module.update(adapter_name)
            module.set_adapter(module.active_adapter, inference_mode=inference_mode)
            continue
        head = QuanTAHead(module, adapter_name)
        head.set_adapter(adapter_name if adapter_name in active else [],
                         inference_mode=inference_mode)
        parent, _, child = full.rpartition(".")
        setattr(model.get_submodule(parent), child, head)
