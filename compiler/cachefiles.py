"""The cache directory and its files: where tuning results live on disk, and how they are
read and written safely.

Everything under the cache directory (``$QCIRCUIT_CACHE_DIR``, else ``~/.cache/qcircuit``) is
untrusted input: another process, another user or an attacker may have put anything there.
:func:`read_json` opens only regular files (no FIFO that blocks, no link to ``/dev/zero``,
``O_NOFOLLOW``), refuses a file larger than its cap before reading it, and parses bounded
UTF-8 JSON; whatever is wrong becomes one :class:`CacheFileError`, which callers turn into one
warning and a fresh measurement. Writes are atomic (a temporary file in the same directory,
renamed over the old one) under an exclusive ``fcntl`` lock (:func:`flock`), so many processes
starting at once are safe. Machine identity (:func:`cpu_model`, :func:`device_name`) names what
a measurement holds for.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, results stay in memory
    fcntl = None

CPUINFO_MAX_BYTES = 1 << 20

_warned: set[str] = set()   # process-wide: one warning per problem and process, not per call


class CacheFileError(ValueError):
    """A cache file that cannot be used: not a regular file, too large, not UTF-8 JSON."""


def cache_dir() -> Path:
    """``$QCIRCUIT_CACHE_DIR`` (or the older ``$QCIRCUIT_CACHE``), else
    ``$XDG_CACHE_HOME/qcircuit`` or ``~/.cache/qcircuit``."""
    root = os.environ.get("QCIRCUIT_CACHE_DIR") or os.environ.get("QCIRCUIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcircuit")
    return Path(root)


def warn_once(what: str, message: str, stacklevel: int = 3) -> None:
    """One ``RuntimeWarning`` per ``what`` and process."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"qcircuit: {message}", RuntimeWarning, stacklevel=stacklevel)


def forget_warnings() -> None:
    """Warn again about every problem (``tuning.reset`` calls this)."""
    _warned.clear()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name and core count."""
    model = platform.processor() or platform.machine()
    try:
        text = read_bytes(Path("/proc/cpuinfo"), CPUINFO_MAX_BYTES, regular=False).decode(
            "utf-8", "replace")
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith(("model name", "Model", "CPU part")))
    except (CacheFileError, StopIteration):
        pass
    return f"{model} x{os.cpu_count()}"


def device_name(device: torch.device) -> str:
    """The hardware a measurement on ``device`` holds for: the GPU's model, or the CPU's."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


def read_bytes(path: Path, max_bytes: int, *, regular: bool = True) -> bytes:
    """The bytes of ``path``: a regular file (unless ``regular=False``, for ``/proc`` files),
    not followed through a final symlink, at most ``max_bytes`` long; a missing file raises
    ``FileNotFoundError``, anything else wrong a :class:`CacheFileError`."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as exc:
        raise CacheFileError(f"cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if regular and not stat.S_ISREG(info.st_mode):
            raise CacheFileError("not a regular file")
        if info.st_size > max_bytes:
            raise CacheFileError(f"{info.st_size:,} bytes, more than the {max_bytes:,} allowed")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise CacheFileError(f"more than the {max_bytes:,} bytes allowed")
        return b"".join(chunks)
    except OSError as exc:
        raise CacheFileError(f"cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def read_json(path: Path, max_bytes: int) -> object | None:
    """The JSON value in ``path`` (see :func:`read_bytes`), or None when there is no file."""
    try:
        data = read_bytes(path, max_bytes)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CacheFileError(f"not UTF-8 JSON ({str(exc)[:80]})") from None


def stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when ``path`` is replaced or rewritten (inode, size, mtime), or None."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def writable(directory: Path) -> bool:
    """Whether ``directory`` exists (made if needed) and can be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK)


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as JSON to ``path`` atomically (the caller holds :func:`flock`);
    raises ``OSError`` (and leaves no temporary file) when it cannot."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def flock(path: Path, wait: float = math.inf) -> Iterator[bool]:
    """An exclusive ``fcntl`` lock on the file ``path`` (created if needed); yields whether
    it is held: False when the file cannot be opened or the lock was not had in ``wait`` s."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError:
        yield False
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            yield False
            return
        end = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait == math.inf else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    yield False
                    return
                time.sleep(0.02)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


LOCK = "wisdom.lock"
LOCK_WAIT = 30.0   # seconds a process waits for another's measurement before measuring itself


@contextlib.contextmanager
def measuring(directory: Path, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """Hold ``directory``'s cross-process lock while measuring (one process measures, the
    others wait and then read its result); yields whether it is held — False when the
    directory is not writable (one warning) or another process kept it over ``wait`` s."""
    if not writable(directory):
        warn_once(f"cache:ro {directory}", f"cache directory {directory} is not writable; "
                  "measurements are kept in memory only", 5)
        yield False
        return
    with flock(directory / LOCK, wait) as held:
        yield held
