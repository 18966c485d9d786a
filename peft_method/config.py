"""``QuanTAConfig``: a PEFT config that carries a qcircuit adapter record.

A new adapter is described by ``program`` (a ``.qc`` path, ``.qc`` text or a
``Program``), ``options`` (overrides of the program's options) and ``seed``; its
``record`` (``qcircuit.runtime.record.AdapterRecord``) is made when the adapter is
injected and gains its tensor records when it is saved. A config that PEFT reads from
``adapter_config.json`` arrives with the record's fields (``format``, ``format_version``,
``qcircuit_version``, ``model``, ``layers``, ``tensors``, the program *text* and its
``options``): they are not kept as fields but turned into the record by the one validator
native ``load`` uses (``record.from_json``), so the program is parsed as text with
includes off, and the options, layers and tensors must agree with it exactly as there.
``to_dict`` (what PEFT writes) is PEFT's bookkeeping plus ``record.to_json()``: one format
for both doors.
"""
from __future__ import annotations

import os
from dataclasses import InitVar, dataclass, field, fields, replace
from typing import Optional

from peft import PeftConfig

from qcircuit import Program, QCError
from qcircuit import as_program as to_program
from qcircuit.runtime.record import AdapterRecord
from qcircuit.runtime.record import from_json as record_from_json

#: The ``peft_type`` string. PEFT's maps are keyed by ``PeftType`` members, which are
#: ``str`` subclasses equal to their value, so this string is a key among theirs.
PEFT_TYPE_NAME = "QUANTA"
#: Fields of a saved config that make up its record (besides ``program`` and ``options``).
RECORD_FIELDS = ("format", "format_version", "qcircuit_version", "model", "layers", "tensors")


class QuanTAType(str):
    """``"QUANTA"`` with the ``.value`` that PEFT and transformers read off ``PeftType``."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:  # like a PeftType member's str(), which PEFT's status reads
        return f"{type(self).__name__}.{self.value}"


QUANTA = QuanTAType(PEFT_TYPE_NAME)


def as_program(program: str | os.PathLike | Program, options: dict | None = None) -> Program:
    """A ``Program`` from a ``.qc`` path, ``.qc`` text or a ``Program`` (``qcircuit.as_program``:
    ``attach``'s rule); ``options`` (init, scale, dropout) override its own."""
    prog = to_program(program, "QuanTAConfig(program=...)")
    if options:
        if not isinstance(options, dict):
            raise QCError(f"QuanTAConfig(options=...) takes a dict, got {type(options).__name__}")
        prog = replace(prog, options={**dict(prog.options), **options})
    return prog


@dataclass
class QuanTAConfig(PeftConfig):
    """PEFT config of a QuanTA (qcircuit) adapter.

    ``program``: a ``.qc`` path, ``.qc`` text or a ``Program``; it is stored as ``.qc`` text.
    ``options``: overrides of the program's options (``init``, ``scale``, ``dropout``).
    ``seed``: seeds the gate initialisation (the same gates as ``attach(..., seed=seed)``).
    ``record``: the adapter as saved or to be saved (see the module doc); None until the
    adapter is injected. ``target_modules``: filled in when the adapter is injected.
    """

    program: Optional[str] = field(default=None, metadata={"help": ".qc path or .qc text"})
    options: Optional[dict] = field(default=None, metadata={"help": "init, scale, dropout"})
    seed: Optional[int] = field(default=None, metadata={"help": "gate initialisation seed"})
    target_modules: Optional[list] = field(default=None, metadata={"help": "adapted modules"})
    # a saved checkpoint's fields, as PEFT passes them from adapter_config.json: the record
    format: InitVar[object] = None
    format_version: InitVar[object] = None
    qcircuit_version: InitVar[object] = None
    model: InitVar[object] = None
    layers: InitVar[object] = None
    tensors: InitVar[object] = None

    def __post_init__(self, *saved: object):
        super().__post_init__()
        self.peft_type = QUANTA
        self.record: AdapterRecord | None = None
        if any(value is not None for value in saved):   # read from a checkpoint's config
            config = {**dict(zip(RECORD_FIELDS, saved)), "program": self.program,
                      "options": self.options, "peft_type": PEFT_TYPE_NAME}
            self.record = record_from_json(config, "adapter_config.json (QuanTAConfig)")
            self.target_modules = list(self.record.layers)
            prog = self.record.program
        elif self.program is None:
            raise QCError("QuanTAConfig needs program= (a .qc path or .qc text)")
        else:
            prog = as_program(self.program, self.options)
        self.program = prog.to_qc()
        self.options = {k: prog.option(k) for k in ("init", "scale", "dropout")}

    def to_program(self) -> Program:
        """The program with this config's options."""
        return self.record.program if self.record is not None else \
            as_program(self.program, self.options)

    def to_dict(self) -> dict:
        """What PEFT writes: its own fields, then the record (``record.to_json()``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["peft_type"] = PEFT_TYPE_NAME
        if self.record is not None:
            out.update(self.record.to_json())
        return out
