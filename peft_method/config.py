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
import re
from dataclasses import InitVar, dataclass, field, fields, replace
from typing import Optional, Sequence, Union

from peft import PeftConfig

from qcircuit import Program, QCError
from qcircuit import as_program as to_program
from qcircuit.regex_safety import regex_problem
from qcircuit.runtime.record import AdapterRecord
from qcircuit.runtime.record import from_json as record_from_json

#: The ``peft_type`` string. PEFT's maps are keyed by ``PeftType`` members, which are
#: ``str`` subclasses equal to their value, so this string is a key among theirs.
PEFT_TYPE_NAME = "QUANTA"
#: Fields of a saved config that make up its record (besides ``program`` and ``options``).
RECORD_FIELDS = ("format", "format_version", "qcircuit_version", "model", "layers", "modules",
                 "tensors")


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


#: Fields of LoRA's config a LoRA user may reach for, and what a QuanTA adapter does instead.
LORA_FIELDS = {
    "r": "a QuanTA adapter's size is its circuits (qudits, gates): write it in the program",
    "lora_alpha": "the program's option scale multiplies the update",
    "lora_dropout": "the program's option dropout",
    "init_lora_weights": "the program's option init (freeze_one or zero_last)",
    "layers_to_transform": "the program's apply patterns (a /regex/ names layers by index)",
    "layers_pattern": "the program's apply patterns",
    "exclude_modules": "the program's apply patterns",
}


@dataclass
class QuanTAConfig(PeftConfig):
    """PEFT config of a QuanTA (qcircuit) adapter.

    ``program``: a ``.qc`` path, ``.qc`` text or a ``Program``; it is stored as ``.qc`` text.
    ``options``: overrides of the program's options (``init``, ``scale``, ``dropout``).
    ``seed``: seeds the gate initialisation (the same gates as ``attach(..., seed=seed)``).
    ``target_modules``: optional, as for LoRA; it must name exactly the layers the program
    adapts (PEFT's matching rule), else the adapter is refused: the program decides.
    ``modules_to_save``: modules trained whole and saved with the adapter, resolved as
    PEFT resolves them for LoRA (``task_type`` adds the task's head: ``classifier``,
    ``score`` for ``SEQ_CLS``); the program's ``train`` statements add to them.
    ``record``: the adapter as saved or to be saved (see the module doc); None until the
    adapter is injected. A field given a value QuanTA does not honour, or a LoRA field
    (``r``, ``lora_alpha``, …), is refused with a ``QCError`` naming it.
    """

    program: Optional[str] = field(default=None, metadata={"help": ".qc path or .qc text"})
    options: Optional[dict] = field(default=None, metadata={"help": "init, scale, dropout"})
    seed: Optional[int] = field(default=None, metadata={"help": "gate initialisation seed"})
    target_modules: Optional[Union[list, str]] = field(
        default=None, metadata={"help": "the adapted layers, if given: must agree with the program"})
    modules_to_save: Optional[list] = field(
        default=None, metadata={"help": "modules trained whole and saved (a task head)"})
    # a saved checkpoint's fields, as PEFT passes them from adapter_config.json: the record
    format: InitVar[object] = None
    format_version: InitVar[object] = None
    qcircuit_version: InitVar[object] = None
    model: InitVar[object] = None
    layers: InitVar[object] = None
    modules: InitVar[object] = None
    tensors: InitVar[object] = None

    def __new__(cls, *args, **kwargs):
        known = {f.name for f in fields(cls)} | set(RECORD_FIELDS)
        for name in kwargs:
            if name not in known:
                hint = LORA_FIELDS.get(name, "see QuanTAConfig's fields")
                raise QCError(f"QuanTAConfig has no field {name!r}: {hint}")
        return super().__new__(cls)

    def __post_init__(self, *saved: object):
        if self.peft_type not in (None, PEFT_TYPE_NAME):
            raise QCError(f"QuanTAConfig(peft_type={self.peft_type!r}): a QuanTA config's "
                          f"peft_type is {PEFT_TYPE_NAME!r}")
        _check_names("target_modules", self.target_modules, allow_text=True)
        _check_names("modules_to_save", self.modules_to_save, allow_text=False)
        try:
            super().__post_init__()   # PEFT's own checks (task_type)
        except ValueError as e:
            raise QCError(f"QuanTAConfig: {e}") from None
        self.peft_type = QUANTA
        self.record: AdapterRecord | None = None
        if any(value is not None for value in saved):   # read from a checkpoint's config
            config = {k: v for k, v in zip(RECORD_FIELDS, saved) if k != "modules" or v is not None}
            config.update(program=self.program, options=self.options, peft_type=PEFT_TYPE_NAME)
            self.record = record_from_json(config, "adapter_config.json (QuanTAConfig)")
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


def _check_names(field_name: str, value: object, allow_text: bool) -> None:
    """None, a list of module names, or (``allow_text``) one regex, as PEFT takes them; a
    regex must be one qcircuit's patterns allow (no nested repetition: a saved config is
    untrusted)."""
    if value is None:
        return
    if allow_text and isinstance(value, str):
        problem = regex_problem(value)
        if problem:
            raise QCError(f"QuanTAConfig({field_name}={value!r}): {problem[0]}")
        return
    if not isinstance(value, (list, tuple, set)) or \
            not all(isinstance(v, str) and v for v in value):
        kind = "a list of module names or a regex" if allow_text else "a list of module names"
        raise QCError(f"QuanTAConfig({field_name}=...) takes {kind}, got {value!r:.80}")


def check_target_modules(target_modules: list | str | None, names: Sequence[str],
                         adapted: set[str]) -> None:
    """``target_modules``, where given, must select (PEFT's rule for LoRA: a regex
    matching the whole name, or names and dotted suffixes) exactly the layers the program
    adapts (``names``: every module name of the model); it never restricts or extends
    the program."""
    if target_modules is None:
        return
    if isinstance(target_modules, str):
        chosen = {n for n in names if re.fullmatch(target_modules, n)}
    else:
        chosen = {n for n in names if n in target_modules
                  or any(n.endswith(f".{t}") for t in target_modules)}
    if chosen != adapted:
        extra, missing = sorted(chosen - adapted), sorted(adapted - chosen)
        parts = ([f"it names {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}, which the "
                  "program does not adapt"] if extra else []) + \
                ([f"it leaves out {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}, "
                  "which the program adapts"] if missing else [])
        raise QCError(f"QuanTAConfig(target_modules={target_modules!r:.80}) disagrees with the "
                      f"program: {'; '.join(parts)}. The program's apply rules say which layers "
                      "are adapted: drop target_modules, or make it name exactly those layers")
