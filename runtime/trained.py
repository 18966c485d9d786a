"""Modules trained whole beside the circuits: a task head, PEFT's ``modules_to_save``.

A program's ``train`` patterns (and ``attach(..., train=)``) select modules by name with
``apply``'s rule; PEFT's ``modules_to_save`` selects them with PEFT's own rule (a plain
suffix of the name, as for LoRA). Either way a selected module (the outermost, where a
pattern matches a module and its children) is checked here before anything changes:
it has floating-point parameters, neither is an adapted layer nor contains or lies
inside one, and shares no parameter with a module outside it (a tied head would train
the embedding too). Its state is its floating-point ``state_dict`` entries (parameters
and buffers), saved as ``<module>.<name>`` in its own dtype, hashed and checked like the
gates (``checkpoint.py``), and copied back whole by every door after every check passed.
"""
from __future__ import annotations

from typing import Collection, Iterable, Mapping, Sequence

import torch
from torch import nn

from qcircuit import Pattern, QCError

from .record import ModuleRecord, overlap
from .weights import full_tensor

__all__ = ["bind_trained", "peft_trained", "check_trainable", "state_of", "entries",
           "check_loadable", "copy_into"]


def bind_trained(model: nn.Module, patterns: Sequence[Pattern],
                 layers: Collection[str]) -> tuple[str, ...]:
    """The modules ``patterns`` select (``apply``'s matching rule; each pattern must match
    one), outermost first in model order, each checked (module doc) against the adapted
    ``layers``; a ``QCError`` located at the pattern otherwise."""
    modules = dict(model.named_modules())
    found: dict[str, Pattern] = {}
    for pattern in patterns:
        names = [n for n in modules if n and pattern.matches(n)]
        if not names:
            shown = getattr(model, "_model", model)   # the PEFT door binds through a view
            raise QCError(f"train pattern {str(pattern)!r} matches no module of "
                          f"{type(shown).__name__}", pattern.span,
                          expected="a module-name suffix like classifier, or a /regex/")
        for name in names:
            found.setdefault(name, pattern)
    chosen = _outermost(modules, found)
    for name in chosen:
        check_trainable(model, name, layers, found[name])
    return chosen


def peft_trained(model: nn.Module, names: Iterable[str] | None,
                 layers: Collection[str]) -> tuple[str, ...]:
    """The modules PEFT's ``modules_to_save`` selects, by PEFT's rule for LoRA (a module
    whose name ends with an entry; an entry that matches nothing is passed over, as PEFT
    does for the heads it adds for a task type), outermost first, each checked."""
    entries = list(dict.fromkeys(names or ()))
    modules = dict(model.named_modules())
    found = {n: None for n in modules if n and any(n.endswith(e) for e in entries)}
    chosen = _outermost(modules, found)
    for name in chosen:
        check_trainable(model, name, layers, None, "modules_to_save")
    return chosen


def _outermost(modules: Mapping[str, nn.Module], found: Collection[str]) -> tuple[str, ...]:
    chosen: list[str] = []
    for name in modules:   # named_modules lists a parent before its children
        if name in found and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return tuple(chosen)


def check_trainable(model: nn.Module, name: str, layers: Collection[str],
                    pattern: Pattern | None = None, how: str = "train") -> None:
    """Refuse a module that cannot be trained whole (module doc)."""
    span = pattern.span if pattern is not None else None
    module = model.get_submodule(name)
    layer = overlap(name, layers)
    if layer is not None:
        what = "is" if layer == name else "contains" if layer.startswith(name + ".") else \
            "lies inside"
        raise QCError(f"{how}: module {name!r} {what} the adapted layer {layer!r}: a module is "
                      "either adapted by a circuit or trained whole", span,
                      expected="a pattern naming modules that no apply rule adapts")
    params = dict(module.named_parameters())
    if not params:
        raise QCError(f"{how}: module {name!r} ({type(module).__name__}) has no parameters "
                      "to train", span, expected="a module with parameters, e.g. classifier")
    for local, p in params.items():
        if not p.is_floating_point():
            raise QCError(f"{how}: module {name!r} holds {local} as {str(p.dtype)[6:]} "
                          "(quantized?): only floating-point modules can be trained whole", span)
    inside = {id(p) for p in params.values()}
    for owner, child in model.named_modules(remove_duplicate=False):
        if owner == name or owner.startswith(name + "."):
            continue
        for local, p in child.named_parameters(recurse=False):
            if id(p) in inside:
                raise QCError(f"{how}: module {name!r} shares a weight with "
                              f"{owner + '.' if owner else ''}{local} (tied weights): training "
                              "it would change both. Untie them first or leave it out", span)


def state_of(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point state as saved: ``<name>.<entry>`` -> a CPU copy (a
    collective for DTensor parameters: every rank must call)."""
    out = {}
    for local, t in entries(module).items():
        if t.is_meta:
            raise QCError(f"cannot save the trained module {name}: its weights are on the meta "
                          "device (a shape-only model); attach to a model with real weights")
        out[f"{name}.{local}"] = full_tensor(t, t.shape, f"{name}.{local}").to("cpu", copy=True)
    return out


def entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point ``state_dict`` entries (what is saved), by local name."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()}


def check_loadable(modules: Mapping[str, nn.Module], records: Mapping[str, ModuleRecord],
                   tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Before anything is written: each module is what its record says, and each saved
    tensor fits the dtype of the entry it is copied into (a float32 head into a float16
    model must not overflow)."""
    for name, module in modules.items():
        why = records[name].difference(ModuleRecord.of(module))
        if why:
            raise QCError(f"{where}: trained module {name}: {why}")
        for local, entry in entries(module).items():
            t = tensors[f"{name}.{local}"]
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > torch.finfo(entry.dtype).max:
                raise QCError(f"{where}: tensor {name}.{local} holds {peak:.3g}, beyond "
                              f"{str(entry.dtype)[6:]}, the dtype of the model's {name}")


@torch.no_grad()
def copy_into(modules: Mapping[str, nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the saved state into each module (``check_loadable`` first)."""
    for name, module in modules.items():
        for local, entry in entries(module).items():
            src = tensors[f"{name}.{local}"].to(entry.device)
            if hasattr(entry, "device_mesh"):   # DTensor: every rank holds src, keep its shard
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src.to(entry.dtype), entry.device_mesh, entry.placements)
            entry.copy_(src)
