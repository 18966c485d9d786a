"""Adapter checkpoints: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

What the directory means is one value, an ``AdapterRecord`` (``record.py``): the JSON is
its ``to_json()`` and ``record.from_json`` is the one validator every door uses. The
safetensors file holds ``<module>.gates.<i>`` and, for ``freeze_one``, the frozen initial
gates ``<module>.init_gates.<i>``; a layer with several branches puts the circuit's name
after the module's (``checkpoint_schema.branch_tensor_names``); a module trained whole (a
task head) stores its parameters and buffers as ``<module>.<name>`` in its own dtype. No
pickle: JSON and safetensors only. Checkpoints of formats 2 and 3 are read too
(``checkpoint_schema.upgrade``).

Reading trusts nothing (``read``): both files must be regular files of bounded size
(``files.py``); the config is strict JSON checked by the record's validator; every tensor
must have exactly the recorded dtype (float32 or float64), shape and hash, be finite and
at most ``MAX_GATE_ABS`` in magnitude, and every circuit must stay clear of overflow on
unit-size inputs (``check_circuits``). Every failure is one ``QCError`` naming the file.
``write`` refuses what ``read`` would: the record it writes goes through the validator.

Writes are all-or-nothing (``atomic_dir``): the complete new directory is written beside
the target and swapped in, then the old one is removed; on an exception, Ctrl-C or
SIGTERM the target is as it was and no temporary directory is left. In a target that
holds other files too (a training run's output directory) the two files are renamed into
place, the weights first and the config last, and put back on failure; nothing else in
the directory is touched. An existing checkpoint is replaced only with ``overwrite=True``. Under ``torch.distributed`` only
rank 0 writes and every rank waits for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Collection, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qcircuit import Circuit, QCError, parse

from .atomic_dir import fsync, replace_dir
from .checkpoint_schema import (FORMAT, FORMAT_VERSION, MODULE_DTYPES, TENSOR_DTYPES,
                                branch_tensor_names)
from .files import read_json, regular_size
from .record import AdapterRecord, TensorRecord
from .record import from_json as record_from_json
from .weights import apply_circuit

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "MAX_CONFIG_BYTES",
           "MAX_GATE_ABS", "tensor_records", "write", "read", "read_record", "check_tensors",
           "check_unrecorded", "check_values", "check_circuits"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 16 << 20
#: Largest gate entry accepted. Gates start at most 1 in magnitude (Kaiming, unit gain) and
#: training moves them little; 1e6 is far beyond that and far from float32 overflow.
MAX_GATE_ABS = 1e6
#: A circuit whose output on unit-size inputs comes within this factor of its dtype's
#: largest value is refused (``check_circuits``).
OVERFLOW_MARGIN = 1e-6
_HEADER_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _sha256(t: torch.Tensor) -> str:
    """sha256 of a contiguous CPU tensor's bytes, as safetensors stores them."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def tensor_records(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorRecord]:
    """Tensor name -> its record (dtype, shape, sha256), as the config's ``tensors`` section."""
    return {name: TensorRecord(str(t.dtype).removeprefix("torch."), tuple(t.shape), _sha256(t))
            for name, t in sorted(_cpu(tensors).items())}


# --- checks of tensors ----------------------------------------------------------------------
def check_values(name: str, t: torch.Tensor, where: str) -> None:
    """A saved tensor (a gate, or a trained module's) is finite and within ``MAX_GATE_ABS``:
    anything else is refused."""
    bad = ~torch.isfinite(t)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise QCError(f"{where}: tensor {name} holds a non-finite entry ({t[index].item()} "
                      f"at {index})")
    peak = t.abs().max().item() if t.numel() else 0.0
    if peak > MAX_GATE_ABS:
        raise QCError(f"{where}: tensor {name} holds an entry of magnitude {peak:.3g}, beyond "
                      f"the bound {MAX_GATE_ABS:g} for a saved tensor")


def _differ(where: str, want: Collection[str], got: Collection[str]) -> None:
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise QCError(f"{where}: the tensors differ from the config's: missing "
                      f"{missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}")


def check_tensors(where: str, records: Mapping[str, TensorRecord],
                  tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors that are not exactly the recorded ones (a record's ``tensors``): the
    same names, dtype, shape and sha256, finite and within ``MAX_GATE_ABS``. ``read``
    applies it to a file; the PEFT doors to tensors another loader hands over."""
    _differ(where, records.keys(), tensors.keys())
    for name in sorted(tensors):
        rec, t = records[name], tensors[name].detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != rec.dtype or tuple(t.shape) != rec.shape:
            raise QCError(f"{where}: tensor {name} is {dtype} {list(t.shape)}, the config "
                          f"says {rec.dtype} {list(rec.shape)}")
        if _sha256(t) != rec.sha256:
            raise QCError(f"{where}: tensor {name} does not match its sha256 in "
                          f"{CONFIG_NAME}: the file was changed or damaged")
        check_values(name, t, where)


def check_unrecorded(where: str, record: AdapterRecord,
                     tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors for an adapter whose record holds no hashes (a fresh PEFT config): exactly
    the names and shapes its layers call for, float32/float64, finite, bounded."""
    want, held = record.expected_tensors(), record.module_tensor_names()
    _differ(where, want.keys(), tensors.keys())
    for name, shape in want.items():
        t = tensors[name].detach().to("cpu")
        dtypes = MODULE_DTYPES if name in held else TENSOR_DTYPES
        if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") not in dtypes:
            raise QCError(f"{where}: tensor {name} is {str(t.dtype)[6:]} {list(t.shape)}, "
                          f"expected {' or '.join(dtypes)} {list(shape)}")
        check_values(name, t, where)


def check_circuits(where: str, record: AdapterRecord, tensors: Mapping[str, torch.Tensor],
                   modules: Collection[str] | None = None, probes: int = 8) -> None:
    """Refuse circuits that overflow: each branch's gates (and frozen gates) applied to
    ``probes`` fixed Gaussian inputs, in float64, must stay within ``OVERFLOW_MARGIN`` of
    the largest value of the gates' dtype. The entry bound ``MAX_GATE_ABS`` does not bound
    a product of gates; this does, on inputs of unit size, before a forward meets it."""
    circuits: dict[str, Circuit] = {}
    gen = torch.Generator().manual_seed(0)
    for module, rec in record.layers.items():
        if modules is not None and module not in modules:
            continue
        x = torch.randn(probes, rec.in_features, dtype=torch.float64, generator=gen)
        for b in rec.branches:
            if b.qc not in circuits:
                circuits[b.qc] = parse(b.qc, file=f"{where} (circuit {b.circuit})",
                                       includes=False).circuits[b.circuit]
            names = branch_tensor_names(module, b.circuit, len(rec.branches), len(b.gates),
                                        b.frozen)
            for part in ("adapter", "frozen") if b.frozen else ("adapter",):
                gates = [tensors[k] for k, (p, _) in names.items() if p == part]
                y = apply_circuit(circuits[b.qc], [g.double() for g in gates], x)
                peak = float(y.abs().max())
                limit = torch.finfo(gates[0].dtype).max * OVERFLOW_MARGIN
                if not peak <= limit:
                    which = "frozen initial gates" if part == "frozen" else "gates"
                    raise QCError(f"{where}: the {which} of circuit {b.circuit!r} on {module} "
                                  f"map unit-size inputs to entries of {peak:.3g}, within "
                                  f"{1 / OVERFLOW_MARGIN:g} of overflowing "
                                  f"{gates[0].dtype}: a forward would overflow")


# --- reading ------------------------------------------------------------------------------
def read_record(folder: str | Path) -> AdapterRecord:
    """The checked record of the checkpoint directory ``folder`` (its config only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QCError(f"{folder} is not an adapter checkpoint directory")
    path = folder / CONFIG_NAME
    config = read_json(path, MAX_CONFIG_BYTES, "an adapter config",
                       missing=f"{folder} is not an adapter checkpoint: {CONFIG_NAME} is missing")
    return record_from_json(config, str(path))


def _read_tensors(path: Path, records: Mapping[str, TensorRecord]) -> dict[str, torch.Tensor]:
    """The tensors, each header checked against its record before it is read (nothing
    larger than recorded is read), then every tensor checked whole (``check_tensors``)."""
    limit = sum(4096 + _ITEM_BYTES[r.dtype] * math.prod(r.shape) for r in records.values())
    regular_size(path, limit + (1 << 20), "the tensors the config records",
                 missing=f"{path.parent} is not an adapter checkpoint: {path.name} is missing")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            _differ(str(path), records.keys(), names)
            for name in sorted(names):
                rec, part = records[name], f.get_slice(name)
                dtype = _HEADER_DTYPES.get(part.get_dtype(), part.get_dtype())
                if dtype != rec.dtype or tuple(part.get_shape()) != rec.shape:
                    raise QCError(f"{path}: tensor {name} is stored as {dtype} "
                                  f"{list(part.get_shape())}, the config says {rec.dtype} "
                                  f"{list(rec.shape)}")
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, QCError):
            raise
        raise QCError(f"cannot read {path}: {e}") from None
    check_tensors(str(path), records, tensors)
    return tensors


def read(path: str | Path) -> tuple[AdapterRecord, dict[str, torch.Tensor]]:
    """The record and tensors of a checkpoint directory, fully verified; QCError otherwise."""
    record = read_record(path)
    weights = Path(path) / WEIGHTS_NAME
    tensors = _read_tensors(weights, record.tensors)
    check_circuits(str(weights), record, tensors)
    return record, tensors


# --- writing ------------------------------------------------------------------------------
def _write_files(folder: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    fsync(folder / WEIGHTS_NAME)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_local(path: str | Path, record: AdapterRecord, tensors: Mapping[str, torch.Tensor],
                 overwrite: bool) -> None:
    if not os.fspath(path):
        raise QCError("cannot save the adapter: the path is empty")
    target = Path(os.path.realpath(path))
    tensors = _cpu(tensors)
    config = record.with_tensors(tensor_records(tensors)).to_json()
    record_from_json(config, f"the config for {target / CONFIG_NAME}")   # what read checks
    for name, t in tensors.items():
        check_values(name, t, f"cannot save the adapter to {target}")
    replace_dir(target, lambda tmp: _write_files(tmp, config, tensors), owned=(WEIGHTS_NAME,
                CONFIG_NAME), overwrite=overwrite, what="an adapter checkpoint")


def _collective_device() -> torch.device:
    """Where a tensor for the default process group's collectives lives."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def write(path: str | Path, record: AdapterRecord, tensors: Mapping[str, torch.Tensor], *,
          overwrite: bool = True) -> None:
    """Write a checkpoint directory, all or nothing (see the module doc).

    ``record`` (``record.from_targets``) is written with the records of ``tensors``. With
    ``overwrite=False`` an existing checkpoint is refused. Under an initialised
    ``torch.distributed`` group, call it on every rank: rank 0 writes, the others wait for
    it and raise a ``QCError`` if it failed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        _write_local(path, record, tensors, overwrite)
        return
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            _write_local(path, record, tensors, overwrite)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
            failure = e
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(failed)   # the barrier: every rank waits here for rank 0's write
    if failure is not None:
        raise failure
    if failed.item():
        raise QCError(f"rank 0 could not save the adapter to {path} (its error says why)")
