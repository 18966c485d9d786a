"""Checkpoint tensors that arrive through a loader that only knows parameter names.

transformers 5's ``model.load_adapter(dir)`` injects the adapter with PEFT's
``inject_adapter_in_model`` and then fills the model from ``adapter_model.safetensors``
with its own loader (``convert_and_load_state_dict_in_model``): each file key that names
an entry of ``model.state_dict()`` is cast to that entry's dtype and set with ``setattr``
on the module holding it; other keys are logged as unexpected and dropped. No PEFT hook
runs, so the tuner's key mapping (``_remap_adapter_state_dict_for_load``) is skipped.

So each layer of an adapter injected through that door gets *landing slots*: empty
buffers, gate-sized, with the recorded dtype, at exactly the checkpoint's key paths
(``<module>.gates.<i>`` is buffer ``i`` of a ``gates`` child of the module's
``QuanTALayer``; a sum's ``<module>.<circuit>.gates.<i>`` one level deeper). A slot hands what
it is given to the layer's :class:`Arrivals`; when the layer's last tensor has come, the
set is checked against the config's records (``checkpoint.check_tensors`` and
``check_circuits``: what ``checkpoint.read`` checks) and copied into the gates (``AdaptedLayer.load_tensors``), and
the slots go away. Until then the adapter is *pending* on that layer and the layer
refuses to run, merge or save it: a tensor the file lacks, one the loader renamed, or one
that fails its hash never leaves random gates in use. A module the adapter trains whole
(``head.QuanTAHead``) gets slots too (:class:`HeadArrivals`), under its ``qc_landing``
child, where its load map sends the file's ``<module>.<tensor>`` keys.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from qcircuit import QCError
from qcircuit.runtime import checkpoint, trained
from qcircuit.runtime.record import AdapterRecord, TensorRecord
from qcircuit.runtime.weights import warn_large_updates


class Arrivals:
    """The checkpoint tensors one ``AdaptedLayer`` of a pending adapter waits for."""

    under = ""   # a child of the owner the slots hang under ("": the key's own path)

    def __init__(self, owner: nn.Module, adapter_name: str, module_name: str,
                 record: AdapterRecord, keys: Collection[str]):
        self.owner, self.adapter_name, self.module_name = owner, adapter_name, module_name
        self.record = record
        self.records: dict[str, TensorRecord] = {k: record.tensors[k] for k in keys}
        self.received: dict[str, torch.Tensor] = {}
        self.failure: str | None = None

    def why(self) -> str:
        """Why the adapter cannot run on this layer, for the refusal."""
        head = f"adapter {self.adapter_name!r} on {self.module_name}"
        if self.failure is not None:
            return (f"{head} failed to load, so it cannot run: {self.failure}\n(delete the "
                    f"adapter, e.g. peft.functional.delete_adapter(model, "
                    f"{self.adapter_name!r}, prefix='quanta_'), or start from a fresh model)")
        missing = sorted(self.records.keys() - self.received.keys())
        return (f"{head} was injected for a saved checkpoint whose tensors never arrived "
                f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}): load it with "
                f"load_adapter(dir) or PeftModel.from_pretrained(model, dir), whose files "
                f"qcircuit verifies; delete it to go on without it")

    def receive(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.records or key in self.received:
            raise QCError(f"{self.module_name}: checkpoint tensor {key} "
                          f"{'delivered twice' if key in self.received else 'not expected'}")
        self.received[key] = tensor.detach()
        if len(self.received) == len(self.records):
            self._complete()

    def _complete(self) -> None:
        where = f"checkpoint of adapter {self.adapter_name!r} ({self.module_name})"
        owner, tensors, self.received = self.owner, self.received, {}
        remove_slots(owner, self)
        try:
            checkpoint.check_tensors(where, self.records, tensors)
            self.deliver(tensors, where)
        except QCError as e:
            self.failure = str(e)
            raise
        del owner.qc_pending[self.adapter_name]

    def deliver(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Checked tensors into the layer's gates."""
        checkpoint.check_circuits(where, self.record, tensors, modules=[self.module_name])
        layer = self.owner.qc_adapters[self.adapter_name]
        layer.load_tensors(self.module_name, tensors)
        warn_large_updates({self.module_name: layer.update_ratio(self.module_name, tensors)},
                           "loading")


class HeadArrivals(Arrivals):
    """The tensors of a module trained whole (``head.QuanTAHead``), landing under
    ``qc_landing``: checked, then copied into the adapter's copy of the module."""

    under = "qc_landing"

    def deliver(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        copy = {self.module_name: self.owner.modules_to_save[self.adapter_name]}
        trained.check_loadable(copy, self.record.modules, tensors, where)
        trained.copy_into(copy, tensors)


class Slot(nn.Module):
    """A node of the landing paths: buffers to be *set* (never read) by a loader."""

    def __init__(self, arrivals: Arrivals, prefix: str):
        super().__init__()
        object.__setattr__(self, "_arrivals", arrivals)
        object.__setattr__(self, "_prefix", prefix)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_buffers", {}) and isinstance(value, torch.Tensor):
            self._arrivals.receive(self._prefix + name, value)
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"landing for {self._arrivals.adapter_name!r}: {sorted(self._buffers)}"


def add_slots(owner: nn.Module, arrivals: Arrivals) -> None:
    """Landing slots on ``owner`` (the ``QuanTALayer`` of ``arrivals.module_name``) at each
    recorded key's path below it."""
    module_name = arrivals.module_name
    device = next(iter(owner.parameters())).device   # real, sized: the model still moves
    for key, rec in arrivals.records.items():
        *path, leaf = key.removeprefix(module_name + ".").split(".")
        node, prefix = owner, module_name + "."
        for k, part in enumerate([arrivals.under] + path if arrivals.under else path):
            prefix += "" if arrivals.under and k == 0 else part + "."
            child = node._modules.get(part)
            if child is None:
                if hasattr(node, part):
                    raise QCError(f"{module_name}: checkpoint key {key} would land on "
                                  f"{type(node).__name__}.{part}, which is taken: this "
                                  f"adapter cannot be loaded with transformers' load_adapter; "
                                  f"use PeftModel.from_pretrained")
                child = Slot(arrivals, prefix)
                node.add_module(part, child)
            elif not isinstance(child, Slot) or child._arrivals is not arrivals:
                raise QCError(f"{module_name}: checkpoint key {key} would land on {prefix}, "
                              f"which is taken (another adapter still pending there?)")
            node = child
        node.register_buffer(leaf, torch.empty(rec.shape, dtype=getattr(torch, rec.dtype),
                                               device=device))


def remove_slots(owner: nn.Module, arrivals: Arrivals) -> None:
    """Drop the landing children ``add_slots`` made on ``owner`` for ``arrivals``."""
    for name, child in list(owner._modules.items()):
        if isinstance(child, Slot) and child._arrivals is arrivals:
            del owner._modules[name]


class AwaitsTensors:
    """The waiting half of a module whose checkpoint tensors arrive through landing slots
    (a ``QuanTALayer``, a ``QuanTAHead``): ``qc_pending`` maps an adapter's name to its
    ``Arrivals`` until they are all in."""

    qc_pending: dict[str, Arrivals]

    def await_tensors(self, arrivals: Arrivals) -> None:
        """Keep ``arrivals.adapter_name`` pending until its checkpoint tensors arrive."""
        self.qc_pending[arrivals.adapter_name] = arrivals

    def check_loaded(self, adapter_name: str) -> None:
        """QCError if ``adapter_name`` still waits for (or failed) its checkpoint tensors."""
        if adapter_name in self.qc_pending:
            raise QCError(self.qc_pending[adapter_name].why())

    def settle(self, adapter_name: str) -> None:
        """Stop waiting for ``adapter_name``'s tensors (a loader is handing them over)."""
        pending = self.qc_pending.pop(adapter_name, None)
        if pending is not None:
            remove_slots(self, pending)

