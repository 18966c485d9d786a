"""Adapter checkpoints: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

The JSON holds the program text (``Program.to_qc()``), the options, the model's identity,
one record per adapted module (features, circuit, gate shapes) and the library version.
The safetensors file holds ``<module>.gates.<i>`` and, for ``freeze_one``, the frozen
initial gates ``<module>.init_gates.<i>``. No pickle: JSON and safetensors only.
Writes are atomic: everything is written into a temporary directory next to the target,
then renamed into place; a failure leaves the target as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qcircuit import Program, QCError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "qcircuit-adapter"
_IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size", "n_embd", "n_layer")


def layer_record(target, frozen: bool, state: str = "unfolded") -> dict:
    """One adapted module as stored: kind, features, circuit name and text, gate shapes,
    and the layer's state when saved (what its base weight held; see ``layer.py``)."""
    circuit = target.circuit
    return {"kind": target.kind, "in": target.in_features, "out": target.out_features,
            "circuit": target.circuit_name, "qc": circuit.to_qc(name=target.circuit_name),
            "gates": [list(g.shape) for g in circuit.gates], "frozen": frozen, "state": state}


def model_identity(model) -> dict:
    """Class and the config fields that pin down the layer shapes."""
    config = getattr(model, "config", None)
    out = {"class": type(model).__name__, "config_class": type(config).__name__ if config else None}
    for key in _IDENTITY_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (int, str)):
            out[key] = value
    return out


def build_config(program: Program, model, layers: Mapping[str, dict], version: str) -> dict:
    return {"format": FORMAT, "qcircuit_version": version, "program": program.to_qc(),
            "options": {k: program.option(k) for k in ("init", "scale", "dropout")},
            "model": model_identity(model), "layers": dict(layers)}


def expected_tensors(layers: Mapping[str, dict]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint with these layer records must hold."""
    out = {}
    for name, rec in layers.items():
        for i, shape in enumerate(rec["gates"]):
            out[f"{name}.gates.{i}"] = tuple(shape)
            if rec.get("frozen"):
                out[f"{name}.init_gates.{i}"] = tuple(shape)
    return out


def _write_files(folder: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write(path: str | Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a checkpoint directory atomically (new dir: one rename; existing: per file)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise QCError(f"cannot save the adapter to {target}: it is a file, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_files(tmp, config, tensors)
        if not target.exists():
            os.replace(tmp, target)
        else:  # keep the user's other files; the config goes last so it never names missing weights
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, target / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a checkpoint directory; QCError when it is not one."""
    folder = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise QCError(f"{folder} is not an adapter checkpoint: {name} is missing")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise QCError(f"cannot read {folder / CONFIG_NAME}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise QCError(f"{folder / CONFIG_NAME} is not a qcircuit adapter config "
                      f"(expected \"format\": \"{FORMAT}\")")
    missing = [k for k in ("program", "options", "layers") if k not in config]
    if missing:
        raise QCError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, SafetensorError) as e:
        raise QCError(f"cannot read {folder / WEIGHTS_NAME}: {e}") from None
    return config, tensors


def _dims(rec: dict) -> str:
    return f"{rec['in']} -> {rec['out']} features"


def check_layers(where: str, config: dict, current: Mapping[str, dict],
                 tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming every difference, a checkpoint that does not fit the model's layers."""
    saved: dict = config["layers"]
    problems = []
    for name in saved:
        if name not in current:
            problems.append(f"module {name} is in the checkpoint but the model has no such "
                            f"matching layer")
    for name in current:
        if name not in saved:
            problems.append(f"module {name} of the model matches the program but is not in "
                            f"the checkpoint")
    for name in saved.keys() & current.keys():
        a, b = saved[name], current[name]
        if (a["in"], a["out"]) != (b["in"], b["out"]):
            problems.append(f"module {name}: shape mismatch: checkpoint {_dims(a)}, "
                            f"model {_dims(b)}")
        elif a["kind"] != b["kind"]:
            problems.append(f"module {name}: checkpoint adapts a {a['kind']}, model has a "
                            f"{b['kind']}")
        elif (a["circuit"], a["gates"]) != (b["circuit"], b["gates"]) or a["qc"] != b["qc"]:
            problems.append(f"module {name}: different circuit: checkpoint has "
                            f"{a['circuit']!r} with gate shapes {a['gates']}, the model binds "
                            f"{b['circuit']!r} with gate shapes {b['gates']}")
    if not problems:
        want = expected_tensors(saved)
        for key in sorted(want.keys() - tensors.keys()):
            problems.append(f"tensor {key} is missing from {WEIGHTS_NAME}")
        for key in sorted(tensors.keys() - want.keys()):
            problems.append(f"unexpected tensor {key} in {WEIGHTS_NAME}")
        for key in sorted(want.keys() & tensors.keys()):
            if tuple(tensors[key].shape) != want[key]:
                problems.append(f"tensor {key} has shape {tuple(tensors[key].shape)}, "
                                f"expected {want[key]}")
    if problems:
        shown = problems[:12]
        if len(problems) > 12:
            shown.append(f"... and {len(problems) - 12} more")
        ident = config.get("model", {})
        raise QCError(f"checkpoint {where} does not match this model (saved for "
                      f"{ident.get('class', '?')}, model_type {ident.get('model_type', '?')}):"
                      "\n  - " + "\n  - ".join(shown))
