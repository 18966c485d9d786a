"""Text -> AST: the lark grammar (``qc.lark``), a Transformer building frozen AST nodes,
and lark's syntax errors turned into ``QCError`` with a location and a readable
"expected …". Meaning (ranges, dims, names) is checked later, in ``parser.py``."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from .errors import QCError, Span, quoted


@dataclass(frozen=True, slots=True)
class Tok:
    """One token as written, and where."""

    text: str
    span: Span


@dataclass(frozen=True)
class QuditsFixed:
    ins: tuple[Tok, ...]
    outs: tuple[Tok, ...] | None
    span: Span


@dataclass(frozen=True)
class QuditsAuto:
    count: Tok
    span: Span


@dataclass(frozen=True)
class GateNode:
    qudits: tuple[Tok, ...]
    ins: Tok | None  # dims token as written (``16x16``), or None
    outs: Tok | None
    span: Span


@dataclass(frozen=True)
class AllPairsNode:
    span: Span


@dataclass(frozen=True)
class RepeatNode:
    count: Tok
    body: tuple
    span: Span


@dataclass(frozen=True)
class CircuitNode:
    name: Tok
    qudits: QuditsFixed | QuditsAuto
    body: tuple
    span: Span


@dataclass(frozen=True)
class ApplyNode:
    name: Tok
    patterns: tuple[Tok, ...]  # PATH text, or REGEX text with its slashes
    span: Span


@dataclass(frozen=True)
class OptionNode:
    key: Tok
    value: Tok
    numeric: bool
    span: Span


@dataclass(frozen=True)
class IncludeNode:
    path: Tok  # without the quotes
    span: Span


@lru_cache(maxsize=1)
def grammar() -> Lark:
    """The LALR parser for ``qc.lark`` (built once)."""
    text = files("qcircuit").joinpath("qc.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", lexer="contextual", propagate_positions=True)


class _Builder(Transformer_NonRecursive):
    """Parse tree -> AST nodes; every node keeps the span of its first token."""

    def __init__(self, lines: list[str], file: str | None):
        super().__init__()
        self.lines, self.file = lines, file

    def span(self, line: int, column: int) -> Span:
        source = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Span(self.file, line, column, source)  # shared with every token on the line

    def tok(self, t: Token, strip: int = 0) -> Tok:
        return Tok(t.value[strip:len(t.value) - strip], self.span(t.line, t.column))

    def meta(self, meta) -> Span:
        return self.span(meta.line, meta.column)

    def start(self, items):
        return tuple(items)

    @v_args(meta=True)
    def circuit(self, meta, children):
        name, qudits, *body = children
        return CircuitNode(self.tok(name), qudits, tuple(body), self.meta(meta))

    @v_args(meta=True)
    def qudits_fixed(self, meta, children):
        return QuditsFixed(children[0], children[1] if len(children) > 1 else None,
                           self.meta(meta))

    def wires(self, children):
        return tuple(self.tok(t) for t in children)

    @v_args(meta=True)
    def qudits_auto(self, meta, children):
        return QuditsAuto(self.tok(children[1]), self.meta(meta))

    @v_args(meta=True)
    def gate(self, meta, children):
        keyword, *rest = children
        dims = rest[-1] if rest and isinstance(rest[-1], tuple) else (None, None)
        qudits = [t for t in rest if isinstance(t, Token)]
        return GateNode(tuple(self.tok(t) for t in qudits), dims[0], dims[1], self.meta(meta))

    def dims_in(self, children):
        ins = self.tok(children[0])
        return (ins, self.tok(children[1]) if len(children) > 1 else None)

    def dims_out(self, children):
        return (None, self.tok(children[0]))

    @v_args(meta=True)
    def all_pairs(self, meta, children):
        return AllPairsNode(self.meta(meta))

    @v_args(meta=True)
    def repeat(self, meta, children):
        _, count, *body = children
        return RepeatNode(self.tok(count), tuple(body), self.meta(meta))

    @v_args(meta=True)
    def apply(self, meta, children):
        _, name, *patterns = children
        return ApplyNode(self.tok(name), tuple(patterns), self.tok(name).span)

    def pattern(self, children):
        return self.tok(children[0])

    @v_args(meta=True)
    def option(self, meta, children):
        _, key, value = children
        return OptionNode(self.tok(key), self.tok(value), value.type == "NUMBER", self.meta(meta))

    @v_args(meta=True)
    def include(self, meta, children):
        return IncludeNode(self.tok(children[1], strip=1), self.meta(meta))


# Human names for the grammar's terminals, in the order they are listed in messages.
_HUMAN = {
    "INT": "an integer", "DIMS": "dims like 16 or 16x16", "NAME": "a name",
    "PATH": "a module name like q_proj", "REGEX": "a /regex/", "NUMBER": "a number",
    "STRING": 'a "file name"', "$END": "end of file",
}


def _human(names) -> str:
    terms = {t.name: t for t in grammar().terminals}
    names = set(names) - {"NOT_INT"}
    if "DIMS" in names:
        names.discard("INT")
    words = []
    for name in names:
        if name in _HUMAN:
            words.append(_HUMAN[name])
        elif name in terms and isinstance(terms[name].pattern, PatternStr):
            words.append(f"'{terms[name].pattern.value}'")
        else:
            words.append(name.lower())
    order = list(_HUMAN.values())
    words = sorted(set(words), key=lambda w: (order.index(w) if w in order else -1, w))
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character."""
    pos = len(text.rstrip())
    start = text.rfind("\n", 0, pos) + 1
    return text.count("\n", 0, pos) + 1, pos - start + 1


def source_lines(text: str) -> list[str]:
    """The text's lines without their ``\n`` or ``\r\n``: one copy of each line, made once,
    which every span on that line shares (a copy per token is quadratic on a long line)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def syntax_error(err: UnexpectedInput, text: str, file: str | None) -> QCError:
    """lark's error -> ``QCError`` saying, in words, what was expected where."""
    lines = source_lines(text)
    if isinstance(err, UnexpectedCharacters):
        line, column = err.line, err.column
        char = text[err.pos_in_stream] if 0 <= err.pos_in_stream < len(text) else ""
        message, expected = f"unexpected character {quoted(char)}", _human(err.allowed or ())
    elif isinstance(err, UnexpectedToken) and err.token.type != "$END":
        line, column = err.token.line, err.token.column
        message, expected = f"unexpected {quoted(err.token.value)}", _human(err.accepts or err.expected)
    else:  # UnexpectedEOF, or UnexpectedToken at $END
        line, column = _end_position(text)
        names = getattr(err, "accepts", None) or getattr(err, "expected", None) or ()
        message, expected = "unexpected end of file", _human(names)
    if not isinstance(line, int) or line < 1:
        line, column = _end_position(text)
    source = lines[line - 1] if line <= len(lines) else ""
    return QCError(message, Span(file, line, max(int(column or 1), 1), source), expected=expected)


def parse_ast(text: str, file: str | None = None) -> tuple:
    """Parse ``.qc`` text into a tuple of top-level AST nodes; syntax errors -> QCError."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
    try:
        tree = grammar().parse(text)
    except UnexpectedInput as err:
        raise syntax_error(err, text, file) from None
    return _Builder(source_lines(text), file).transform(tree)
