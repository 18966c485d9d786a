"""Attach QuanTA adapters to a model: the adapted layer and the ``Adapted`` handle.

An adapted layer computes ``y = W0·x + b + scale·(T_θ − T_θ0)·dropout(x)`` (DESIGN.md).

``init = freeze_one`` (default): every gate starts Kaiming-uniform and a frozen copy of
the initial gates is kept (``layer.frozen``, ``requires_grad=False``, a few KB).
Until the layer first runs with gradients enabled it computes that formula literally,
with both circuits: right after ``attach`` or ``load`` the adapted model reproduces the
base model bit for bit, in float32 and under bfloat16 autocast alike (``T_θ·x`` and
``T_θ0·x`` are the same float ops on the same numbers). The first forward that records
gradients (training; also inside gradient checkpointing) folds ``−scale·T_θ0`` once into
the base weight, ``W' = W0 − scale·T_θ0`` computed in float64 and rounded once, and from
then on the layer runs one circuit: ``y = W'·x + b + scale·T_θ·dropout(x)``.
``Adapted.fold()`` folds at once (e.g. before timing); ``merge()`` works in either state.
Each layer's folded/merged flags are also a buffer (``adapter_state``), so loading a
``model.state_dict()`` into a freshly attached model (a Trainer resume) stays consistent.

Precision of the fold. Folded and unfolded are the same function and differ by float
rounding only, but ``W'·x`` and ``T_θ·x`` are several times larger than ``W0·x`` and
cancel. Measured on the tiny test models (random weights, std 0.02): float32 logits move
by 0.6–1.6e-6 relative (max-abs; the base model's own float32 error against float64 is
~3e-7). Under bfloat16 autocast, or with weights stored in bfloat16, the folded model is
1–2e-2 relative from the base model in the same precision (which is itself 3–4e-3 from
float32): use ``zero_last`` where the start point must stay exact once training begins.

Gates are float32 (float64 on a float64 layer) whatever the base dtype, and the circuit
runs in the gates' dtype with autocast disabled. With dropout > 0 nothing is folded:
a folded ``−scale·T_θ0·x`` would see ``x`` while ``T_θ`` sees ``dropout(x)``, and since
``T_θ0`` is of unit scale (far larger than ``W0``) their mismatch would inject large noise
at every training step. Such layers run both circuits on the same ``dropout(x)``.

On the meta device (shape-only models, ``qcompile --out``) the gates are real CPU
tensors, nothing is folded, and ``save`` writes the gates as usual.

``init = zero_last``: the last gate starts at zero, no frozen copy, nothing to fold; the
delta is exactly zero at init in any dtype.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import qcircuit
from qcircuit import Circuit, Program, QCError, parse, parse_file
from qcircuit.compiler import compile as compile_circuit

from . import checkpoint
from .bind import Target, bind


def _gate_dtype(weight: torch.Tensor) -> torch.dtype:
    """Gates train in float32 (float64 for float64 layers), whatever the base dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class AdaptedLayer(nn.Module):
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``) plus a circuit adapter."""

    def __init__(self, base: nn.Module, circuit: Circuit, *, init: str, scale: float,
                 dropout: float, generator: torch.Generator | None = None, plan=None):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise QCError(f"cannot adapt a {type(base).__name__}: only nn.Linear and Conv1D")
        if not circuit.gates:
            raise QCError("a circuit with no gates cannot be an adapter")
        self.base_layer = base
        self.transposed = isinstance(base, Conv1D)  # Conv1D keeps its weight as (in, out)
        self.circuit = circuit
        self.plan = compile_circuit(circuit) if plan is None else plan  # shareable
        self.init_mode = init
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        dtype = _gate_dtype(weight)
        device = torch.device("cpu") if weight.is_meta else weight.device
        # Gates are drawn on the CPU (where the generator lives), then moved.
        self.adapter = self.plan.module(init="kaiming", generator=generator, dtype=dtype,
                                        device="cpu").to(device)
        self.frozen: nn.Module | None = None
        self.folded = False  # −scale·T_θ0 is in the base weight
        self.merged = False  # +scale·T_θ is in the base weight
        # the two flags again, so that model.state_dict() round trips (Trainer resume)
        self.register_buffer("adapter_state", torch.zeros(2, dtype=torch.uint8, device=device))
        if init == "zero_last":
            with torch.no_grad():
                self.adapter.gates[-1].zero_()
        else:
            self.frozen = self.plan.module(init="zeros", dtype=dtype, device=device)
            self.frozen.requires_grad_(False)
            self.reset_frozen()

    # --- state ---------------------------------------------------------------------------
    @property
    def is_meta(self) -> bool:
        return self.base_layer.weight.is_meta

    def _set_state(self, folded: bool, merged: bool) -> None:
        self.folded, self.merged = folded, merged
        self.adapter_state.copy_(torch.tensor([folded, merged], dtype=torch.uint8))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        folded, merged = (bool(v) for v in self.adapter_state.tolist())
        self.folded, self.merged = folded, merged

    @torch.no_grad()
    def reset_frozen(self) -> None:
        """Make the frozen copy equal the current gates (before folding only)."""
        if self.frozen is None or self.folded:
            raise QCError("reset_frozen: no frozen copy, or it is already folded in")
        for dst, src in zip(self.frozen.gates, self.adapter.gates):
            dst.copy_(src)

    def _dense64(self, module: nn.Module) -> torch.Tensor:
        """The circuit operator of ``module``'s gates, computed in float64, (out, in)."""
        device = module.gates[0].device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self.plan.dense_executor()([g.double() for g in module.gates])

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """``W ← W + delta`` (delta (out, in), float64), rounded once to W's dtype."""
        w = self.base_layer.weight
        if self.transposed:
            delta = delta.t()
        w.copy_((w.double() + delta.to(w.device)).to(w.dtype))

    def fold(self) -> None:
        """Fold ``−scale·T_θ0`` into the base weight (freeze_one, real weights, once).

        Called by the first forward with gradients enabled, before the weight is used.
        """
        if self.frozen is None or self.folded or self.merged or self.is_meta:
            return
        if isinstance(self.dropout, nn.Dropout):  # both circuits must see dropout(x)
            return
        self._add_to_weight(-self.scale * self._dense64(self.frozen))
        self._set_state(True, self.merged)

    def delta64(self) -> torch.Tensor:
        """What merging adds to the (possibly folded) base weight, float64 (out, in)."""
        delta = self._dense64(self.adapter)
        if self.frozen is not None and not self.folded:
            delta = delta - self._dense64(self.frozen)
        return self.scale * delta

    def merge(self) -> None:
        if self.merged:
            raise QCError("layer is already merged")
        if self.is_meta:
            raise QCError("cannot merge: the model's weights are on the meta device")
        self._add_to_weight(self.delta64())
        self._set_state(self.folded, True)

    def unmerge(self) -> None:
        if not self.merged:
            raise QCError("layer is not merged")
        self._add_to_weight(-self.delta64())
        self._set_state(self.folded, False)

    # --- compute -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None and not self.folded and torch.is_grad_enabled():
            self.fold()
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.adapter.gates[0].dtype)
        with torch.autocast(h.device.type, enabled=False):  # the circuit runs in the gates' dtype
            d = self.adapter(h)
            if self.frozen is not None and not self.folded:
                d = d - self.frozen(h)
        return y + (self.scale * d).to(y.dtype)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Gates (and frozen initial gates) under stable names, for safetensors."""
        out = {f"{name}.gates.{i}": g for i, g in enumerate(self.adapter.gates)}
        if self.frozen is not None:
            out.update({f"{name}.init_gates.{i}": g for i, g in enumerate(self.frozen.gates)})
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def extra_repr(self) -> str:
        c = self.circuit
        return (f"circuit={'·'.join(map(str, c.in_dims))}->{'·'.join(map(str, c.out_dims))}, "
                f"gates={len(c.gates)}, params={c.num_params}, init={self.init_mode}, "
                f"scale={self.scale}, folded={self.folded}, merged={self.merged}")


def _as_program(program_or_path: Program | str | Path) -> Program:
    if isinstance(program_or_path, Program):
        return program_or_path
    if isinstance(program_or_path, (str, Path)):
        return parse_file(str(program_or_path))
    raise QCError(f"attach takes a Program or a .qc path, got {type(program_or_path).__name__}")


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


class Adapted:
    """Handle on a model whose matched layers carry circuit adapters.

    Callable like the model; other attributes are looked up on the model.
    """

    def __init__(self, model: nn.Module, program: Program, targets: tuple[Target, ...],
                 layers: dict[str, AdaptedLayer], requires_grad: dict[str, bool]):
        self.model = model
        self.program = program
        self.targets = targets
        self.layers = layers
        self._requires_grad = requires_grad
        self._unloaded = False

    def __call__(self, *args, **kwargs):
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

    # --- merging -------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self._live().values())

    def merge(self) -> None:
        """``W ← W + scale·(T_θ − T_θ0)`` in every layer: no adapter cost at inference."""
        if self.merged:
            raise QCError("the adapter is already merged")
        if any(layer.is_meta for layer in self.layers.values()):
            raise QCError("cannot merge: the model's weights are on the meta device")
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to one float rounding of each weight)."""
        if not self.merged:
            raise QCError("the adapter is not merged")
        for layer in self.layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, then put each base layer back: the model holds only its own module types."""
        if not self.merged:
            self.merge()
        for name, layer in self.layers.items():
            parent, child = _split(name)
            setattr(self.model.get_submodule(parent), child, layer.base_layer)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self._unloaded = True
        return self.model

    def fold(self) -> None:
        """Fold now what the first training forward would fold (see the module doc)."""
        if self.merged:
            raise QCError("unmerge before folding")
        for layer in self._live().values():
            layer.fold()

    # --- parameters ----------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter gates, in target order (what an optimizer should get)."""
        return [g for layer in self._live().values() for g in layer.adapter.gates]

    @property
    def num_trainable(self) -> int:
        return sum(g.numel() for g in self.trainable_parameters())

    @property
    def num_base(self) -> int:
        """Parameters of the base model (adapter and frozen gates excluded)."""
        extra = {id(p) for layer in self._live().values() for m in (layer.adapter, layer.frozen)
                 if m is not None for p in m.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in extra)

    def summary(self) -> str:
        layers = self._live()
        head = next(iter(layers.values()))
        rows = [(name, f"{t.in_features} -> {t.out_features}", t.circuit_name,
                 f"{t.circuit.num_params:,}") for name, t in
                ((t.module_name, t) for t in self.targets)]
        widths = [max(len(r[i]) for r in rows + [("module", "in -> out", "circuit", "params")])
                  for i in range(4)]
        fmt = "  {:<%d}  {:>%d}  {:<%d}  {:>%d}" % tuple(widths)
        pct = 100.0 * self.num_trainable / max(self.num_base, 1)
        lines = [f"QuanTA adapter on {type(self.model).__name__}: {len(layers)} layers, "
                 f"init {head.init_mode}, scale {head.scale:g}, "
                 f"dropout {self.program.option('dropout'):g}"
                 + (", merged" if self.merged else ""),
                 fmt.format("module", "in -> out", "circuit", "params")]
        lines += [fmt.format(*r) for r in rows]
        lines.append(f"trainable parameters: {self.num_trainable:,} of {self.num_base:,} "
                     f"({pct:.4f} %)")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return f"<Adapted {type(self.model).__name__}: {len(self.layers)} layers>"

    # --- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` atomically."""
        layers = self._live()
        if self.merged:
            raise QCError("unmerge before saving: the checkpoint stores the unmerged adapter")
        config = checkpoint.build_config(
            self.program, self.model,
            {t.module_name: checkpoint.layer_record(t, layers[t.module_name].frozen is not None)
             for t in self.targets},
            version=qcircuit.__version__)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            tensors.update(layer.tensors(name))
        checkpoint.write(path, config, tensors)


def _check_fresh(model: nn.Module) -> None:
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise QCError("this model already carries a qcircuit adapter: merge_and_unload() it "
                      "or start from a fresh model")


def _wrap(model: nn.Module, program: Program, targets: tuple[Target, ...],
          generator: torch.Generator | None) -> Adapted:
    """Freeze the model and replace every target layer by an (unfolded) AdaptedLayer."""
    if not targets:
        raise QCError("the program applies no circuit to this model")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    init, scale, dropout = (program.option(k) for k in ("init", "scale", "dropout"))
    layers: dict[str, AdaptedLayer] = {}
    plans: dict[Circuit, object] = {}  # one plan (and its path caches) per distinct circuit
    for t in targets:
        if not t.module_name:
            raise QCError("the model itself is a single layer: wrap it in a container first")
        base = model.get_submodule(t.module_name)
        if t.circuit not in plans:
            plans[t.circuit] = compile_circuit(t.circuit)
        layer = AdaptedLayer(base, t.circuit, init=init, scale=scale, dropout=dropout,
                             generator=generator, plan=plans[t.circuit])
        parent, child = _split(t.module_name)
        setattr(model.get_submodule(parent), child, layer)
        layers[t.module_name] = layer
    return Adapted(model, program, targets, layers, requires_grad)


def attach(model: nn.Module, program_or_path: Program | str | Path, *,
           seed: int | None = None) -> Adapted:
    """Wrap every layer the program matches, in place; only the adapter gates train.

    ``seed`` makes the gate initialisation reproducible (one generator, target order).
    """
    program = _as_program(program_or_path)
    _check_fresh(model)
    targets = bind(model, program)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return _wrap(model, program, targets, generator)


def load(model: nn.Module, path: str | Path) -> Adapted:
    """Restore a saved adapter onto a fresh base model (the one it was trained on)."""
    config, tensors = checkpoint.read(path)
    _check_fresh(model)
    try:
        program = parse(config["program"])
        if any(program.option(k) != v for k, v in config["options"].items()):
            program = Program(program.circuits, program.rules, config["options"])
    except (QCError, AttributeError, KeyError, TypeError) as e:
        raise QCError(f"checkpoint {path} holds a bad program or options: {e}") from None
    try:
        targets = bind(model, program)
    except QCError as e:
        raise QCError(f"checkpoint {path} does not fit this model: {e.one_line()}") from None
    frozen = program.option("init") == "freeze_one"
    current = {t.module_name: checkpoint.layer_record(t, frozen) for t in targets}
    checkpoint.check_layers(str(path), config, current, tensors)
    adapted = _wrap(model, program, targets, generator=None)
    with torch.no_grad():
        for name, layer in adapted.layers.items():
            for i, g in enumerate(layer.adapter.gates):
                g.copy_(tensors[f"{name}.gates.{i}"])
            if layer.frozen is not None:
                for i, g in enumerate(layer.frozen.gates):
                    g.copy_(tensors[f"{name}.init_gates.{i}"])
    return adapted
