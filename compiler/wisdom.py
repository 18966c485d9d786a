"""Wisdom: measured route choices remembered on disk, like FFTW's.

One JSON file, ``wisdom.json`` in the cache directory (``$QCIRCUIT_CACHE_DIR``, else
``~/.cache/qcircuit``), maps a key naming everything that changes the winner — the circuit's
signature, the kind (forward or dense), the token bucket, the device type and dtype, the
torch version and the CPU or GPU model — to the winning route and the times measured.

Writes are atomic (a temporary file renamed over the old one) and happen under an exclusive
``fcntl`` lock on ``wisdom.lock``, so many processes starting at once are safe. The same lock
serialises measurement (:func:`measuring`): one process measures, the others wait for it and
then read its result — measuring on a CPU that other processes are also measuring on would
only time the contention. A file that does not parse is ignored with one warning (and
replaced at the next write); a read-only directory keeps wisdom in memory only, with one
warning. :func:`export_text` / :func:`import_text` carry wisdom between machines' caches.
The cost model's calibration (:mod:`calibrate`) lives beside it, in its own file of the same
directory, written the same way (:func:`read_file`, :func:`write_file`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

FILE = "wisdom.json"
LOCK = "wisdom.lock"
VERSION = 1
LOCK_WAIT = 30.0   # seconds a process waits for another's measurement before using the model

_memory: dict[str, dict] = {}      # this process's view: what it read, measured or imported
_warned: set[str] = set()
_thread_lock = threading.Lock()


def cache_dir() -> Path:
    """``$QCIRCUIT_CACHE_DIR`` (or the older ``$QCIRCUIT_CACHE``), else
    ``~/.cache/qcircuit``: route wisdom, calibration and the CPU kernels (read at each
    planning, not per forward: tests point it at a temporary directory)."""
    root = os.environ.get("QCIRCUIT_CACHE_DIR") or os.environ.get("QCIRCUIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcircuit")
    return Path(root)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name and core count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith(("model name", "Model", "CPU part")))
    except (OSError, StopIteration):
        pass
    return f"{model} x{os.cpu_count()}"


def machine(device_type: str) -> str:
    """The hardware a measurement holds for: the GPU's model, or the CPU's with torch's
    current thread count."""
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} threads={torch.get_num_threads()}"


def key(signature: str, kind: str, bucket: int | None, device_type: str, dtype: torch.dtype,
        extra: str = "") -> str:
    """The wisdom key of one choice (``extra``: switches that change the candidates)."""
    return "|".join([signature, kind, str(bucket), device_type, str(dtype).removeprefix("torch."),
                     f"torch {torch.__version__}", machine(device_type), extra])


def warn_once(what: str, message: str, stacklevel: int = 3) -> None:
    """One ``RuntimeWarning`` per ``what`` and process (keys start with the warning
    module's name, so each module's ``forget`` resets only its own)."""
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"qcircuit: {message}", RuntimeWarning, stacklevel=stacklevel)


def forget_warnings(prefix: str) -> None:
    """Warn again about the keys that start with ``prefix``."""
    _warned.difference_update({w for w in _warned if w.startswith(prefix)})


def _is_choice(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("route"), str)


def _read(path: Path, valid: Callable[[object], bool] = _is_choice) -> dict[str, dict]:
    """The entries of a wisdom file; {} (with one warning) when it is corrupted."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        warn_once(f"wisdom:read {path}", f"wisdom file {path} unreadable ({exc}); ignored")
        return {}
    return _parse(text, str(path), valid)


def _parse(text: str, where: str, valid: Callable[[object], bool] = _is_choice) -> dict[str, dict]:
    try:
        data = json.loads(text)
        entries = data["entries"] if data.get("version") == VERSION else None
        if not isinstance(entries, dict) or not all(map(valid, entries.values())):
            raise ValueError("not a qcircuit wisdom file of version 1")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        warn_once(f"wisdom:parse {where}", f"wisdom in {where} is corrupted ({str(exc)[:80]}); ignored")
        return {}
    return entries


def lookup(k: str) -> dict | None:
    """The remembered entry for ``k`` (``{"route": name, "times": {route: seconds}}``), or None."""
    with _thread_lock:
        if k in _memory:
            return _memory[k]
        found = _read(cache_dir() / FILE).get(k)
        if found is not None:
            _memory[k] = found
        return found


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


@contextlib.contextmanager
def flock(path: Path, wait: float = math.inf) -> Iterator[bool]:
    """An exclusive ``fcntl`` lock on the file ``path`` (created if needed); yields whether
    it is held: False when the file cannot be opened or the lock was not had in ``wait`` s."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield False
        return
    try:
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


@contextlib.contextmanager
def _file_lock(directory: Path, wait: float) -> Iterator[bool]:
    """The wisdom directory's lock; yields False when it is not writable or the lock was
    not had within ``wait`` seconds."""
    if not _writable(directory):
        warn_once(f"wisdom:ro {directory}", f"wisdom directory {directory} is not writable; "
                  "measured choices are kept in memory only")
        yield False
        return
    with flock(directory / LOCK, wait) as held:
        yield held


@contextlib.contextmanager
def measuring(wait: float = LOCK_WAIT) -> Iterator[bool]:
    """Hold the cross-process lock while measuring; yields whether it is held (False: the
    directory is read-only or another process kept it too long)."""
    with _file_lock(cache_dir(), wait) as held:
        yield held


def _write(entries: dict[str, dict], name: str = FILE,
           valid: Callable[[object], bool] = _is_choice) -> None:
    """Merge ``entries`` into the file ``name``, atomically (the caller holds the lock)."""
    directory = cache_dir()
    path = directory / name
    merged = {**_read(path, valid), **entries}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".wisdom-", suffix=".json", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": VERSION, "entries": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warn_once(f"wisdom:write {directory}", f"cannot write wisdom to {directory} ({exc}); "
                   "kept in memory only")
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def record(k: str, entry: dict, locked: bool) -> None:
    """Remember ``entry`` under ``k`` in memory, and on disk when ``locked`` (the caller
    holds :func:`measuring`'s lock)."""
    with _thread_lock:
        _memory[k] = entry
    if locked:
        _write({k: entry})


def read_file(name: str, valid: Callable[[object], bool]) -> dict[str, dict]:
    """The entries of another file of the cache directory whose entries pass ``valid`` (the
    cost model's calibration, :mod:`calibrate`); {} with one warning when it is corrupted."""
    return _read(cache_dir() / name, valid)


def write_file(name: str, entries: dict[str, dict], valid: Callable[[object], bool]) -> None:
    """Merge ``entries`` into another file of the cache directory, atomically (the caller
    holds :func:`measuring`'s lock)."""
    _write(entries, name, valid)


def export_text() -> str:
    """Every entry on disk and in memory, as text for :func:`import_text`."""
    with _thread_lock:
        entries = {**_read(cache_dir() / FILE), **_memory}
    return json.dumps({"version": VERSION, "entries": entries}, indent=1, sort_keys=True)


def import_text(text: str) -> int:
    """Add the entries of exported wisdom (memory, and disk where writable); returns how many.
    Text that does not parse adds nothing (with a warning)."""
    entries = _parse(text, "imported text")
    with _thread_lock:
        _memory.update(entries)
    with _file_lock(cache_dir(), LOCK_WAIT) as held:
        if held and entries:
            _write(entries)
    return len(entries)


def forget() -> None:
    """Drop this process's in-memory wisdom (the file stays)."""
    with _thread_lock:
        _memory.clear()
        forget_warnings("wisdom:")
