"""Writing a benchmark's table: whole or not at all (a temporary file beside it, renamed)."""
from __future__ import annotations

import os
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
