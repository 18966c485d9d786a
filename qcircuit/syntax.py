"""Text -> AST: the lark grammar (``qc.lark``), a Transformer building frozen AST nodes,
and lark's syntax errors turned into ``QCError`` with a location and a readable
"expected …". Meaning (ranges, dims, names) is checked later, in ``parser.py``."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from lark import Lark, Token, Transformer
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
class LowRankNode:
    rank: Tok
    span: Span


@dataclass(frozen=True)
class CircuitNode:
    name: Tok
    qudits: QuditsFixed | QuditsAuto | LowRankNode  # a bare ``low_rank R`` has no qudits line
    body: tuple
    span: Span


@dataclass(frozen=True)
class OptionNode:
    """``option KEY = VALUE``, or one ``KEY = VALUE`` of an apply rule's ``with``."""

    key: Tok
    value: Tok
    numeric: bool
    span: Span


@dataclass(frozen=True)
class ApplyNode:
    name: Tok
    patterns: tuple[Tok, ...]  # PATH text, or REGEX text with its slashes
    span: Span
    options: tuple[OptionNode, ...] = ()  # after ``with``, as written


@dataclass(frozen=True)
class TrainNode:
    """``train PATTERN, …``: modules trained whole beside the circuits."""

    patterns: tuple[Tok, ...]  # as ApplyNode's
    span: Span


@dataclass(frozen=True)
class IncludeNode:
    path: Tok  # without the quotes
    span: Span


#: The lines and file name of the text being parsed, for the builder's spans.
_SOURCE: ContextVar[tuple[list[str], str | None]] = ContextVar("qc_source")


class _Builder(Transformer):
    """Grammar rules -> AST nodes, run by the LALR parser as it reduces (no parse tree is
    built). Every node keeps the span of its first token."""

    def tok(self, t: Token, strip: int = 0) -> Tok:
        lines, file = _SOURCE.get()
        source = lines[t.line - 1] if 0 < t.line <= len(lines) else ""
        # ``source`` is shared by every token on its line: no copy per token
        return Tok(t.value[strip:len(t.value) - strip], Span(file, t.line, t.column, source))

    def start(self, items):
        return tuple(items)

    def circuit(self, children):
        keyword, name, qudits, *body = children
        return CircuitNode(self.tok(name), qudits, tuple(body), self.tok(keyword).span)

    def qudits_fixed(self, children):
        keyword, ins, *outs = children
        return QuditsFixed(ins, outs[0] if outs else None, self.tok(keyword).span)

    def wires(self, children):
        return tuple(self.tok(t) for t in children)

    def qudits_auto(self, children):
        return QuditsAuto(self.tok(children[2]), self.tok(children[0]).span)

    def gate(self, children):
        keyword, *rest = children
        dims = rest[-1] if rest and isinstance(rest[-1], tuple) else (None, None)
        qudits = [t for t in rest if isinstance(t, Token)]
        return GateNode(tuple(self.tok(t) for t in qudits), dims[0], dims[1],
                        self.tok(keyword).span)

    def dims_in(self, children):
        ins = self.tok(children[0])
        return (ins, self.tok(children[1]) if len(children) > 1 else None)

    def dims_out(self, children):
        return (None, self.tok(children[0]))

    def all_pairs(self, children):
        return AllPairsNode(self.tok(children[0]).span)

    def repeat(self, children):
        keyword, count, *body = children
        return RepeatNode(self.tok(count), tuple(body), self.tok(keyword).span)

    def low_rank(self, children):
        keyword, rank = children
        return LowRankNode(self.tok(rank), self.tok(keyword).span)

    def apply(self, children):
        _, name, *rest = children
        name = self.tok(name)
        patterns = tuple(c for c in rest if isinstance(c, Tok))
        options = tuple(c for c in rest if isinstance(c, OptionNode))
        return ApplyNode(name, patterns, name.span, options)

    def setting(self, children):
        key, value = children
        key = self.tok(key)
        return OptionNode(key, self.tok(value), value.type == "NUMBER", key.span)

    def train(self, children):
        keyword, *patterns = children
        return TrainNode(tuple(patterns), self.tok(keyword).span)

    def pattern(self, children):
        return self.tok(children[0])

    def option(self, children):
        keyword, key, value = children
        return OptionNode(self.tok(key), self.tok(value), value.type == "NUMBER",
                          self.tok(keyword).span)

    def include(self, children):
        return IncludeNode(self.tok(children[1], strip=1), self.tok(children[0]).span)


@lru_cache(maxsize=1)
def grammar() -> Lark:
    """The LALR parser for ``qc.lark`` with the AST builder inside it (built once)."""
    text = files("qcircuit").joinpath("qc.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", lexer="contextual", transformer=_Builder())


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
        message = f"unexpected {quoted(err.token.value)}"
        expected = _human(err.accepts or err.expected)
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
    context = _SOURCE.set((source_lines(text), file))
    try:
        return grammar().parse(text)
    except UnexpectedInput as err:
        raise syntax_error(err, text, file) from None
    finally:
        _SOURCE.reset(context)
