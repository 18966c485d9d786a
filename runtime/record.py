"""The meaning of an adapter directory as one immutable value, with one validator.

An :class:`AdapterRecord` is what ``adapter_config.json`` says: the program (parsed, so
the options *are* the program's and cannot disagree with it), the model's identity, one
:class:`LayerRecord` per adapted module (features, state, and one :class:`BranchRecord`
per ``apply`` rule on it) and one :class:`TensorRecord` per saved tensor (dtype, shape,
sha256). Every door reads and writes through it: the native ``save``/``load``
(``checkpoint.py``), and the PEFT method, whose ``QuanTAConfig`` carries a record rather
than a copy of its fields.

``from_json`` is the one validator. It takes any parsed JSON value and returns a record or
raises one ``QCError`` naming the file and the field: the shape of every field
(``checkpoint_schema.check_config``, after the one format-2 upgrade), the program parsed as
*text* with includes disabled, the stored options against the program, and the layer
records against what the program itself gives those layers (each branch's circuit, gate
shapes, frozen copy and options), so an edited ``scale`` anywhere is refused whichever door
reads it. Checking a record against a model (``check_fits``) is separate: a record is
valid or not on its own.

Trainable extras (a task head: ``train`` statements, PEFT's ``modules_to_save``) are one
more mapping beside ``layers``: ``modules``, one :class:`ModuleRecord` per module trained
whole (its class and the shapes of its tensors, saved as ``<module>.<tensor>``), listed by
``expected_tensors`` like the gates. A trained module never overlaps an adapted layer, and
every ``train`` pattern of the stored program matches a recorded module; any tensor that
neither a layer nor a module calls for is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Sequence

import torch
from torch import nn

import qcircuit
from qcircuit import Program, QCError, parse
from qcircuit.errors import with_article
from qcircuit.ir import OPTION_DEFAULTS

from .bind import Target, bind, by_layer
from .checkpoint_schema import (FORMAT, FORMAT_VERSION, IDENTITY_KEYS, PEFT_TYPE,
                                branch_tensor_names, check_config, upgrade)

__all__ = ["TensorRecord", "BranchRecord", "LayerRecord", "ModuleRecord", "AdapterRecord", "from_json",
           "from_targets", "layer_records", "model_identity", "check_fits", "dtype_warning"]


@dataclass(frozen=True)
class TensorRecord:
    """One saved tensor: ``"float32"`` or ``"float64"``, its shape, the sha256 of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256}


@dataclass(frozen=True)
class BranchRecord:
    """One circuit on one layer: its name and ``.qc`` text, gate shapes, whether it keeps
    frozen initial gates, and the options it runs with."""

    circuit: str
    qc: str
    gates: tuple[tuple[int, ...], ...]
    frozen: bool
    init: str
    scale: float
    dropout: float

    def to_json(self) -> dict:
        return {"circuit": self.circuit, "qc": self.qc, "gates": [list(g) for g in self.gates],
                "frozen": self.frozen, "init": self.init, "scale": self.scale,
                "dropout": self.dropout}


@dataclass(frozen=True)
class LayerRecord:
    """One adapted module: ``linear`` or ``conv1d``, features, the state its base weight
    was saved in (``unfolded`` or ``folded``) and its branches in rule order."""

    kind: str
    in_features: int
    out_features: int
    state: str
    branches: tuple[BranchRecord, ...]

    def to_json(self) -> dict:
        return {"kind": self.kind, "in": self.in_features, "out": self.out_features,
                "state": self.state, "branches": [b.to_json() for b in self.branches]}

    def adapter_difference(self, other: "LayerRecord") -> str | None:
        """How ``other`` adapts the layer differently (state aside), in a few words."""
        if (self.in_features, self.out_features) != (other.in_features, other.out_features):
            return (f"shape mismatch: checkpoint {self.in_features} -> {self.out_features} "
                    f"features, model {other.in_features} -> {other.out_features} features")
        if self.kind != other.kind:
            return (f"checkpoint adapts {with_article(self.kind)}, model has "
                    f"{with_article(other.kind)}")
        if self.branches != other.branches:
            return f"different circuits: {_branch_difference(self.branches, other.branches)}"
        return None


@dataclass(frozen=True)
class ModuleRecord:
    """A module trained whole beside the circuits: its class name and its floating-point
    tensors (parameters and buffers) with their shapes, sorted by name."""

    kind: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self):
        object.__setattr__(self, "tensors", tuple(sorted(self.tensors)))

    @classmethod
    def of(cls, module: nn.Module) -> "ModuleRecord":
        """The record of a live module."""
        return cls(type(module).__name__, tuple(
            (k, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items()
            if v.is_floating_point()))

    def to_json(self) -> dict:
        return {"class": self.kind, "tensors": {k: list(v) for k, v in self.tensors}}

    def difference(self, other: "ModuleRecord") -> str | None:
        """How ``other`` (the model's module) differs from this saved one, in a few words."""
        if self.kind != other.kind:
            return (f"the checkpoint trained {with_article(self.kind)}, the model has "
                    f"{with_article(other.kind)}")
        if self.tensors != other.tensors:
            return (f"tensors differ: checkpoint {_shapes_text(self.tensors)}, model "
                    f"{_shapes_text(other.tensors)}")
        return None


def _shapes_text(tensors: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in tensors)


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter as saved (see the module doc). ``tensors`` is None for an adapter that
    has not been saved yet (a fresh PEFT config); every record read from a file has them."""

    program: Program
    model: Mapping[str, object]
    layers: Mapping[str, LayerRecord]
    tensors: Mapping[str, TensorRecord] | None = None
    qcircuit_version: str = field(default=qcircuit.__version__)
    modules: Mapping[str, ModuleRecord] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        if self.tensors is not None:
            object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __deepcopy__(self, memo) -> "AdapterRecord":   # immutable: copies may share it
        return self

    @property
    def options(self) -> dict[str, object]:
        """The program-wide options (``option`` lines, else the defaults)."""
        return {k: self.program.option(k) for k in OPTION_DEFAULTS}

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, for every tensor the layer and module records call for."""
        out = {}
        for name, rec in self.layers.items():
            for b in rec.branches:
                names = branch_tensor_names(name, b.circuit, len(rec.branches), len(b.gates),
                                            b.frozen)
                out.update({key: b.gates[i] for key, (_, i) in names.items()})
        for name, module in self.modules.items():
            out.update({f"{name}.{local}": shape for local, shape in module.tensors})
        return out

    def module_tensor_names(self) -> set[str]:
        """The names of the trained modules' tensors (the rest are gates)."""
        return {f"{name}.{local}" for name, m in self.modules.items() for local, _ in m.tensors}

    def with_tensors(self, tensors: Mapping[str, TensorRecord]) -> "AdapterRecord":
        return replace(self, tensors=tensors)

    def to_json(self) -> dict:
        """``adapter_config.json`` as written (``peft_type`` lets PEFT read it)."""
        out = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "qcircuit_version": self.qcircuit_version, "peft_type": PEFT_TYPE,
               "program": self.program.to_qc(), "options": self.options,
               "model": dict(self.model),
               "layers": {name: rec.to_json() for name, rec in self.layers.items()},
               "modules": {name: rec.to_json() for name, rec in self.modules.items()}}
        if self.tensors is not None:
            out["tensors"] = {k: t.to_json() for k, t in sorted(self.tensors.items())}
        return out


# --- building a record from a binding --------------------------------------------------------
def layer_records(targets: Sequence[Target], states: Mapping[str, str] | None = None
                  ) -> dict[str, LayerRecord]:
    """One record per adapted module of a binding (``bind``), in ``states`` (default
    ``unfolded``)."""
    out = {}
    for name, branches in by_layer(targets).items():
        head = branches[0]
        out[name] = LayerRecord(head.kind, head.in_features, head.out_features,
                                (states or {}).get(name, "unfolded"), tuple(
            BranchRecord(t.circuit_name, t.circuit.to_qc(name=t.circuit_name),
                         tuple(tuple(g.shape) for g in t.circuit.gates),
                         t.option("init") == "freeze_one",
                         *(t.option(k) for k in OPTION_DEFAULTS)) for t in branches))
    return out


def _model_dtype(model) -> str | None:
    """The dtype of the model's first floating-point parameter, as ``"bfloat16"``."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def model_identity(model) -> dict:
    """Class, dtype and the config fields that pin down the layer shapes."""
    config = getattr(model, "config", None)
    out = {"class": type(model).__name__, "config_class": type(config).__name__ if config else None,
           "dtype": _model_dtype(model)}
    for key in IDENTITY_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            out[key] = value
    return out


def from_targets(program: Program, model, targets: Sequence[Target],
                 states: Mapping[str, str] | None = None,
                 trained: Mapping[str, nn.Module] | None = None) -> AdapterRecord:
    """The record of ``program`` bound to ``model`` (``targets``; ``trained``: the modules
    trained whole, by name), without tensors."""
    return AdapterRecord(program, model_identity(model), layer_records(targets, states),
                         modules={k: ModuleRecord.of(m) for k, m in (trained or {}).items()})


# --- the validator -----------------------------------------------------------------------------
def from_json(value: object, where: str) -> AdapterRecord:
    """The record a parsed ``adapter_config.json`` describes, fully checked (module doc);
    one ``QCError`` naming ``where`` (the file) otherwise."""
    config = upgrade(value)
    check_config(config, where)
    program = parse(config["program"], file=f"{where} (program)", includes=False)
    for key, saved in config["options"].items():
        if program.option(key) != saved:
            raise QCError(f"{where}: $.options.{key} is {json.dumps(saved)} but the stored "
                          f"program says {json.dumps(program.option(key))}")
    layers = {name: _layer(rec) for name, rec in config["layers"].items()}
    for name, rec in layers.items():
        for k, branch in enumerate(rec.branches):
            if branch.circuit not in program.circuits:
                raise QCError(f"{where}: $.layers[{json.dumps(name)}].branches[{k}].circuit is "
                              f"{json.dumps(branch.circuit)[:60]}, which the stored program "
                              f"does not define")
    tensors = {name: TensorRecord(t["dtype"], tuple(t["shape"]), t["sha256"])
               for name, t in config["tensors"].items()}
    modules = {name: ModuleRecord(rec["class"], tuple((k, tuple(v)) for k, v in
                                                      rec["tensors"].items()))
               for name, rec in config["modules"].items()}
    record = AdapterRecord(program, config["model"], layers, tensors, config["qcircuit_version"],
                           modules)
    _check_modules(program, layers, modules, where)
    _check_tensor_set(record, where)
    _check_program_gives(program, layers, where)
    return record


def overlap(module: str, layers: Sequence[str]) -> str | None:
    """An adapted layer that is ``module``, lies inside it or holds it, if any."""
    for layer in layers:
        if module == layer or layer.startswith(module + ".") or module.startswith(layer + "."):
            return layer
    return None


def _check_modules(program: Program, layers: Mapping[str, LayerRecord],
                   modules: Mapping[str, ModuleRecord], where: str) -> None:
    """No trained module overlaps an adapted layer, and every ``train`` pattern of the
    stored program matches a recorded module."""
    for name in modules:
        layer = overlap(name, list(layers))
        if layer is not None:
            raise QCError(f"{where}: $.modules[{json.dumps(name)[:200]}] overlaps the adapted "
                          f"layer {layer}: a module is either adapted or trained whole")
    for pattern in program.trained:
        if not any(pattern.matches(name) for name in modules):
            raise QCError(f"{where}: the stored program trains {str(pattern)!r} but $.modules "
                          f"holds no module it matches")


def _check_tensor_set(record: AdapterRecord, where: str) -> None:
    """The tensor records are exactly the ones the layer records call for, with their shapes."""
    want, have = record.expected_tensors(), record.tensors
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or extra:
        parts = ([f"lacks {', '.join(missing[:5])}"] if missing else []) + \
                ([f"has unexpected {', '.join(extra[:5])}"] if extra else [])
        raise QCError(f"{where}: $.tensors {' and '.join(parts)} (the layer records call "
                      f"for {len(want)} tensors)")
    for name, shape in want.items():
        if have[name].shape != shape:
            raise QCError(f"{where}: $.tensors[{json.dumps(name)}].shape is "
                          f"{list(have[name].shape)} but the layer record says {list(shape)}")


def _layer(rec: dict) -> LayerRecord:
    return LayerRecord(rec["kind"], rec["in"], rec["out"], rec["state"], tuple(
        BranchRecord(b["circuit"], b["qc"], tuple(tuple(g) for g in b["gates"]), b["frozen"],
                     b["init"], float(b["scale"]), float(b["dropout"])) for b in rec["branches"]))


class _Skeleton:
    """The recorded layers as a model ``bind`` can walk: shape-only modules on the meta
    device under the recorded names, and nothing else."""

    def __init__(self, layers: Mapping[str, LayerRecord]):
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            self._modules = {name: (nn.Linear(r.in_features, r.out_features, bias=False)
                                    if r.kind == "linear" else Conv1D(r.out_features, r.in_features))
                             for name, r in layers.items()}

    def named_modules(self):
        return iter(self._modules.items())

    def get_submodule(self, name: str) -> nn.Module:
        return self._modules[name]


def _check_program_gives(program: Program, layers: Mapping[str, LayerRecord], where: str) -> None:
    """The stored program, bound to exactly the recorded layers, gives the recorded
    branches: each layer's circuits, gate shapes, frozen copies and options."""
    try:
        bound = layer_records(bind(_Skeleton(layers), program))
    except QCError as e:
        raise QCError(f"{where}: the stored program does not fit the stored layers: "
                      f"{e.one_line()}") from None
    for name, rec in layers.items():
        if name not in bound:
            raise QCError(f"{where}: $.layers[{json.dumps(name)}]: the stored program applies "
                          "no circuit to this layer")
        if rec.branches != bound[name].branches:
            raise QCError(f"{where}: $.layers[{json.dumps(name)}]: the record and the stored "
                          f"program differ: {_branch_difference(rec.branches, bound[name].branches, 'the program gives')}")


# --- a record against a model --------------------------------------------------------------------
def _branch_difference(saved: Sequence[BranchRecord], bound: Sequence[BranchRecord],
                       other: str = "the model binds") -> str:
    """What differs between a layer's saved and bound branches, in a few words."""
    names = ([b.circuit for b in saved], [b.circuit for b in bound])
    if names[0] != names[1]:
        return (f"the checkpoint has circuits {' + '.join(names[0])}, {other} "
                f"{' + '.join(names[1])}")
    for a, b in zip(saved, bound):
        if a.gates != b.gates:
            return (f"circuit {a.circuit!r}: the checkpoint has gate shapes "
                    f"{[list(g) for g in a.gates]}, {other} {[list(g) for g in b.gates]}")
        if a.qc != b.qc:
            return f"circuit {a.circuit!r} is defined differently in the checkpoint"
        for key in ("init", "scale", "dropout", "frozen"):
            if getattr(a, key) != getattr(b, key):
                return (f"circuit {a.circuit!r}: the checkpoint has {key} "
                        f"{json.dumps(getattr(a, key))}, {other} {json.dumps(getattr(b, key))}")
    return "the branches differ"


def check_fits(record: AdapterRecord, current: Mapping[str, LayerRecord], where: str,
               modules: Mapping[str, ModuleRecord | None] | None = None) -> None:
    """Refuse, naming every difference, a record whose layers differ from ``current``
    (``layer_records`` of the program bound to the model) or, given ``modules`` (the
    model's modules by the recorded names and any more it trains: None where it has none),
    whose trained modules differ from them."""
    saved = record.layers
    problems = [f"module {name} is in the checkpoint but the model has no such matching layer"
                for name in saved if name not in current]
    problems += [f"module {name} of the model matches the program but is not in the checkpoint"
                 for name in current if name not in saved]
    for name in (n for n in saved if n in current):
        why = saved[name].adapter_difference(current[name])
        if why:
            problems.append(f"module {name}: {why}")
    for name, have in (modules or {}).items():
        want = record.modules.get(name)
        if want is None:
            problems.append(f"module {name} of the model is trained by the program but is not "
                            "in the checkpoint")
        elif have is None:
            problems.append(f"trained module {name} is in the checkpoint but the model has "
                            "no such module")
        elif want.difference(have):
            problems.append(f"trained module {name}: {want.difference(have)}")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12
                                 else [])
        raise QCError(f"checkpoint {where} does not match this model (saved for "
                      f"{record.model.get('class', '?')}, model_type "
                      f"{record.model.get('model_type', '?')}):\n  - " + "\n  - ".join(shown))


def dtype_warning(record: AdapterRecord, model) -> str | None:
    """A sentence for ``warnings.warn`` when the model's dtype is not the one the adapter
    was saved with (e.g. a float32-trained adapter loaded into a bfloat16 model)."""
    saved, now = record.model.get("dtype"), _model_dtype(model)
    if saved is None or now is None or saved == now:
        return None
    stored = "/".join(sorted({t.dtype for t in (record.tensors or {}).values()}))
    gates = "float64" if now == "float64" else "float32"   # branch.gate_dtype's rule
    return (f"this adapter was saved from {with_article(saved)} model and is loaded into "
            f"{with_article(now)} model: "
            f"its {stored} gates are loaded as {gates} and the base layers compute in {now}, "
            f"so outputs differ from the saved model's by {now} rounding")
