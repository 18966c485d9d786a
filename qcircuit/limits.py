"""Every size limit of the language in one place.

Each is checked before the work it bounds (reading, expanding, factorising) and named in
its error message, so a hostile or mistaken program is refused quickly instead of taking
minutes and gigabytes. Real adapters sit far below all of them: the paper's LLaMA-2
configuration is 4 qudits and 6 gates per layer in a file of a few hundred bytes.
"""
from __future__ import annotations

#: One ``.qc`` text (a string, in characters; a file, in bytes).
MAX_TEXT_BYTES = 4 * 2**20
#: All text one program reads: the top-level text plus every include, each time expanded.
MAX_TOTAL_BYTES = 16 * 2**20
#: ``include`` statements expanded while reading one program (diamonds count every path).
MAX_INCLUDES = 1024
#: Includes nested in includes.
MAX_INCLUDE_DEPTH = 32

#: One dim of one qudit.
MAX_DIM = 2**20
#: Qudits of one circuit (``qudits d0 d1 …`` or ``qudits auto N``).
MAX_QUDITS = 64
#: Features of a layer a ``qudits auto`` circuit is bound to (factorising is trial division).
MAX_FEATURES = 2**32
#: Gates of one circuit after ``repeat`` and ``all_pairs`` are expanded.
MAX_GATES = 4096
#: Parameters of one circuit, all gates together (2**28 float32 values are 1 GiB).
MAX_PARAMS = 2**28
#: One ``repeat`` count (a body has at least one gate, so more could never fit MAX_GATES).
MAX_REPEAT = MAX_GATES
#: ``repeat`` blocks nested in one another.
MAX_REPEAT_DEPTH = 32

#: Characters of one module pattern (a name suffix; a module name is at most this long).
MAX_PATTERN_CHARS = 1000
#: Characters of one ``/regex/`` (see ``regex_safety.py`` for the subset accepted).
MAX_REGEX_CHARS = 256
#: Repeating quantifiers (``*``, ``+``, ``{m,n}``) in one ``/regex/``.
MAX_REGEX_REPEATS = 3

#: ``option scale``: its magnitude must lie in this range (negative scales are allowed).
SCALE_RANGE = (1e-6, 1e4)

__all__ = ["MAX_TEXT_BYTES", "MAX_TOTAL_BYTES", "MAX_INCLUDES", "MAX_INCLUDE_DEPTH", "MAX_DIM",
           "MAX_QUDITS", "MAX_FEATURES", "MAX_GATES", "MAX_PARAMS", "MAX_REPEAT",
           "MAX_REPEAT_DEPTH", "MAX_PATTERN_CHARS", "MAX_REGEX_CHARS", "MAX_REGEX_REPEATS", "SCALE_RANGE"]
