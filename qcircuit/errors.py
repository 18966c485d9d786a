"""QCError: the one exception users see, with a source location when it comes from text."""
from __future__ import annotations

from dataclasses import dataclass

#: Characters of the offending line shown around the caret (long lines are cut).
SHOWN_CHARS = 100
#: Characters of a name or token quoted in a message (``quoted``).
QUOTED_CHARS = 40
#: A message or an "expected …" longer than this is cut in the middle (it holds user text).
MESSAGE_CHARS = 1000


def quoted(value: object) -> str:
    """``repr`` of a user's name, token or value for a message, cut to ``QUOTED_CHARS``."""
    text = repr(value)
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS - 2] + "…" + text[-1]


def with_article(noun: object) -> str:
    """``an Embedding``, ``a Linear``: the noun after the article its first letter takes."""
    text = str(noun)
    return f"{'an' if text[:1].lower() in tuple('aeiou') else 'a'} {text}"


@dataclass(frozen=True, slots=True)
class Span:
    """Where something was written: file (None for a string), 1-based line and column."""

    file: str | None
    line: int
    column: int
    source_line: str = ""

    def at(self) -> str:
        return f"{self.file or '<string>'}:{self.line}:{self.column}"


class QCError(ValueError):
    """A user error: bad circuit text, a circuit that does not fit, a bad checkpoint.

    From text it carries ``file``, ``line`` and ``column`` (1-based) and prints the
    offending line with a caret under the column.
    """

    def __init__(self, message: str, span: Span | None = None, expected: str | None = None):
        self.message = _cut(str(message))
        self.span = span
        self.expected = None if expected is None else _cut(expected)
        self.file = span.file if span else None
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(self._render())

    def _render(self) -> str:
        if self.span is None:
            text = self.message
            return f"{text} (expected {self.expected})" if self.expected else text
        lines = [f"{self.span.at()}: error: {self.message}"]
        if self.span.source_line:
            source, caret = _window(self.span.source_line.rstrip("\r\n"), self.span.column)
            lines.append(f"    {source}")
            lines.append("    " + " " * caret + "^")
        if self.expected:
            lines.append(f"expected {self.expected}")
        return "\n".join(lines)

    def one_line(self) -> str:
        """The message on one line, for the command line."""
        where = f"{self.span.at()}: " if self.span else ""
        tail = f" (expected {self.expected})" if self.expected else ""
        return f"{where}{self.message}{tail}"


def _cut(text: str) -> str:
    if len(text) <= MESSAGE_CHARS:
        return text
    half = MESSAGE_CHARS // 2
    return f"{text[:half]} … {text[-half:]}"


def _window(line: str, column: int) -> tuple[str, int]:
    """The part of ``line`` shown around ``column`` (1-based), and the caret's offset in it.
    Tabs show as one space so the caret stays under its character."""
    at = max(column - 1, 0)
    start = max(0, min(at - SHOWN_CHARS // 2, len(line) - SHOWN_CHARS))
    end = start + SHOWN_CHARS
    shown = line[start:end].expandtabs(1)
    if start > 0:
        shown, at = "…" + shown, at + 1
    if end < len(line):
        shown += "…"
    return shown, at - start
