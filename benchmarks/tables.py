"""What every benchmark table needs: the CPU's name for its header, and writing it whole or
not at all (a temporary file beside it, renamed)."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path


def write_table(path: str | Path, text: str) -> None:
    """``text`` into ``path``; an interrupted run leaves the previous table as it was."""
    path = Path(path).resolve()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` says)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
