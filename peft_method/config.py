"""``QuanTAConfig``: a PEFT config whose fields are a qcircuit adapter config.

The JSON PEFT writes (``adapter_config.json``) is a superset of the native one
(``runtime/checkpoint.py``): ``format``, ``program`` (``Program.to_qc()``), ``options``,
``model`` and ``layers`` are filled in when the adapter is injected, so
``qcircuit.runtime.load`` reads a directory written by ``save_pretrained``, and PEFT reads
one written by ``Adapted.save()`` once that file carries ``peft_type``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from peft import PeftConfig

import qcircuit
from qcircuit import Program, QCError, parse, parse_file
from qcircuit.runtime.checkpoint import FORMAT, FORMAT_VERSION  # one format, both doors
from qcircuit.runtime.checkpoint_schema import upgrade

#: The ``peft_type`` string. PEFT's maps are keyed by ``PeftType`` members, which are
#: ``str`` subclasses equal to their value, so this string is a key among theirs.
PEFT_TYPE_NAME = "QUANTA"


class QuanTAType(str):
    """``"QUANTA"`` with the ``.value`` that PEFT and transformers read off ``PeftType``."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:  # like a PeftType member's str(), which PEFT's status reads
        return f"{type(self).__name__}.{self.value}"


QUANTA = QuanTAType(PEFT_TYPE_NAME)


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (text.endswith(".qc") or os.path.isfile(text))


def as_program(program: str | os.PathLike | Program, options: dict | None = None) -> Program:
    """A ``Program`` from a ``.qc`` path, ``.qc`` text or a ``Program``; ``options`` (keys as
    in ``.qc``: init, scale, dropout) override the program's own."""
    if isinstance(program, Program):
        prog = program
    elif isinstance(program, os.PathLike) or (isinstance(program, str) and _looks_like_path(program)):
        prog = parse_file(os.fspath(program))
    elif isinstance(program, str):
        prog = parse(program)
    else:
        raise QCError(f"QuanTAConfig(program=...) takes a .qc path, .qc text or a Program, "
                      f"got {type(program).__name__}")
    if options:
        if not isinstance(options, dict):
            raise QCError(f"QuanTAConfig(options=...) takes a dict, got {type(options).__name__}")
        prog = Program(prog.circuits, prog.rules, {**dict(prog.options), **options})
    return prog


@dataclass
class QuanTAConfig(PeftConfig):
    """PEFT config of a QuanTA (qcircuit) adapter.

    ``program``: a ``.qc`` path, ``.qc`` text or a ``Program``; it is stored as ``.qc`` text.
    ``options``: overrides of the program's options (``init``, ``scale``, ``dropout``).
    ``seed``: seeds the gate initialisation (the same gates as ``attach(..., seed=seed)``).
    ``model``, ``layers``, ``target_modules``: filled in when the adapter is injected.
    """

    program: Optional[str] = field(default=None, metadata={"help": ".qc path or .qc text"})
    options: Optional[dict] = field(default=None, metadata={"help": "init, scale, dropout"})
    seed: Optional[int] = field(default=None, metadata={"help": "gate initialisation seed"})
    format: str = field(default=FORMAT, metadata={"help": "qcircuit checkpoint format"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "of the format"})
    tensors: Optional[dict] = field(default=None, metadata={
        "help": "dtype, shape and sha256 of each saved tensor (filled in at save)"})
    qcircuit_version: Optional[str] = field(default=None)
    model: Optional[dict] = field(default=None, metadata={"help": "base model identity"})
    layers: Optional[dict] = field(default=None, metadata={"help": "adapted modules"})
    target_modules: Optional[list] = field(default=None, metadata={"help": "adapted modules"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = QUANTA
        if self.program is None:
            raise QCError("QuanTAConfig needs program= (a .qc path or .qc text)")
        if self.format != FORMAT:
            raise QCError(f"not a qcircuit adapter config: format {self.format!r}, "
                          f"expected {FORMAT!r}")
        prog = as_program(self.program, self.options)
        self.program = prog.to_qc()
        self.options = {k: prog.option(k) for k in ("init", "scale", "dropout")}
        if self.format_version == 2 and self.layers is not None:   # written by qcircuit 0.2
            old = {"format_version": 2, "layers": self.layers, "options": self.options}
            self.format_version, self.layers = FORMAT_VERSION, upgrade(old)["layers"]
        if self.qcircuit_version is None:
            self.qcircuit_version = qcircuit.__version__

    def to_program(self) -> Program:
        """The program with this config's options."""
        return as_program(self.program, self.options)
