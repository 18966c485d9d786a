"""qcircuit: QuanTA adapters written as quantum-style circuits, compiled for PyTorch."""
from .errors import QCError, Span
from .ir import ApplyRule, Circuit, Gate, Pattern, Program, all_pairs_qudits, balanced_factors
from .parser import parse, parse_file
from .printer import circuit_summary

__version__ = "0.1.0"
__all__ = ["QCError", "Span", "Circuit", "Gate", "Program", "ApplyRule", "Pattern",
           "all_pairs_qudits", "balanced_factors", "parse", "parse_file", "circuit_summary",
           "__version__"]
