"""Adapter checkpoints: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

The JSON holds the program text (``Program.to_qc()``), its options, the model's identity
(with its dtype), one record per adapted module (features, state, and its branches: one
per ``apply`` rule on it, with circuit, gate shapes, frozen copy and options) and, per
tensor, its dtype, shape and the sha256 of its bytes. The safetensors file holds
``<module>.gates.<i>`` and, for ``freeze_one``, the frozen initial gates
``<module>.init_gates.<i>``; a layer with several branches puts the circuit's name after
the module's (``checkpoint_schema.branch_tensor_names``). No pickle: JSON and safetensors
only. Version-2 checkpoints (one circuit per layer) are read too.

Reading trusts nothing (``read``): the config is bounded UTF-8 JSON checked field by field
(``checkpoint_schema``); the stored program is parsed with includes disabled and must
agree with the stored options; every tensor must have exactly the recorded dtype
(float32 or float64), shape and hash, be finite and at most ``MAX_GATE_ABS`` in magnitude.
Every failure is one ``QCError`` naming the file. ``write`` refuses what ``read`` would.

Writes are all-or-nothing (``atomic_dir``): the complete new directory is written beside
the target and swapped in, then the old one is removed; on an exception, Ctrl-C or
SIGTERM the target is as it was and no temporary directory is left. A target holding
files other than the two checkpoint files is refused, never cleaned up; an existing
checkpoint is replaced only with ``overwrite=True``. Under ``torch.distributed`` only
rank 0 writes and every rank waits for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qcircuit import Program, QCError, parse
from qcircuit.ir import OPTION_DEFAULTS, check_option

from .atomic_dir import fsync, replace_dir
from .bind import Target
from .checkpoint_schema import (FORMAT, FORMAT_VERSION, IDENTITY_KEYS, PEFT_TYPE, check_config,
                                expected_tensors, upgrade)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "MAX_CONFIG_BYTES",
           "MAX_GATE_ABS", "layer_record", "model_identity", "tensor_records", "build_config",
           "write", "read", "program_of", "check_layers", "dtype_warning", "expected_tensors"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 16 << 20
#: Largest gate entry accepted. Gates start at most 1 in magnitude (Kaiming, unit gain) and
#: training moves them little; 1e6 is far beyond that and far from float32 overflow.
MAX_GATE_ABS = 1e6
_HEADER_DTYPES = {"F32": "float32", "F64": "float64"}


# --- building a config --------------------------------------------------------------------
def layer_record(branches: tuple[Target, ...], state: str = "unfolded") -> dict:
    """One adapted module as stored, from its branches (``bind.by_layer``): kind, features,
    state (``unfolded`` or ``folded``) and per branch the circuit's name and text, gate
    shapes, whether it keeps frozen initial gates (``init = freeze_one``) and its options."""
    head = branches[0]
    return {"kind": head.kind, "in": head.in_features, "out": head.out_features,
            "state": state, "branches": [
                {"circuit": t.circuit_name, "qc": t.circuit.to_qc(name=t.circuit_name),
                 "gates": [list(g.shape) for g in t.circuit.gates],
                 "frozen": t.option("init") == "freeze_one",
                 **{k: t.option(k) for k in OPTION_DEFAULTS}} for t in branches]}


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


def _sha256(t: torch.Tensor) -> str:
    """sha256 of a contiguous CPU tensor's bytes, as safetensors stores them."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def tensor_records(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Tensor name -> ``{dtype, shape, sha256}`` as the config's ``tensors`` section."""
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                   "sha256": _sha256(t)} for name, t in sorted(_cpu(tensors).items())}


def build_config(program: Program, model, layers: Mapping[str, dict],
                 tensors: Mapping[str, torch.Tensor] | None = None, *, version: str) -> dict:
    """The config of a checkpoint; ``layers`` from ``layer_record``. Without ``tensors``
    the ``tensors`` section is left to ``write``, which always fills it from what it writes."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "qcircuit_version": version,
              "peft_type": PEFT_TYPE,   # so that PEFT's from_pretrained loads it too
              "program": program.to_qc(),
              "options": {k: program.option(k) for k in ("init", "scale", "dropout")},
              "model": model_identity(model), "layers": dict(layers)}
    if tensors is not None:
        config["tensors"] = tensor_records(tensors)
    return config


# --- checks shared by read and write ------------------------------------------------------
def program_of(config: dict, where: str) -> Program:
    """The program stored in a (schema-checked) config, parsed with includes disabled,
    checked against the stored options and the layers' circuit names. ``where`` names the
    checkpoint directory."""
    file = f"{where}/{CONFIG_NAME} (program)"
    text = config["program"]
    program = parse(text, file=file, includes=False)   # stored text never reads a file
    for key, saved in config["options"].items():
        if program.option(key) != check_option(key, saved):
            raise QCError(f"{where}/{CONFIG_NAME}: $.options.{key} is {json.dumps(saved)} but "
                          f"the stored program says {json.dumps(program.option(key))}")
    for name, rec in config["layers"].items():
        for k, branch in enumerate(rec["branches"]):
            if branch["circuit"] not in program.circuits:
                raise QCError(f"{where}/{CONFIG_NAME}: $.layers[{json.dumps(name)}].branches"
                              f"[{k}].circuit is {json.dumps(branch['circuit'])[:60]}, which the "
                              f"stored program does not define")
    return program


def _check_values(name: str, t: torch.Tensor, where: str) -> None:
    """A gate is finite and within ``MAX_GATE_ABS``: anything else is refused."""
    bad = ~torch.isfinite(t)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise QCError(f"{where}: tensor {name} holds a non-finite entry ({t[index].item()} "
                      f"at {index})")
    peak = t.abs().max().item()
    if peak > MAX_GATE_ABS:
        raise QCError(f"{where}: tensor {name} holds an entry of magnitude {peak:.3g}, beyond "
                      f"the bound {MAX_GATE_ABS:g} for a gate")


def _verify(config: object, where: str, folder: str) -> None:
    check_config(config, where)
    program_of(config, folder)


# --- reading ------------------------------------------------------------------------------
def _open_regular(path: Path, folder: Path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (symlinks followed;
    never blocks on a FIFO); QCError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise QCError(f"{folder} is not an adapter checkpoint: {path.name} is missing") from None
    except OSError as e:
        raise QCError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QCError(f"cannot read {path}: not a regular file")
    return fd


def _unique_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {json.dumps(key)[:60]}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _read_config(path: Path, folder: Path) -> object:
    """Bounded, UTF-8, strict JSON (no NaN, no duplicate keys, bounded nesting)."""
    with os.fdopen(_open_regular(path, folder), "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise QCError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not an adapter config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        pickle = data[:1] == b"\x80"
        what = " (it looks like a pickle, which qcircuit never loads)" if pickle else ""
        raise QCError(f"{path}: not UTF-8 text at byte {e.start}{what}: an adapter config "
                      f"is JSON") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except RecursionError:
        raise QCError(f"{path}: JSON nested too deeply: not an adapter config") from None
    except ValueError as e:  # JSONDecodeError, the hooks above, an over-long integer
        raise QCError(f"{path}: not valid JSON: {e}") from None


def _read_tensors(path: Path, folder: Path, records: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors, each checked against its record before and after it is read."""
    os.close(_open_regular(path, folder))
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            if names != records.keys():
                missing, extra = sorted(records.keys() - names), sorted(names - records.keys())
                raise QCError(f"{path}: the tensors differ from the config's: missing "
                              f"{missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}")
            for name in sorted(names):
                rec, part = records[name], f.get_slice(name)
                dtype = _HEADER_DTYPES.get(part.get_dtype(), part.get_dtype())
                if dtype != rec["dtype"] or list(part.get_shape()) != rec["shape"]:
                    raise QCError(f"{path}: tensor {name} is stored as {dtype} "
                                  f"{list(part.get_shape())}, the config says {rec['dtype']} "
                                  f"{rec['shape']}")
                t = f.get_tensor(name)
                if _sha256(t) != rec["sha256"]:
                    raise QCError(f"{path}: tensor {name} does not match its sha256 in "
                                  f"{CONFIG_NAME}: the file was changed or damaged")
                _check_values(name, t, str(path))
                tensors[name] = t
    except (SafetensorError, OSError) as e:
        raise QCError(f"cannot read {path}: {e}") from None
    return tensors


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a checkpoint directory, fully verified; QCError otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise QCError(f"{folder} is not an adapter checkpoint directory")
    config = upgrade(_read_config(folder / CONFIG_NAME, folder))
    _verify(config, str(folder / CONFIG_NAME), str(folder))
    return config, _read_tensors(folder / WEIGHTS_NAME, folder, config["tensors"])


# --- checks against a model ---------------------------------------------------------------
def _dims(rec: dict) -> str:
    return f"{rec['in']} -> {rec['out']} features"


def _branch_difference(saved: list[dict], bound: list[dict]) -> str:
    """What differs between a layer's saved and bound branches, in a few words."""
    names = ([b["circuit"] for b in saved], [b["circuit"] for b in bound])
    if names[0] != names[1]:
        return (f"the checkpoint has circuits {' + '.join(names[0])}, the model binds "
                f"{' + '.join(names[1])}")
    for a, b in zip(saved, bound):
        if a["gates"] != b["gates"]:
            return (f"circuit {a['circuit']!r}: the checkpoint has gate shapes {a['gates']}, "
                    f"the model binds {b['gates']}")
        if a["qc"] != b["qc"]:
            return f"circuit {a['circuit']!r} is defined differently in the checkpoint"
        for key in ("init", "scale", "dropout", "frozen"):
            if a[key] != b[key]:
                return (f"circuit {a['circuit']!r}: the checkpoint has {key} "
                        f"{json.dumps(a[key])}, the model binds {json.dumps(b[key])}")
    return "the branches differ"


def check_layers(where: str, config: dict, current: Mapping[str, dict],
                 tensors: Mapping[str, torch.Tensor] | None = None) -> None:
    """Refuse, naming every difference, a (read) checkpoint whose layer records differ
    from ``current`` (``layer_record`` of the model's binding). ``tensors``, when given,
    are checked against the records again (``read`` already did)."""
    saved: dict = config["layers"]
    problems = [f"module {name} is in the checkpoint but the model has no such matching layer"
                for name in saved if name not in current]
    problems += [f"module {name} of the model matches the program but is not in the checkpoint"
                 for name in current if name not in saved]
    for name in (n for n in saved if n in current):
        a, b = saved[name], current[name]
        if (a["in"], a["out"]) != (b["in"], b["out"]):
            problems.append(f"module {name}: shape mismatch: checkpoint {_dims(a)}, "
                            f"model {_dims(b)}")
        elif a["kind"] != b["kind"]:
            problems.append(f"module {name}: checkpoint adapts a {a['kind']}, model has a "
                            f"{b['kind']}")
        elif a["branches"] != b["branches"]:
            problems.append(f"module {name}: different circuits: "
                            f"{_branch_difference(a['branches'], b['branches'])}")
    if not problems and tensors is not None:
        want = expected_tensors(saved)
        problems += [f"tensor {key} is missing from {WEIGHTS_NAME}"
                     for key in sorted(want.keys() - tensors.keys())]
        problems += [f"unexpected tensor {key} in {WEIGHTS_NAME}"
                     for key in sorted(tensors.keys() - want.keys())]
        problems += [f"tensor {key} has shape {tuple(tensors[key].shape)}, expected {want[key]}"
                     for key in sorted(want.keys() & tensors.keys())
                     if tuple(tensors[key].shape) != want[key]]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12
                                 else [])
        ident = config["model"]
        raise QCError(f"checkpoint {where} does not match this model (saved for "
                      f"{ident.get('class', '?')}, model_type {ident.get('model_type', '?')}):"
                      "\n  - " + "\n  - ".join(shown))


def dtype_warning(config: dict, model) -> str | None:
    """A sentence for ``warnings.warn`` when the model's dtype is not the one the adapter
    was saved with (e.g. a float32-trained adapter loaded into a bfloat16 model)."""
    saved, now = config["model"]["dtype"], _model_dtype(model)
    if saved is None or now is None or saved == now:
        return None
    stored = "/".join(sorted({rec["dtype"] for rec in config["tensors"].values()}))
    gates = "float64" if now == "float64" else "float32"   # branch.gate_dtype's rule
    return (f"this adapter was saved from a {saved} model and is loaded into a {now} model: "
            f"its {stored} gates are loaded as {gates} and the base layers compute in {now}, "
            f"so outputs differ from the saved model's by {now} rounding")


# --- writing ------------------------------------------------------------------------------
def _write_files(folder: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    fsync(folder / WEIGHTS_NAME)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_local(path: str | Path, config: dict, tensors: Mapping[str, torch.Tensor],
                 overwrite: bool) -> None:
    if not os.fspath(path):
        raise QCError("cannot save the adapter: the path is empty")
    target = Path(os.path.realpath(path))
    tensors = _cpu(tensors)
    full = {**config, "tensors": tensor_records(tensors)}
    _verify(full, f"the config for {target / CONFIG_NAME}", str(target))
    for name, t in tensors.items():
        _check_values(name, t, f"cannot save the adapter to {target}")
    replace_dir(target, lambda tmp: _write_files(tmp, full, tensors), owned=(CONFIG_NAME,
                WEIGHTS_NAME), overwrite=overwrite, what="an adapter checkpoint")


def _collective_device() -> torch.device:
    """Where a tensor for the default process group's collectives lives."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def write(path: str | Path, config: dict, tensors: Mapping[str, torch.Tensor], *,
          overwrite: bool = True) -> None:
    """Write a checkpoint directory, all or nothing (see the module doc).

    ``config`` from ``build_config``; its ``tensors`` section is (re)computed from
    ``tensors``. With ``overwrite=False`` an existing checkpoint is refused. Under an
    initialised ``torch.distributed`` group, call it on every rank: rank 0 writes, the
    others wait for it and raise a ``QCError`` if it failed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        _write_local(path, config, tensors, overwrite)
        return
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            _write_local(path, config, tensors, overwrite)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            failure = e
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(failed)   # the barrier: every rank waits here for rank 0's write
    if failure is not None:
        raise failure
    if failed.item():
        raise QCError(f"rank 0 could not save the adapter to {path} (its error says why)")
