"""Putting adapted layers into a model and taking them out: the surgery both doors share.

``build_layers`` makes one ``AdaptedLayer`` per adapted module without touching the model
(the native ``attach``/``load`` and the PEFT tuner both build here); ``install`` freezes the
model, makes the trained modules' parameters trainable and puts the layers in, after every
check passed; ``uninstall`` puts the base layers back and the ``requires_grad`` flags the
parameters had. The checks refuse what folding or merging would get wrong: a target whose
weight is shared (tied embeddings), a model that already carries an adapter, FSDP1 flat
shards.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from qcircuit import Circuit, QCError
from qcircuit.compiler import compile as compile_circuit

from .bind import Target
from .branch import Branch
from .layer import AdaptedLayer

__all__ = ["build_layers", "install", "uninstall", "check_fresh", "check_not_shared",
           "check_not_flat_sharded", "unwrapped_under_distributed"]


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def unwrapped_under_distributed(model: nn.Module) -> bool:
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


def check_not_flat_sharded(model: nn.Module) -> None:
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


def check_fresh(model: nn.Module) -> None:
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


def install(model: nn.Module, targets: Sequence[Target], generator: torch.Generator | None,
            warm_up: Sequence[int] = (), trained: Mapping[str, nn.Module] | None = None
            ) -> tuple[dict[str, AdaptedLayer], dict[str, bool]]:
    """Freeze ``model``, let the ``trained`` modules train and replace every target layer by
    an unfolded ``AdaptedLayer``: the layers, and each parameter's former ``requires_grad``
    (for ``uninstall``). Nothing changes unless every layer could be built."""
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
    for module in (trained or {}).values():
        module.requires_grad_(True)
    for name, layer in layers.items():  # nothing is replaced until every layer was built
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, layer)
    return layers, requires_grad


def uninstall(model: nn.Module, layers: Mapping[str, AdaptedLayer],
              requires_grad: Mapping[str, bool],
              replacements: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """Put each base layer back (or its replacement, by module name) and restore the
    parameters' ``requires_grad``."""
    replacements = replacements or {}
    for name, layer in layers.items():
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, replacements.get(name, layer.base_layer))
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    return model
