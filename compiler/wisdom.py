"""Wisdom: measured route choices remembered on disk, like FFTW's.

A :class:`WisdomStore` maps a key naming everything that changes the winner (built by
:mod:`tuning`: circuit signature, kind, token bucket, device and its model, dtype, thread
count, kernel switches, torch version) to an :class:`Entry`: the winning route and the times
measured. It keeps what it read, measured or imported in memory and one JSON file,
``wisdom.json``, in its directory (:mod:`cachefiles`: atomic writes under the directory's lock).
The same lock serialises measurement (:meth:`WisdomStore.measuring`): one process measures,
the others wait for it and then read its result — measuring on a CPU that other processes
are also measuring on would only time the contention.

The file is untrusted: it is read only when it changed since the last read (its inode, size
and mtime), only up to ``WISDOM_MAX_BYTES``, and every entry is checked (:func:`parse_entry`);
a file or entry that fails is ignored with one warning, so its choices are measured again and
the next write replaces it. A directory that cannot be written keeps wisdom in memory only.
:meth:`export_text` / :meth:`import_text` carry wisdom between machines' caches.
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from . import cachefiles
from .caps import WISDOM_MAX_BYTES, WISDOM_MAX_ENTRIES

FILE = "wisdom.json"
VERSION = 1
MAX_NAME = 64      # characters of a route name


@dataclass(frozen=True)
class Entry:
    """A remembered choice: the winning route and the seconds measured per candidate."""

    route: str
    times: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"route": self.route, "times": dict(self.times)}


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def parse_entry(value: object) -> Entry | None:
    """``value`` as an :class:`Entry` when it is one (a route name, and times that are
    finite non-negative seconds keyed by route names), else None."""
    if not isinstance(value, dict) or set(value) - {"route", "times"} or not _name(value.get("route")):
        return None
    times = value.get("times", {})
    if not isinstance(times, dict) or len(times) > MAX_NAME:
        return None
    for name, t in times.items():
        if not _name(name) or isinstance(t, bool) or not isinstance(t, (int, float)) \
                or not math.isfinite(t) or t < 0:
            return None
    return Entry(value["route"], {n: float(t) for n, t in times.items()})


def parse_text(text: str | bytes, where: str) -> dict[str, Entry]:
    """The entries of wisdom text: {} with one warning when the text is not wisdom of this
    version; entries that are not well-formed are dropped, with one warning."""
    try:
        data = json.loads(text)
        entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION \
            else None
        if not isinstance(entries, dict) or len(entries) > WISDOM_MAX_ENTRIES:
            raise ValueError(f"not qcircuit wisdom of version {VERSION}")
    except (ValueError, RecursionError) as exc:
        cachefiles.warn_once(f"wisdom:parse {where}", f"wisdom in {where} is not usable "
                             f"({str(exc)[:80]}); ignored, its choices are measured again", 5)
        return {}
    good = {k: e for k, e in ((k, parse_entry(v)) for k, v in entries.items())
            if isinstance(k, str) and e is not None}
    if len(good) < len(entries):
        cachefiles.warn_once(f"wisdom:entries {where}", f"{len(entries) - len(good)} malformed "
                             f"wisdom entries in {where} ignored; measured again", 5)
    return good


class WisdomStore:
    """Route choices in memory, backed by ``wisdom.json`` in ``directory`` (None: memory only)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self._memory: dict[str, Entry] = {}
        self._file: dict[str, Entry] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / FILE

    def _read_file(self) -> dict[str, Entry]:
        """The file's entries, read again only when the file changed (caller holds _lock)."""
        path = self.path
        if path is None:
            return {}
        now = cachefiles.stamp(path)
        if now == self._stamp:
            return self._file
        try:
            data = cachefiles.read_bytes(path, WISDOM_MAX_BYTES)
            self._file = parse_text(data, str(path))
        except FileNotFoundError:
            self._file = {}
        except cachefiles.CacheFileError as exc:
            cachefiles.warn_once(f"wisdom:read {path}", f"wisdom file {path} ignored ({exc}); "
                                 "its choices are measured again", 5)
            self._file = {}
        self._stamp = now
        return self._file

    def lookup(self, key: str) -> Entry | None:
        """The remembered entry for ``key``, from memory or the file, or None."""
        with self._lock:
            found = self._memory.get(key)
            if found is None:
                found = self._read_file().get(key)
                if found is not None:
                    self._memory[key] = found
            return found

    @contextlib.contextmanager
    def measuring(self) -> Iterator[bool]:
        """Hold the directory's cross-process lock while measuring
        (:func:`cachefiles.measuring`); yields whether it is held (False: memory only)."""
        if self.directory is None:
            yield False
            return
        with cachefiles.measuring(self.directory) as held:
            yield held

    def record(self, key: str, entry: Entry, locked: bool) -> None:
        """Remember ``entry`` in memory, and in the file when ``locked`` (the caller holds
        :meth:`measuring`'s lock)."""
        with self._lock:
            self._memory[key] = entry
        if locked:
            self._write({key: entry})

    def _write(self, entries: dict[str, Entry]) -> None:
        path = self.path
        with self._lock:
            merged = {**self._read_file(), **entries}
        try:
            cachefiles.write_json(path, {"version": VERSION,
                                         "entries": {k: e.to_json() for k, e in merged.items()}})
        except OSError as exc:
            cachefiles.warn_once(f"wisdom:write {self.directory}", f"cannot write wisdom to "
                                 f"{self.directory} ({exc}); kept in memory only")

    def export_text(self) -> str:
        """Every entry in the file and in memory, as text for :meth:`import_text`."""
        with self._lock:
            entries = {**self._read_file(), **self._memory}
        return json.dumps({"version": VERSION, "entries": {k: e.to_json() for k, e in
                                                           entries.items()}},
                          indent=1, sort_keys=True)

    def import_text(self, text: str) -> int:
        """Add the entries of exported wisdom (memory, and the file where writable); returns
        how many. Text that is not wisdom adds nothing (with a warning)."""
        entries = parse_text(text, "imported text")
        with self._lock:
            self._memory.update(entries)
        with self.measuring() as held:
            if held and entries:
                self._write(entries)
        return len(entries)

    def forget(self) -> None:
        """Drop what this store holds in memory (the file stays)."""
        with self._lock:
            self._memory.clear()
            self._file, self._stamp = {}, None
