"""``Program``: named circuits, the rules applying them to modules, and options."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from .errors import QCError, Span, quoted, with_article
from .limits import MAX_PATTERN_CHARS, SCALE_RANGE
from .regex_safety import regex_problem

if TYPE_CHECKING:
    from .ir import Circuit

#: option name -> default value; the parser and ``Program`` check keys against it.
#: ``init`` defaults to ``zero_last``, chosen by measurement (docs/choosing.md).
OPTION_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {"init": "zero_last", "scale": 1.0, "dropout": 0.0}
)
INIT_MODES = ("freeze_one", "zero_last")


def _unescape_slash(m: re.Match) -> str:
    return "/" if m.group(1) == "/" else m.group(0)


@dataclass(frozen=True)
class Pattern:
    """A module-name pattern: a suffix of dotted names (``q_proj``) or a ``/regex/``."""

    text: str
    regex: bool = False
    span: Span | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise QCError(f"a pattern must be a non-empty string, got {quoted(self.text)}", self.span)
        if len(self.text) > MAX_PATTERN_CHARS:
            raise QCError(f"a pattern has at most {MAX_PATTERN_CHARS} characters, got "
                          f"{len(self.text)}", self.span)
        if self.regex:
            breaks = [i for i, c in enumerate(self.text) if c in "\r\n"]
            if breaks:   # .qc text could not hold it: a program must print back to text
                raise QCError("a /regex/ cannot hold a line break (\\r or \\n)",
                              _shifted(self.span, 1 + breaks[0]),
                              expected="a pattern on one line")
            problem = regex_problem(self.text)
            if problem:
                why, offset = problem
                raise QCError(why, _shifted(self.span, 1 + offset),
                              expected="a regular expression without nested repetition")
            # '\/' and '/' mean the same: keep the plain '/' (canonical form)
            object.__setattr__(self, "text", re.sub(r"\\(.)", _unescape_slash, self.text,
                                                    flags=re.DOTALL))

    def matches(self, module_name: str) -> bool:
        if self.regex:
            return re.search(self.text, module_name) is not None
        return module_name == self.text or module_name.endswith("." + self.text)

    def __str__(self) -> str:
        return f"/{self.text}/" if self.regex else self.text


def _shifted(span: Span | None, by: int) -> Span | None:
    """``span`` moved ``by`` columns right (to point inside a token)."""
    return None if span is None else Span(span.file, span.line, span.column + by,
                                          span.source_line)


@dataclass(frozen=True)
class ApplyRule:
    """``apply CIRCUIT to PATTERN, … [with KEY = VALUE, …]``.

    ``options`` are this rule's own values (checked, normalised, read-only); a key it does
    not set falls back to the program's ``option`` and then to the default
    (``Program.options_for``)."""

    circuit: str
    patterns: tuple[Pattern, ...]
    span: Span | None = field(default=None, compare=False, repr=False)
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.circuit, str) or not _NAME.fullmatch(self.circuit):
            raise QCError(f"apply names a circuit by name, got {quoted(self.circuit)}", self.span)
        if not isinstance(self.patterns, tuple) or not self.patterns or \
                not all(isinstance(p, Pattern) for p in self.patterns):
            raise QCError("an apply rule takes a non-empty tuple of Patterns", self.span)
        if not isinstance(self.options, Mapping):
            raise QCError(f"an apply rule's options are a mapping, got {quoted(self.options)}",
                          self.span)
        checked = {k: check_option(k, v, self.span) for k, v in dict(self.options).items()}
        object.__setattr__(self, "options", MappingProxyType(checked))

    def __hash__(self) -> int:
        return hash((self.circuit, self.patterns, tuple(sorted(self.options.items()))))


def check_option(key: str, value: object, span: Span | None = None) -> object:
    """Validate one option; return its normalised value."""
    if key not in OPTION_DEFAULTS:
        raise QCError(f"unknown option {quoted(key)}", span, expected=" or ".join(OPTION_DEFAULTS))
    if key == "init":
        if value not in INIT_MODES:
            raise QCError(f"unknown init mode {quoted(value)}", span, expected=" or ".join(INIT_MODES))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QCError(f"option {key} takes a number, got {quoted(value)}", span)
    if key == "dropout" and not 0.0 <= value < 1.0:
        raise QCError(f"dropout must be in [0, 1), got {value}", span)
    low, high = SCALE_RANGE
    if key == "scale" and not low <= abs(value) <= high:
        raise QCError(f"scale must have a magnitude in [{low:g}, {high:g}], got {value:g}", span,
                      expected="a scale like 1.0, 2 or 0.5")
    return float(value)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,64}")  # as the grammar's PATH


def check_trained(patterns: object) -> tuple[Pattern, ...]:
    """A program's ``train`` patterns: a tuple of ``Pattern``s, each once."""
    if not isinstance(patterns, (tuple, list)) or \
            not all(isinstance(p, Pattern) for p in patterns):
        raise QCError("a program's trained modules are a tuple of Patterns")
    seen: dict[Pattern, Pattern] = {}
    for p in patterns:
        if p in seen:
            first = f" (first at {seen[p].span.at()})" if seen[p].span else ""
            raise QCError(f"module pattern {quoted(str(p))} is already trained{first}", p.span,
                          expected="each pattern once")
        seen[p] = p
    return tuple(patterns)


def as_pattern(pattern: object) -> Pattern:
    """A builder's pattern: a ``Pattern``, ``"/regex/"`` or a dotted suffix ``"q_proj"``."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str) and len(pattern) >= 2 and pattern[0] == pattern[-1] == "/":
        return Pattern(pattern[1:-1], regex=True)
    if isinstance(pattern, str) and _PATH.fullmatch(pattern):
        return Pattern(pattern)
    raise QCError(f"bad module pattern {quoted(pattern)}",
                  expected="a module-name suffix like 'q_proj' or 'self_attn.q_proj', "
                           "a '/regex/' or a Pattern")


@dataclass(frozen=True)
class Program:
    """Named circuits, the rules that apply them to modules, the modules trained whole
    beside them (``trained``: ``train`` statements, e.g. a task head) and options; also the
    builder (``Program().define("lora", c).apply("lora", "q_proj", scale=2)``), whose
    methods each return a new ``Program``."""

    circuits: Mapping[str, Circuit] = field(default_factory=dict)
    rules: tuple[ApplyRule, ...] = ()
    options: Mapping[str, object] = field(default_factory=dict)
    trained: tuple[Pattern, ...] = ()

    def __post_init__(self):
        from .ir import Circuit
        if not isinstance(self.circuits, Mapping) or not isinstance(self.options, Mapping) or \
                not isinstance(self.rules, (tuple, list)):
            raise QCError("Program takes a mapping of circuits, a tuple of rules and a mapping "
                          "of options")
        for name, circuit in self.circuits.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise QCError(f"bad circuit name {quoted(name)}", expected="a name like attn")
            if not isinstance(circuit, Circuit):
                raise QCError(f"circuit {quoted(name)} is "
                              f"{with_article(type(circuit).__name__)}, not a Circuit")
        for rule in self.rules:
            if not isinstance(rule, ApplyRule):
                raise QCError(f"a program's rules are ApplyRules, got {type(rule).__name__}")
            if rule.circuit not in self.circuits:
                raise QCError(f"apply names unknown circuit {quoted(rule.circuit)}", rule.span,
                              expected=" or ".join(self.circuits) or "a circuit defined in the program")
        options = {k: check_option(k, v) for k, v in self.options.items()}
        object.__setattr__(self, "trained", check_trained(self.trained))
        object.__setattr__(self, "circuits", MappingProxyType(dict(self.circuits)))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "options", MappingProxyType(options))

    def define(self, name: str, circuit: Circuit) -> "Program":
        """This program with one more circuit, ``name`` (a new name, as in text)."""
        from .ir import Circuit
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise QCError(f"bad circuit name {quoted(name)}", expected="a name like attn or lora")
        if name in self.circuits:
            raise QCError(f"circuit {quoted(name)} is already defined", expected="a new name")
        if not isinstance(circuit, Circuit):
            raise QCError(f"define({name!r}, …) takes a Circuit, got {type(circuit).__name__}")
        return replace(self, circuits={**self.circuits, name: circuit})

    def apply(self, circuit: str, *patterns: str | Pattern, **options: object) -> "Program":
        """This program with one more rule: ``apply CIRCUIT to PATTERN, … with KEY = VALUE, …``.
        Patterns are suffixes (``"q_proj"``), ``"/regex/"`` text or ``Pattern`` objects."""
        if circuit not in self.circuits:
            raise QCError(f"apply names unknown circuit {quoted(circuit)}",
                          expected=" or ".join(self.circuits) or "a circuit defined first")
        if not patterns:
            raise QCError(f"apply {circuit}: give at least one module pattern",
                          expected="a module-name suffix like 'q_proj' or a '/regex/'")
        rule = ApplyRule(circuit, tuple(as_pattern(p) for p in patterns), options=options)
        return replace(self, rules=self.rules + (rule,))

    def train(self, *patterns: str | Pattern) -> "Program":
        """This program with modules trained whole beside the circuits (``train PATTERN, …``):
        each module a pattern matches (a task head such as ``classifier``) trains, and is
        saved and restored with the adapter."""
        if not patterns:
            raise QCError("train: give at least one module pattern",
                          expected="a module-name suffix like 'classifier' or a '/regex/'")
        return replace(self, trained=self.trained + tuple(as_pattern(p) for p in patterns))

    def with_options(self, **options: object) -> "Program":
        """This program with program-wide options set (``option KEY = VALUE``)."""
        return replace(self, options={**self.options, **options})

    def option(self, key: str) -> object:
        """The program-wide option's value, or its default."""
        return self.options.get(key, OPTION_DEFAULTS[key])

    def options_for(self, rule: ApplyRule) -> dict[str, object]:
        """Every option as ``rule`` sees it: its own value, else the program's, else the
        default."""
        return {k: rule.options.get(k, self.option(k)) for k in OPTION_DEFAULTS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Program):
            return NotImplemented
        return (dict(self.circuits) == dict(other.circuits) and self.rules == other.rules
                and dict(self.options) == dict(other.options) and self.trained == other.trained)

    __hash__ = None  # type: ignore[assignment]

    def to_qc(self) -> str:
        from .printer import program_to_qc
        return program_to_qc(self)
