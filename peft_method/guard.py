"""qcircuit checks a QuanTA adapter directory before PEFT or transformers read it.

Both PEFT doors (``PeftModel.from_pretrained``; transformers' ``model.load_adapter``) read
``adapter_config.json`` with ``PeftConfig.from_json_file`` (``json.load`` of the whole
file, of any size; a FIFO blocks it), after ``PeftConfig.from_pretrained`` or
``_get_peft_type`` looked for it, and then the tensors with their own loaders (a raw
``SafetensorError`` on a damaged file, a FIFO blocks, an ``adapter_model.bin`` would be
unpickled). :func:`install` wraps those three class methods of ``PeftConfig``:

* for every method: an ``adapter_config.json`` that exists but is not a regular file, or
  is over ``MAX_CONFIG_BYTES``, is refused before anything reads it (no PEFT adapter
  config is anywhere near 16 MiB);
* for a QuanTA config: the whole directory is read as native ``load`` reads it
  (``checkpoint.read``: the record's validator, then every tensor's dtype, shape, hash and
  values), so every problem is one ``QCError`` naming the file before PEFT, transformers
  or the model sees anything; a directory holding ``adapter_model.bin`` but no
  safetensors is refused (qcircuit never unpickles). A config with no record (only a
  program, as ``QuanTAConfig.save_pretrained`` writes one before any adapter exists) is
  allowed where no tensors lie beside it, its program checked as text with includes off.

Other methods' configs are then read by PEFT's own reader, as before.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from qcircuit import QCError, parse
from qcircuit.runtime import checkpoint
from qcircuit.runtime.files import decode_json, open_regular, read_bytes

from .config import PEFT_TYPE_NAME, RECORD_FIELDS

_MARK = "_qcircuit_guard"
_BIN = "adapter_model.bin"


def _is_quanta(data: bytes, obj: object | None) -> bool:
    if obj is not None:
        return isinstance(obj, dict) and (obj.get("peft_type") == PEFT_TYPE_NAME
                                          or obj.get("format") == checkpoint.FORMAT)
    return PEFT_TYPE_NAME.encode() in data or checkpoint.FORMAT.encode() in data


def check_quanta_file(path: str | Path) -> dict | None:
    """The parsed config at ``path`` if it is a QuanTA config, after every check (module
    doc); None for another method's config. ``QCError`` on anything wrong."""
    data = read_bytes(path, checkpoint.MAX_CONFIG_BYTES, "an adapter config")
    try:
        obj = decode_json(data, str(path), "an adapter config")
    except QCError:
        if _is_quanta(data, None):
            raise
        return None   # another method's damaged file: PEFT's reader says what it says
    if not _is_quanta(data, obj):
        return None
    folder = Path(path).parent
    tensors_beside = [n for n in (checkpoint.WEIGHTS_NAME, _BIN) if os.path.lexists(folder / n)]
    if any(key in obj for key in RECORD_FIELDS):
        if checkpoint.WEIGHTS_NAME in tensors_beside:
            checkpoint.read(folder)   # what native load reads: record, tensors, hashes
        elif _BIN in tensors_beside:
            raise QCError(f"{folder} holds {_BIN} but no {checkpoint.WEIGHTS_NAME}: qcircuit "
                          "adapters are safetensors, and a .bin (a pickle) is never loaded")
        else:   # the tensors may still be on their way (a hub download): the config now
            checkpoint.read_record(folder)
        return {**obj, "peft_type": PEFT_TYPE_NAME}   # native saves may lack it: PEFT needs it
    if tensors_beside:
        raise QCError(f"{path}: a QuanTA config with tensors beside it must record them "
                      f"(format, layers, tensors and their hashes): save it with "
                      f"save_pretrained after get_peft_model")
    program = obj.get("program")
    if not isinstance(program, str):
        raise QCError(f"{path}: $.program: expected .qc text")
    parse(program, file=f"{path} (program)", includes=False)
    return obj


def _check_local(directory: object, subfolder: object = None) -> None:
    """Refuse a local ``adapter_config.json`` that is there but is not a regular file
    (PEFT would look past it to the hub, or block on a FIFO)."""
    if not isinstance(directory, (str, os.PathLike)):
        return
    path = Path(directory, subfolder or "", "adapter_config.json")
    if os.path.lexists(path):
        with open_regular(path):
            pass


def install() -> None:
    """Wrap ``PeftConfig.from_json_file``, ``from_pretrained`` and ``_get_peft_type``
    (idempotent)."""
    from peft import PeftConfig

    if getattr(PeftConfig.from_json_file, _MARK, False):
        return
    read_json_file = PeftConfig.from_json_file.__func__
    from_pretrained = PeftConfig.from_pretrained.__func__
    get_peft_type = PeftConfig._get_peft_type.__func__

    @functools.wraps(read_json_file)
    def guarded_json_file(cls, path_json_file, **kwargs):
        checked = check_quanta_file(path_json_file)
        return checked if checked is not None else read_json_file(cls, path_json_file, **kwargs)

    @functools.wraps(from_pretrained)
    def guarded_from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        _check_local(pretrained_model_name_or_path, subfolder)
        return from_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @functools.wraps(get_peft_type)
    def guarded_peft_type(cls, model_id, **kwargs):
        _check_local(model_id, kwargs.get("subfolder"))
        return get_peft_type(cls, model_id, **kwargs)

    for wrapper in (guarded_json_file, guarded_from_pretrained, guarded_peft_type):
        setattr(wrapper, _MARK, True)
    PeftConfig.from_json_file = classmethod(guarded_json_file)
    PeftConfig.from_pretrained = classmethod(guarded_from_pretrained)
    PeftConfig._get_peft_type = classmethod(guarded_peft_type)
