"""Replace a directory all or nothing: a complete new one is written beside it, then swapped in.

``replace_dir(target, fill, owned=..., overwrite=...)`` calls ``fill(tmp)`` on a fresh
temporary directory next to ``target`` (same file system), syncs it, and puts it at
``target``: by one rename when there is no target (or an empty one), else by one atomic
exchange (Linux ``renameat2(RENAME_EXCHANGE)``) or, where that is missing, two renames
that are undone on error. The old directory is removed afterwards. Whatever happens
before the swap (an exception, Ctrl-C, SIGTERM), the temporary directory is removed and
``target`` is as it was. A target holding names outside ``owned`` is refused: this
module never deletes files it did not write.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterator

from qcircuit import QCError


class _Terminated(BaseException):
    """SIGTERM arrived while a directory was being written."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While writing, SIGTERM raises (so the temporary files go), then is delivered again
    to the handler it had before. Only in the main thread, only if SIGTERM is handled."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (
            signal.SIG_IGN, None):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)   # the default action ends the process here
        raise QCError("saving was interrupted by SIGTERM; the target is unchanged") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def fsync(path: Path) -> None:
    """Flush a file or a directory to disk (where the file system can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+), or None."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to look in (e.g. Windows)
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2``); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(new: Path, target: Path) -> None:
    """Put the directory ``new`` at ``target``; an old target ends up at ``new``'s path
    or is removed. Any failure leaves ``target`` as it was."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(new, target)   # a rename onto a missing or empty directory
        return
    if _exchange(new, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside)     # the old directory aside, onto an empty placeholder
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _check_target(target: Path, owned: Collection[str], overwrite: bool, what: str) -> None:
    if os.path.lexists(target) and not target.is_dir():
        raise QCError(f"cannot save {what} to {target}: it is a file, not a directory")
    names = sorted(os.listdir(target)) if target.is_dir() else []
    foreign = [n for n in names if n not in owned]
    if foreign:
        raise QCError(f"cannot save {what} to {target}: it holds other files "
                      f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                      f"saving replaces the directory as a whole and never deletes files it "
                      f"did not write: save into a new or empty directory")
    if names and not overwrite:
        raise QCError(f"{target} already holds {what}: pass overwrite=True (qcompile --force) "
                      f"to replace it")


def replace_dir(target: Path, fill: Callable[[Path], None], *, owned: Collection[str],
                overwrite: bool, what: str) -> None:
    """Make ``target`` (an absolute path) a directory holding what ``fill`` writes."""
    _check_target(target, owned, overwrite, what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QCError(f"cannot save {what} to {target}: cannot make its parent directory "
                      f"({e.strerror or e})") from None
    with _sigterm_raises():
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            fill(tmp)
            fsync(tmp)
            _swap_in(tmp, target)
            fsync(target.parent)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
