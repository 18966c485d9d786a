"""Reading the reference implementation's checkpoint files, as hostile input.

A reference checkpoint is a ``.safetensors`` or ``.bin`` file, or a ``checkpoint-*``
directory holding one, or shards named by an index (``*.index.json``). Every file is
checked before it is read (``files.py``): a regular file (never a FIFO, a device such as
``/dev/zero``, a directory), the index bounded and schema-checked, every shard it names a
plain relative path that stays inside the directory (no ``..``, no absolute path, no
symlink out). Only keys of QuanTA gates are read, each parsed with bounded numbers
(qudit offsets ``-1 … -MAX_QUDITS``), each tensor's dtype and shape checked from its header
before its data is read: real floating point only (complex and integer gates are refused,
never cast), four dims, at most ``MAX_GATE_ELEMENTS`` entries, at most ``MAX_READ_BYTES``
in all, finite and within ``MAX_GATE_ABS``. Every failure is one ``QCError``.

A ``.bin`` is a pickle. It is read by transformers' ``load_state_dict`` (the loader of
Trainer checkpoints), which unpickles with torch's ``weights_only=True`` (tensors and plain
containers only, never code) and memory-maps the file, so only the gates are read into
memory; it must be a zip archive (``torch.save``'s format) whose pickle is at most
``MAX_PICKLE_BYTES``. This is the one place qcircuit unpickles anything.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from qcircuit import QCError
from qcircuit.errors import with_article
from qcircuit.ir import MAX_QUDITS

from .checkpoint import MAX_GATE_ABS
from .files import inside, open_regular, read_json

__all__ = ["read_reference", "gate_key", "MAX_INDEX_BYTES", "MAX_GATE_ELEMENTS",
           "MAX_READ_BYTES", "MAX_PICKLE_BYTES"]

#: An index (``*.index.json``): a map of a few thousand tensor names.
MAX_INDEX_BYTES = 64 << 20
#: Entries of one gate: a gate on two qudits of dim 64.
MAX_GATE_ELEMENTS = 64 ** 4
#: Bytes of gates read from one checkpoint, all files together.
MAX_READ_BYTES = 4 << 30
#: The pickle inside a ``.bin`` (its tensors' data lies beside it in the archive).
MAX_PICKLE_BYTES = 64 << 20
#: Longest tensor name looked at.
MAX_KEY_CHARS = 2000

_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>[^ ]+)\.quanta_weights(?P<frozen>2?)"
                  r"\.(?P<i>-\d+) (?P<j>-\d+)")
_LOOKS_LIKE_A_GATE = re.compile(r"\.quanta_weights2?\.")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}
_NAMES = {"C64": "complex64", "C128": "complex128", "I8": "int8", "I16": "int16", "I32": "int32",
          "I64": "int64", "U8": "uint8", "BOOL": "bool"}   # safetensors' dtype names


def gate_key(key: object) -> tuple[str, bool, int, int] | None:
    """``(module, frozen, i, j)`` of a gate's key (``M.quanta_weights.-1 -2``), None for
    any other key; ``QCError`` for a malformed gate key, or one whose qudit offsets are out
    of range (read with at most a few digits: the pairs they imply are bounded)."""
    if not isinstance(key, str) or not _LOOKS_LIKE_A_GATE.search(key):
        return None
    m = _KEY.fullmatch(key) if len(key) <= MAX_KEY_CHARS else None
    if m is None:
        raise QCError(f"tensor {key[:200]!r}: not a gate key of the form "
                      "'<module>.quanta_weights.<i> <j>' (at most "
                      f"{MAX_KEY_CHARS} characters)")
    if len(m["i"]) > 4 or len(m["j"]) > 4 or not -MAX_QUDITS <= int(m["j"]) < int(m["i"]) <= -1:
        raise QCError(f"tensor {key[:200]!r}: a gate key names qudit offsets i > j in "
                      f"-1 … -{MAX_QUDITS}, got {m['i'][:8]} {m['j'][:8]}")
    return m["module"], bool(m["frozen"]), int(m["i"]), int(m["j"])


class _Budget:
    """Bytes of gates read so far, against ``MAX_READ_BYTES``."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, path: Path, key: str, dtype: torch.dtype | str, shape: tuple) -> None:
        if dtype not in _FLOATS.values():
            name = str(dtype).removeprefix("torch.")
            raise QCError(f"{path}: gate {key[:200]} is {_NAMES.get(name, name)}: "
                          "only real floating-point gates can be imported (complex or integer "
                          "gates are refused, never cast)")
        numel = 1
        for d in shape:
            numel *= d
        if len(shape) != 4 or numel > MAX_GATE_ELEMENTS or min(shape, default=0) < 1:
            raise QCError(f"{path}: gate {key[:200]} has shape {list(shape)[:8]}: a gate is "
                          f"4-dimensional with at most {MAX_GATE_ELEMENTS:,} entries")
        self.used += numel * torch.finfo(dtype).bits // 8
        if self.used > MAX_READ_BYTES:
            raise QCError(f"{path}: the gates come to over {MAX_READ_BYTES:,} bytes: not a "
                          "QuanTA adapter")


def _checked(path: Path, key: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise QCError(f"{path}: {key[:200]} holds {with_article(type(tensor).__name__)}, "
                      "not a tensor")
    t = tensor.detach().clone()
    if not bool(torch.isfinite(t).all()) or float(t.abs().max()) > MAX_GATE_ABS:
        raise QCError(f"{path}: gate {key[:200]} holds a non-finite entry or one beyond "
                      f"{MAX_GATE_ABS:g}")
    return t


def _read_safetensors(path: Path, budget: _Budget) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if gate_key(key) is None:
                    continue
                part = f.get_slice(key)
                dtype = part.get_dtype()
                budget.take(path, key, _FLOATS.get(dtype, dtype), tuple(part.get_shape()))
                out[key] = _checked(path, key, f.get_tensor(key))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, QCError):
            raise
        raise QCError(f"cannot read {path} as safetensors: {str(e)[:300]}") from None
    return out


def _read_bin(path: Path, budget: _Budget) -> dict[str, torch.Tensor]:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise QCError(f"cannot read {path}: not a zip archive as torch.save writes one "
                      f"({str(e)[:100]}); older pickle formats are not read") from None
    if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
        raise QCError(f"cannot read {path}: a torch checkpoint holds one pickle of at most "
                      f"{MAX_PICKLE_BYTES >> 20} MiB")
    from transformers.modeling_utils import load_state_dict

    try:  # a pickle: weights_only refuses anything but tensors and plain containers
        state = load_state_dict(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise QCError(f"cannot read {path} as a weights-only torch checkpoint: "
                      f"{str(e)[:300]}") from None
    if not isinstance(state, dict):
        raise QCError(f"{path} holds {with_article(type(state).__name__)}, not a state dict")
    out = {}
    for key, value in state.items():
        if gate_key(key) is not None:
            if isinstance(value, torch.Tensor):
                budget.take(path, key, value.dtype, tuple(value.shape))
            out[key] = _checked(path, key, value)
    return out


def _read_file(path: Path, budget: _Budget) -> dict[str, torch.Tensor]:
    """The QuanTA gates of one ``.safetensors`` or ``.bin`` file."""
    with open_regular(path, missing=f"no such checkpoint: {path}"):
        pass
    if path.suffix == ".safetensors":
        return _read_safetensors(path, budget)
    if path.suffix == ".bin":
        return _read_bin(path, budget)
    raise QCError(f"{path}: a reference checkpoint is a .safetensors or a .bin file")


def _shards(folder: Path, index_path: Path) -> list[Path]:
    """The shards of an index that hold gates: schema-checked, each inside ``folder``."""
    index = read_json(index_path, MAX_INDEX_BYTES, "a checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(index.get("metadata", {}), dict):
        raise QCError(f"{index_path}: an index is an object with a \"weight_map\" object "
                      "(and optionally a \"metadata\" object)")
    names = set()
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise QCError(f"{index_path}: $.weight_map[{key[:200]!r}]: expected a file name, "
                          f"got {type(shard).__name__}")
        if gate_key(key) is not None:
            names.add(shard)
    return [inside(folder, name, "a shard named by the index") for name in sorted(names)]


def read_reference(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The QuanTA tensors of a reference checkpoint: a ``.bin``/``.safetensors`` file, or a
    ``checkpoint-*`` directory (single file or sharded with an index)."""
    path, budget = Path(checkpoint), _Budget()
    if not path.is_dir():
        return _nonempty(_read_file(path, budget), path)
    for name in _INDEX_FILES:
        if (path / name).exists() or (path / name).is_symlink():
            state: dict[str, torch.Tensor] = {}
            for shard in _shards(path, path / name):
                found = _read_file(shard, budget)
                twice = sorted(found.keys() & state.keys())
                if twice:
                    raise QCError(f"{path}: gate {twice[0][:200]} is in two shards")
                state.update(found)
            return _nonempty(state, path)
    for name in _SINGLE_FILES:
        if (path / name).exists() or (path / name).is_symlink():
            return _nonempty(_read_file(path / name, budget), path)
    raise QCError(f"{path} holds none of {', '.join(_SINGLE_FILES + _INDEX_FILES)}")


def _nonempty(state: dict, path: Path) -> dict:
    if not state:
        raise QCError(f"{path} holds no QuanTA gates (no '...quanta_weights.<i> <j>' keys)")
    return state
