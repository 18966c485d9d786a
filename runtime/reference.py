"""Import adapters trained with the QuanTA reference implementation (the paper's PEFT fork).

The fork saves through ``transformers.Trainer`` as a whole-model state dict
(``checkpoint-*/pytorch_model.bin``, sharded or not, or ``model.safetensors``). For each
adapted module ``M`` it holds

* ``base_model.model.M.quanta_weights.{i} {j}``: the trained gates, one per pair ``(i, j)``
  of ``itertools.combinations(range(-1, -d-1, -1), 2)`` in that order, shaped
  ``(d_j, d_i, d_j, d_i)`` (``d_k``: the dim of qudit ``d+k``). Gate ``k`` acts on qudits
  ``(d+j, d+i)``, outputs first: qcircuit's gate convention, and the pairs' order is
  qcircuit's ``all_pairs``;
* ``base_model.model.M.quanta_weights2.{i} {j}``: the frozen initial gates;
* ``base_model.model.M.weight``: ``W0 − T(θ0)`` rounded to the training dtype (not needed:
  the imported adapter attaches to the original ``W0``).

Each module's qudit dims come from its gate shapes and its targets from the keys, so no
config is needed, and the base model may sit on the meta device. The result is a
``freeze_one`` adapter with scale 1 (the fork has no scale), ``W0 + T(θ) − T(θ0)``.

Reading the files (``reference_files.py``) treats them as hostile input: regular files
inside the directory given, bounded, schema-checked, real floating-point gates only. A
``.bin`` is a pickle, read tensors-only there: the one place qcircuit unpickles anything;
convert once, then keep the safetensors adapter.
"""
from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from qcircuit import Circuit, Program, QCError, parse

from .adapter import Adapted, fold_all, attach
from .bind import layer_shape
from .oversize import NearFullSizeWarning
from .reference_files import gate_key, read_reference

__all__ = ["import_reference", "read_reference", "reference_program"]

def _module_gates(module: str, gates: dict, frozen: dict
                  ) -> tuple[tuple[int, ...], list, list]:
    """Qudit dims and the trained and frozen gates in circuit order (the fork's pair order
    is ``all_pairs``) of one module, after every check."""
    pairs = list(gates)
    d = max(-min(p) for p in pairs)
    want = list(itertools.combinations(range(-1, -d - 1, -1), 2))
    if set(pairs) != set(want):
        missing = sorted(set(want) - set(pairs), reverse=True)
        raise QCError(f"{module}: gates {sorted(pairs, reverse=True)} are not every pair of "
                      f"{d} qudits (missing {missing})")
    if set(frozen) != set(want):
        raise QCError(f"{module}: the frozen initial gates (quanta_weights2) are missing or "
                      f"incomplete ({len(frozen)} of {len(want)}); only the fork's "
                      "sum_opposite_freeze_one checkpoints can be imported")
    dims: list[int | None] = [None] * d
    for i, j in want:
        shape = tuple(gates[(i, j)].shape)
        if len(shape) != 4 or shape[:2] != shape[2:]:
            raise QCError(f"{module}: gate '{i} {j}' has shape {shape}; only square gates "
                          "(d_j, d_i, d_j, d_i) can be imported (the fork's per_dim_features2 "
                          "is not supported)")
        if tuple(frozen[(i, j)].shape) != shape:
            raise QCError(f"{module}: frozen gate '{i} {j}' has shape "
                          f"{tuple(frozen[(i, j)].shape)}, the trained one {shape}")
        for qudit, dim in ((d + j, shape[0]), (d + i, shape[1])):
            if dims[qudit] not in (None, dim):
                raise QCError(f"{module}: inconsistent gate shapes: qudit {qudit} has dim "
                              f"{dims[qudit]} in one gate and {dim} in gate '{i} {j}'")
            dims[qudit] = dim
    return tuple(dims), [gates[p] for p in want], [frozen[p] for p in want]


def reference_program(model: nn.Module, state: dict[str, torch.Tensor]
                      ) -> tuple[Program, dict[str, torch.Tensor]]:
    """The ``.qc`` program a reference state dict describes for ``model``, and its gates
    and frozen gates under qcircuit's checkpoint names (``AdaptedLayer.load_tensors``)."""
    found: dict[str, tuple[dict, dict]] = {}
    for key, tensor in state.items():
        parsed = gate_key(key)
        if parsed is None:
            continue
        module, is_frozen, i, j = parsed
        gates, frozen = found.setdefault(module, ({}, {}))
        (frozen if is_frozen else gates)[(i, j)] = tensor
    modules = dict(model.named_modules())
    circuits: dict[Circuit, list[str]] = {}
    tensors = {}
    for name in sorted(found):
        gates, frozen = found[name]
        if not gates:
            raise QCError(f"{name}: frozen gates (quanta_weights2) without trained gates")
        if name not in modules or layer_shape(modules[name]) is None:
            raise QCError(f"the checkpoint adapts {name!r}, which is not a linear layer of "
                          f"{type(model).__name__}")
        _, n_in, n_out = layer_shape(modules[name])
        if n_in != n_out:
            raise QCError(f"{name}: {n_in} -> {n_out} features; only square layers can be "
                          "imported")
        dims, trained, initial = _module_gates(name, gates, frozen)
        if math.prod(dims) != n_in:
            raise QCError(f"{name}: qudits {'·'.join(map(str, dims))} = {math.prod(dims)} "
                          f"features but the layer has {n_in}: padded checkpoints cannot be "
                          "imported")
        circuit = Circuit(*dims).all_pairs()
        circuits.setdefault(circuit, []).append(name)
        tensors.update({f"{name}.gates.{k}": t for k, t in enumerate(trained)})
        tensors.update({f"{name}.init_gates.{k}": t for k, t in enumerate(initial)})
    blocks, rules = [], []
    for k, (circuit, names) in enumerate(circuits.items()):
        cname = f"reference{k}"
        blocks.append(circuit.to_qc(name=cname))
        rules.append(f"apply {cname} to " + ", ".join(names))  # whole names: exact matches
    text = "\n".join(blocks + rules + ["option init = freeze_one", "option scale = 1.0"]) + "\n"
    return parse(text), tensors


def import_reference(model: nn.Module, checkpoint: str | Path) -> Adapted:
    """Attach the adapter of a reference checkpoint to ``model`` (the original base model,
    real or on the meta device): ``W0 + T(θ) − T(θ0)`` in every adapted layer. Call
    ``.save(dir)`` on the result to write a qcircuit/PEFT adapter."""
    program, tensors = reference_program(model, read_reference(checkpoint))
    with warnings.catch_warnings():   # the circuits are the checkpoint's, trained already
        warnings.simplefilter("ignore", NearFullSizeWarning)
        adapted = attach(model, program, fold=False)
    for name, layer in adapted.layers.items():
        layer.load_tensors(name, tensors)
    return fold_all(adapted)  # like attach and load: one circuit per forward
