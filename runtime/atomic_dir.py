"""Replace a directory all or nothing: a complete new one is written beside it, then swapped in.

``replace_dir(target, fill, owned=..., overwrite=...)`` calls ``fill(tmp)`` on a fresh
temporary directory next to ``target`` (same file system), syncs it, and puts it at
``target``: by one rename when there is no target (or an empty one), else by one atomic
exchange (Linux ``renameat2(RENAME_EXCHANGE)``) or, where that is missing, two renames
that are undone on error. The old directory is removed afterwards. Whatever happens
before the swap (an exception, Ctrl-C, SIGTERM), the temporary directory is removed and
``target`` is as it was. A target holding names outside ``owned`` is refused: this
module never deletes files it did not write.

Several writers: if another process puts a directory at ``target`` between the checks and
the swap (two first saves into one new directory), the target is checked again and the
swap becomes an exchange (``overwrite``) or a ``QCError`` (the other one won). A process
killed outright (``kill -9``) cannot clean up: its temporary directories carry its host
and process id (``.NAME.tmp-HOST.PID-…``), and the next save of the same target removes
those whose process is gone from this host.

A target that holds other things too (a training run's output directory with its
``checkpoint-*`` folders) is never swapped as a whole: ``fill`` writes into a temporary
directory inside it, and the owned files are renamed into place one by one, the last of
``owned`` last (the checkpoint's config: the commit), under a lock on the directory and
with Ctrl-C held; on any exception, Ctrl-C or SIGTERM the files renamed so far are put
back from hard links of the old ones, so the target again holds the old files, and
nothing else in it is touched. Only a hard kill in the instant between two renames can
leave new and old files side by side, which a checkpoint's hashes then refuse.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import signal
import socket
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
    aside = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
    os.replace(target, aside)     # the old directory aside, onto an empty placeholder
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _foreign(target: Path, owned: Collection[str]) -> list[str]:
    """The names in ``target`` that it does not own (none where it is no directory)."""
    return sorted(n for n in os.listdir(target) if n not in owned) if target.is_dir() else []


def _check_target(target: Path, owned: Collection[str], overwrite: bool, what: str,
                  foreign_ok: bool = True) -> None:
    if os.path.lexists(target) and not target.is_dir():
        raise QCError(f"cannot save {what} to {target}: it is a file, not a directory")
    foreign = _foreign(target, owned)
    if foreign and not foreign_ok:
        raise QCError(f"cannot save {what} to {target}: other files appeared in it while "
                      f"saving ({', '.join(foreign[:5])}); nothing was changed: save again")
    for name in owned:
        path = target / name
        if os.path.lexists(path) and (os.path.islink(path) or not path.is_file()):
            raise QCError(f"cannot save {what} to {target}: {name} there is not a regular "
                          "file, and saving never deletes what it did not write")
    if any(os.path.lexists(target / n) for n in owned) and not overwrite:
        raise QCError(f"{target} already holds {what}: pass overwrite=True (qcompile --force) "
                      f"to replace it")


def _prefix(target: Path, kind: str) -> str:
    """``.NAME.tmp-HOST.PID-``: whose temporary directory this is, for ``_remove_stale``."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]
    return f".{target.name}.{kind}-{host}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0   # someone else's process, or not a pid we can ask about
    return True


def _remove_stale(target: Path) -> None:
    """Remove temporary directories of ``target`` left by dead processes of this host."""
    host = _prefix(target, "tmp").split(".tmp-", 1)[1].rsplit(".", 1)[0]
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-{re.escape(host)}\.(\d{{1,10}})-")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m[1])) and not os.path.islink(target.parent / name):
            shutil.rmtree(target.parent / name, ignore_errors=True)


def replace_dir(target: Path, fill: Callable[[Path], None], *, owned: Collection[str],
                overwrite: bool, what: str) -> None:
    """Make ``target`` (an absolute path) a directory holding what ``fill`` writes (the
    ``owned`` names); other things already in it stay (module doc)."""
    _check_target(target, owned, overwrite, what)
    if _foreign(target, owned):
        _replace_files(target, fill, tuple(owned), overwrite, what)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QCError(f"cannot save {what} to {target}: cannot make its parent directory "
                      f"({e.strerror or e})") from None
    _remove_stale(target)
    with _sigterm_raises():
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(target, "tmp"), dir=target.parent))
            fill(tmp)
            fsync(tmp)
            _swap_in_checked(tmp, target, owned, overwrite, what)
            fsync(target.parent)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _swap_in_checked(tmp: Path, target: Path, owned: Collection[str], overwrite: bool,
                     what: str) -> None:
    """``_swap_in``, race-free against other writers: without ``overwrite`` only a rename
    onto nothing (or an empty directory), which fails if another writer got there first;
    with it, the target is checked again when it changed under us."""
    for _ in range(3):
        try:
            if overwrite:
                _swap_in(tmp, target)
            else:
                os.replace(tmp, target)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                raise
        _check_target(target, owned, overwrite, what, foreign_ok=False)   # may it be replaced?
    raise QCError(f"cannot save {what} to {target}: other processes keep changing it")


# --- a directory that holds other things too -----------------------------------------------
@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the directory ``folder`` (``flock``; none where unsupported):
    two saves into one shared directory commit one after the other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is raised when the block ends, not in the middle.
    Only in the main thread and where SIGINT raises ``KeyboardInterrupt`` as usual."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _replace_files(target: Path, fill: Callable[[Path], None], owned: tuple[str, ...],
                   overwrite: bool, what: str) -> None:
    """The owned files of ``fill`` renamed into the shared directory ``target`` (module doc)."""
    stem = target / "qcircuit-save"   # temporary directories: .qcircuit-save.tmp-HOST.PID-…
    _remove_stale(stem)
    with _sigterm_raises(), _locked(target):
        _check_target(target, owned, overwrite, what)   # again, under the lock
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(stem, "tmp"), dir=target))
            fill(tmp)
            fsync(tmp)
            with held_interrupts():
                _commit(tmp, target, [n for n in owned if os.path.lexists(tmp / n)])
            fsync(target)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path, names: list[str]) -> None:
    """Rename ``names`` from ``tmp`` into ``target`` in order; on any failure put back what
    was there (hard links of the old files, made first) and remove what was new."""
    old = {}
    for name in names:
        if os.path.lexists(target / name):
            old[name] = tmp / f".old.{name}"
            os.link(target / name, old[name])
    done: list[str] = []
    try:
        for name in names:
            os.replace(tmp / name, target / name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            if name in old:
                os.replace(old[name], target / name)
            else:
                os.unlink(target / name)
        raise
