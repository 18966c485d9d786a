"""Getting ``.qc`` text in safely: bounded sizes, only regular files, UTF-8 with a located error.

A path is resolved, opened without blocking and checked on the open descriptor, so a FIFO,
a device (``/dev/zero``), a directory or a kernel file (``/proc/self/environ`` reports size
0 but has content) is refused before anything is read, and at most ``limit + 1`` bytes are
ever read.
"""
from __future__ import annotations

import codecs
import os
import stat

from .errors import QCError, Span
from .limits import MAX_TEXT_BYTES

#: Kernel and device trees: their "files" are not text a user wrote.
_PSEUDO = ("/proc/", "/sys/", "/dev/")
_ONLY_REGULAR = ".qc text is read only from regular files"

__all__ = ["read_file", "decode", "check_size", "position"]


def position(text: str, offset: int, file: str | None = None) -> Span:
    """Where ``offset`` is in ``text``: 1-based line and column, and that line."""
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    source = text[line_start:line_end if line_end >= 0 else len(text)].removesuffix("\r")
    return Span(file, text.count("\n", 0, offset) + 1, offset - line_start + 1, source)


def check_size(text: str, file: str | None, limit: int = MAX_TEXT_BYTES) -> None:
    """Refuse a text longer than ``limit`` characters, pointing at where it crosses it."""
    if len(text) > limit:
        raise QCError(f"the text is longer than the limit of {limit} characters "
                      f"({limit // 2**20} MiB); a .qc program is a few KiB",
                      position(text, limit, file))


def read_file(path: str, span: Span | None, limit: int = MAX_TEXT_BYTES) -> str:
    """The text of the regular file at ``path`` (at most ``limit`` bytes). Errors point at
    ``span`` (the ``include`` that named it) or, for a top-level file, at its first line."""
    where = span or Span(path, 1, 1)
    if "\x00" in path:
        raise QCError("a file name cannot hold a NUL character", span)
    real = os.path.realpath(path)
    if real.startswith(_PSEUDO):
        raise QCError(f"{path!r} is not a regular file ({real}): {_ONLY_REGULAR}", where)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise QCError(f"cannot read {path!r}: {err.strerror or err}", span) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise QCError(f"{path!r} is not a regular file: {_ONLY_REGULAR}", where)
        if info.st_size > limit:
            raise QCError(f"{path!r} is {info.st_size} bytes, over the limit of {limit} bytes "
                          f"({limit // 2**20} MiB) for one file", where)
        data = read_at_most(fd, limit + 1)
    except OSError as err:
        raise QCError(f"cannot read {path!r}: {err.strerror or err}", span) from None
    finally:
        os.close(fd)
    if info.st_size == 0 and data:
        raise QCError(f"{path!r} is not a regular file (it reports size 0 but has content)", where)
    if len(data) > limit:
        raise QCError(f"{path!r} grew over the limit of {limit} bytes while it was read", where)
    return decode(data, path)


def read_at_most(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from the open file ``fd``, in chunks of at most 1 MiB."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def decode(data: bytes, file: str | None, limit: int = MAX_TEXT_BYTES) -> str:
    """UTF-8 bytes -> text; a bad byte is a ``QCError`` at its line and column."""
    if len(data) > limit:
        raise QCError(f"the text is longer than the limit of {limit} bytes "
                      f"({limit // 2**20} MiB); a .qc program is a few KiB",
                      position(data[:limit + 1].decode("utf-8", "replace"), limit, file))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        # located as the parser locates: after a byte-order mark (it is not text); the
        # replacing decode keeps the offsets up to the first bad byte
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        text = data[bom:].decode("utf-8", "replace")
        where = position(text, len(data[bom:err.start].decode("utf-8")), file)
        raise QCError("the file is not UTF-8 text", where, expected="UTF-8 text") from None

