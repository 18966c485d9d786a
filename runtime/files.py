"""Files a user hands the runtime, read as hostile input: one place for the rules.

Every file is opened without blocking and checked on the open descriptor before anything
is read: only a regular file is read (never a FIFO, a device such as ``/dev/zero``, a
directory or a kernel file that reports size 0), its size is capped before reading, and
at most the cap is ever read. ``inside`` resolves a name found *in* a file (a shard of an
index) and refuses one that leaves the directory it belongs to (``..``, an absolute path,
a symlink out). JSON is read strictly: UTF-8, no NaN or infinities, no duplicate keys, no
number of more than ``MAX_NUMBER_DIGITS`` digits, bounded nesting. Every failure is one
``QCError`` naming the file, never a raw ``OSError``, ``UnicodeDecodeError``,
``RecursionError`` or ``JSONDecodeError``.
"""
from __future__ import annotations

import json
import math
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qcircuit import QCError
from qcircuit.sources import read_at_most

__all__ = ["MAX_NUMBER_DIGITS", "open_regular", "regular_size", "read_bytes", "read_json",
           "decode_json", "parse_json", "inside"]

#: Longest number accepted in JSON (a gate dim, a size): more digits is not a real value.
MAX_NUMBER_DIGITS = 40


@contextmanager
def open_regular(path: str | Path, missing: str | None = None) -> Iterator[int]:
    """A read-only descriptor of ``path`` (symlinks followed) if it is a regular file;
    ``QCError`` otherwise (``missing``: the message when there is no such file). Never
    blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise QCError(missing or f"cannot read {path}: no such file") from None
    except OSError as e:
        raise QCError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QCError(f"cannot read {path}: not a regular file")
        yield fd
    finally:
        os.close(fd)


def regular_size(path: str | Path, limit: int, what: str, missing: str | None = None) -> int:
    """The size of the regular file ``path``, refused (``QCError``) over ``limit`` bytes."""
    with open_regular(path, missing) as fd:
        size = os.fstat(fd).st_size
    if size > limit:
        raise QCError(f"{path}: {size:,} bytes, over the limit of {limit:,} for {what}")
    return size


def read_bytes(path: str | Path, limit: int, what: str, missing: str | None = None) -> bytes:
    """The contents of the regular file ``path``: at most ``limit`` bytes are read, and a
    longer file is refused (``what`` names the kind of file: "an adapter config")."""
    with open_regular(path, missing) as fd:
        if os.fstat(fd).st_size > limit:
            raise QCError(f"{path}: larger than {_size(limit)}: not {what}")
        try:
            data = read_at_most(fd, limit + 1)
        except OSError as e:
            raise QCError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise QCError(f"{path}: larger than {_size(limit)}: not {what}")
    return data


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and not limit % (1 << 20) else f"{limit:,} bytes"


def _unique_pairs(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {json.dumps(key)[:60]}")
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} digits (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    if len(text) > 2 * MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def read_json(path: str | Path, limit: int, what: str, missing: str | None = None) -> object:
    """Bounded, UTF-8, strict JSON from the regular file ``path``."""
    return decode_json(read_bytes(path, limit, what, missing), str(path), what)


def decode_json(data: bytes, where: str, what: str) -> object:
    """``data`` as UTF-8 strict JSON (see ``parse_json``); ``QCError`` naming ``where``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        pickle = data[:1] == b"\x80"
        hint = " (it looks like a pickle, which qcircuit never loads)" if pickle else ""
        raise QCError(f"{where}: not UTF-8 text at byte {e.start}{hint}: {what} is JSON") from None
    return parse_json(text, where)


def parse_json(text: str, where: str) -> object:
    """``text`` as strict JSON (see the module doc); ``QCError`` naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant,
                          parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise QCError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, the hooks above
        raise QCError(f"{where}: not valid JSON: {e}") from None


def inside(folder: str | Path, name: object, what: str) -> Path:
    """The path of ``name`` (a relative file name read from a file in ``folder``), refused
    unless it is a plain relative path that stays in ``folder`` once symlinks are resolved."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        raise QCError(f"{folder}: {what} must be a file name, got {_short(name)}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise QCError(f"{folder}: {what} {_short(name)} is not a file inside the directory")
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, real]) != root:
        raise QCError(f"{folder}: {what} {_short(name)} leads outside the directory "
                      "(a symlink out)")
    return Path(real)


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else \
        type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."
