"""qcircuit: QuanTA adapters written as quantum-style circuits, compiled for PyTorch.

The names below are imported when first used (PEP 562): importing the package costs
nothing, so the ``qcompile`` command handles Ctrl-C from its first line.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {"QCError": "errors", "Span": "errors", "Circuit": "ir", "Gate": "ir", "Program": "ir",
         "ApplyRule": "ir", "Pattern": "ir", "all_pairs_qudits": "ir", "balanced_factors": "ir",
         "parse": "parser", "parse_file": "parser", "as_program": "parser", "circuit_summary": "printer"}

__all__ = ["QCError", "Span", "Circuit", "Gate", "Program", "ApplyRule", "Pattern",
           "all_pairs_qudits", "balanced_factors", "parse", "parse_file", "as_program",
           "circuit_summary",
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .errors import QCError, Span
    from .ir import ApplyRule, Circuit, Gate, Pattern, Program, all_pairs_qudits, balanced_factors
    from .parser import as_program, parse, parse_file
    from .printer import circuit_summary
