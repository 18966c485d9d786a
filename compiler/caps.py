"""Every size limit of the compiler in one place (the language's own are ``qcircuit/limits.py``).

Each is checked before the work it bounds and named in its error or warning, so a circuit or
cache file too large for a step is refused quickly instead of taking minutes and gigabytes.
"""
from __future__ import annotations

#: Qudits of a compiled circuit: every qudit is an einsum index, and torch.einsum has 52.
COMPILE_MAX_QUDITS = 48
#: Gates of a compiled circuit.
COMPILE_MAX_GATES = 1024
#: Parameters of one emitted module, all gates together.
MODULE_MAX_PARAMS = 1 << 26
#: Entries of one dense matrix ``T`` (out_features × in_features).
DENSE_MAX_NUMEL = 1 << 31
#: Gates above which only opt_einsum's path is planned (no schedule or light-cone search).
TUNE_MAX_GATES = 24
#: Activations (or dense matrices) larger than this are not timed: the cost model decides.
MEASURE_MAX_NUMEL = 1 << 24
#: Qudits of a circuit whose light cone is searched (the search enumerates row orders).
LIGHTCONE_MAX_QUDITS = 6
#: Largest side of the light cone's prefix matrix.
LIGHTCONE_MAX_PREFIX = 1024
#: Bytes of ``wisdom.json`` read at most, and its entries.
WISDOM_MAX_BYTES = 8 << 20
WISDOM_MAX_ENTRIES = 1 << 16
#: Bytes of ``machine.json`` (the cost model's calibration) read at most, and its entries.
CALIBRATION_MAX_BYTES = 1 << 20
CALIBRATION_MAX_ENTRIES = 1024
