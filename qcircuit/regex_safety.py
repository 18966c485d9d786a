"""Which ``/regex/`` module patterns are accepted: a subset that cannot backtrack
catastrophically, checked when the pattern is made.

Python's ``re`` backtracks, so ``/(a+)+$/`` takes exponential time on ``"aaaa…b"``; a
program in a checkpoint could hang ``load()`` that way. Rather than time-limit matching
(``re`` cannot be interrupted), only patterns in a safe subset are accepted:

- at most ``MAX_REGEX_CHARS`` characters;
- no group that can repeat more than once (``*``, ``+``, ``{m,}``, ``{m,n}`` with n > 1)
  may contain a quantifier or an alternation: ``(a+)+``, ``(a*)*``, ``(a|aa)+``,
  ``(x+x+)+y`` are refused, ``(q|v)_proj``, ``(\\.\\d+)?`` and ``[0-9]+`` are fine;
- at most ``MAX_REGEX_REPEATS`` repeating quantifiers in all: a search for ``.*.*.*.*Z``
  costs about n**5 steps on an n-character name, three quantifiers about n**4;
- no backreferences (``\\1``, ``(?P=name)``), lookarounds (``(?=``, ``(?!``, ``(?<=``,
  ``(?<!``), conditionals (``(?(1)…)``) or verbose mode (``(?x)``).

What is left backtracks at most polynomially in the subject's length (degree 4 at worst),
and the subjects are module names (tens of characters).
A small scanner of the pattern's text does the check (it gives exact columns);
``re.compile`` then checks that it is a valid expression at all.
"""
from __future__ import annotations

import re

from .errors import quoted
from .limits import MAX_REGEX_CHARS, MAX_REGEX_REPEATS

__all__ = ["regex_problem"]

_UNSUPPORTED = {"(?=": "a lookahead", "(?!": "a lookahead", "(?<=": "a lookbehind",
                "(?<!": "a lookbehind", "(?P=": "a backreference", "(?(": "a conditional"}
_COUNTED = re.compile(r"\{(\d*)(,?)(\d*)\}")


def regex_problem(pattern: str) -> tuple[str, int] | None:
    """Why ``pattern`` is refused and the 0-based offset to point at, or None if accepted."""
    if len(pattern) > MAX_REGEX_CHARS:
        return (f"the regex is {len(pattern)} characters long (at most {MAX_REGEX_CHARS})",
                MAX_REGEX_CHARS)
    problem = _scan(pattern)
    if problem:
        return problem
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        why = "nested too deep" if isinstance(err, RecursionError) else getattr(err, "msg", err)
        return f"bad regex {quoted('/' + pattern + '/')}: {why}", getattr(err, "pos", None) or 0
    if compiled.flags & re.VERBOSE:
        return "verbose regexes ((?x)) are not supported in module patterns", 0
    return None


def _quantifier(pattern: str, i: int) -> tuple[int, int | None] | None:
    """The quantifier at ``i`` as (length, most repeats or None for unbounded), or None."""
    if i >= len(pattern):
        return None
    char = pattern[i]
    if char in "*+":
        size, most = 1, None
    elif char == "?":
        size, most = 1, 1
    elif char == "{" and (m := _COUNTED.match(pattern, i)) and (m[1] or m[3]):
        size = m.end() - i
        most = int(m[3]) if m[3] else (None if m[2] else int(m[1]))
    else:
        return None
    if i + size < len(pattern) and pattern[i + size] in "?+":  # lazy or possessive
        size += 1
    return size, most


def _scan(pattern: str) -> tuple[str, int] | None:
    # each open group: [offset of '(', holds a quantifier, holds an alternation]
    groups: list[list] = [[0, False, False]]
    i = repeats_seen = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 < len(pattern) and pattern[i + 1] in "123456789":
                return "backreferences are not supported in module patterns", i
            i += 2
        elif char == "[":
            i = _class_end(pattern, i)
        elif char == "(":
            for prefix, what in _UNSUPPORTED.items():
                if pattern.startswith(prefix, i):
                    return f"{what} is not supported in module patterns", i
            groups.append([i, False, False])
            i += 1
        elif char == ")" and len(groups) > 1:
            start, quantified, alternates = groups.pop()
            i += 1
            q = _quantifier(pattern, i)
            repeats = q is not None and (q[1] is None or q[1] > 1)
            if repeats and (quantified or alternates):
                inside = "a quantifier" if quantified else "an alternation"
                return (f"this repeats a group that holds {inside} (from offset {start}): nested "
                        "repetition can take exponential time; write it without the outer "
                        "repeat, or with a character class", i)
            groups[-1][1] |= quantified or q is not None
            groups[-1][2] |= alternates
            if q:
                repeats_seen += repeats
                if repeats_seen > MAX_REGEX_REPEATS:
                    return _too_many_repeats(i)
                i += q[0]
        elif char == "|":
            groups[-1][2] = True
            i += 1
        elif (q := _quantifier(pattern, i)) is not None:
            groups[-1][1] = True
            repeats_seen += q[1] is None or q[1] > 1
            if repeats_seen > MAX_REGEX_REPEATS:
                return _too_many_repeats(i)
            i += q[0]
        else:
            i += 1
    return None


def _too_many_repeats(offset: int) -> tuple[str, int]:
    return (f"more than {MAX_REGEX_REPEATS} repeating quantifiers (*, +, {{m,n}}) in one "
            "module pattern: matching time grows as a power of their number", offset)


def _class_end(pattern: str, i: int) -> int:
    """Offset just after the character class that opens at ``i``."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1
