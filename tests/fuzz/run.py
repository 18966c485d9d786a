"""Run generated cases through ``qcircuit.parse`` and check what comes out.

Each case must either parse, and then print back to ``.qc`` text that parses to the same
program (a program that parses can always be saved), or raise ``QCError`` located in the
text (line and column within it, the shown line equal to the text's line), with a message
of bounded length that never holds the contents of a file it refused (a canary in the environment and in a
``.txt`` file checks that). Each case must take under ``time_limit`` seconds of CPU time
(process time, so other processes on the machine do not count), and every ``trace_every``-th
case is parsed again under ``tracemalloc`` to record the peak memory it allocates.
"""
from __future__ import annotations

import gc
import os
import re
import tempfile
import time
import tracemalloc
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qcircuit import QCError, parse

from .generate import Generator, make_include_dir

CANARY = "qc-fuzz-canary-7f3a9"
RSS_JUMP_MIB = 256  # one case raising the process's peak RSS by more than this is a finding
SECRET = "do-not-echo"
MAX_ERROR_CHARS = 4000


@dataclass
class Report:
    cases: int = 0
    accepted: int = 0
    refused: Counter = field(default_factory=Counter)  # error kind -> count
    findings: list[str] = field(default_factory=list)  # what broke a rule, with the input
    slowest_s: float = 0.0
    slowest_input: str = ""
    over_limit: int = 0
    largest_input: int = 0
    max_traced_mib: float = 0.0
    traced_cases: int = 0
    wall_s: float = 0.0
    accepted_as: str = "parsed"   # what an accepted case did ("built" for the builder)

    @property
    def max_rss_mib(self) -> float:
        return peak_rss_mib()

    def lines(self, top: int = 15) -> list[str]:
        refused = sum(self.refused.values())
        largest = f" (largest {self.largest_input} bytes)" if self.largest_input else ""
        out = [f"inputs: {self.cases}{largest} in {self.wall_s:.1f} s",
               f"{self.accepted_as}: {self.accepted}   refused with a QCError: {refused}",
               f"rule breaks (other exceptions, unlocated errors, leaks, slow): "
               f"{len(self.findings)}",
               f"slowest input: {self.slowest_s * 1000:.1f} ms CPU ({self.slowest_input}); "
               f"over the limit: {self.over_limit}",
               f"max traced allocation of one case: {self.max_traced_mib:.1f} MiB "
               f"({self.traced_cases} cases traced); max RSS of the process: "
               f"{self.max_rss_mib:.0f} MiB",
               f"errors by kind (top {top} of {len(self.refused)}):"]
        out += [f"  {n:7d}  {kind}" for kind, n in self.refused.most_common(top)]
        out += [f"  FINDING: {f}" for f in self.findings[:20]]
        return out


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (NaN where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def error_kind(err: QCError) -> str:
    """The message with its particulars (quoted text, numbers, paths) blanked out."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|(?<![\w-])-?\d[\w.+-]*", "_", err.message)
    return kind[:70]


def _describe(data: str | bytes) -> str:
    return f"{len(data)} {'bytes' if isinstance(data, bytes) else 'chars'}: {data[:60]!r}"


def check_error(err: QCError, data: str | bytes) -> str | None:
    """What is wrong with this error, or None."""
    rendered = str(err)
    if err.span is None or not isinstance(err.line, int) or not isinstance(err.column, int):
        return "QCError without a location"
    if err.line < 1 or err.column < 1:
        return f"location {err.line}:{err.column} is not 1-based"
    if len(rendered) > MAX_ERROR_CHARS:
        return f"error text of {len(rendered)} characters"
    if CANARY in rendered or SECRET in rendered:
        return "error text echoes a refused file's contents"
    if err.file == "fuzz.qc":
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        lines = text.removeprefix("\ufeff").split("\n")
        if err.line > len(lines):
            return f"line {err.line} past the end ({len(lines)} lines)"
        line = lines[err.line - 1].removesuffix("\r")
        if err.column > len(line) + 2:
            return f"column {err.column} past the end of line {err.line} ({len(line)} chars)"
        if err.span.source_line and err.span.source_line != line:
            return "the line shown is not the text's line"
    return None


def run(cases: int, seed: int = 0, max_bytes: int = 100_000, time_limit: float = 1.0,
        trace_every: int = 50, include_dir: Path | None = None) -> Report:
    """Generate and check ``cases`` inputs; the report says what was seen."""
    os.environ["QC_FUZZ_CANARY"] = CANARY
    # the objects alive before the run (under pytest: torch, transformers, other tests) are
    # moved out of the collector's view, so a full collection that one case happens to
    # trigger costs that case its own garbage, not a scan of the whole process
    gc.freeze()
    try:
        return _run(cases, seed, max_bytes, time_limit, trace_every, include_dir)
    finally:
        gc.unfreeze()


def _run(cases: int, seed: int, max_bytes: int, time_limit: float, trace_every: int,
         include_dir: Path | None) -> Report:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_include_dir(include_dir or Path(tmp) / "inc")
        generator = Generator(seed, max_bytes)
        report = Report()
        start = time.perf_counter()
        for k in range(cases):
            _one(generator.case(), root, report, time_limit, trace=k % trace_every == 0)
        report.wall_s = time.perf_counter() - start
    return report


def _parse(data: str | bytes, root: Path) -> QCError | None:
    try:
        program = parse(data, file="fuzz.qc", base_dir=root)
    except QCError as err:
        return err
    _printable(program)
    return None


class NotPrintable(Exception):
    """A program that parsed but does not print back to text that parses to it."""


def _printable(program) -> None:
    """A program that parses can always be saved: its ``.qc`` text parses back equal."""
    try:
        again = parse(program.to_qc(), file="printed.qc", includes=False)
    except QCError as err:
        raise NotPrintable(f"the parsed program does not print back: {err.one_line()[:120]}") \
            from None
    if again != program:
        raise NotPrintable("the parsed program prints as text that parses to another program")


def _one(data: str | bytes, root: Path, report: Report, time_limit: float, trace: bool) -> None:
    report.cases += 1
    report.largest_input = max(report.largest_input, len(data))
    rss_before = peak_rss_mib()
    began = time.process_time()
    try:
        err = _parse(data, root)
    except Exception as exc:  # noqa: BLE001 - the rule under test: nothing but QCError
        where = traceback.extract_tb(exc.__traceback__)[-1]
        report.findings.append(f"{type(exc).__name__}: {str(exc)[:100]} at "
                               f"{Path(where.filename).name}:{where.lineno} <- {_describe(data)}")
        return
    spent = time.process_time() - began
    if peak_rss_mib() - rss_before > RSS_JUMP_MIB:
        report.findings.append(f"peak RSS {rss_before:.0f} -> {peak_rss_mib():.0f} MiB <- "
                               f"{_describe(data)}")
    if spent > report.slowest_s:
        report.slowest_s, report.slowest_input = spent, _describe(data)
    if spent > time_limit:
        report.over_limit += 1
        report.findings.append(f"slow: {spent:.2f} s CPU <- {_describe(data)}")
    if err is None:
        report.accepted += 1
    else:
        report.refused[error_kind(err)] += 1
        problem = check_error(err, data)
        if problem:
            report.findings.append(f"{problem}: {err.one_line()[:160]} <- {_describe(data)}")
    if trace:
        tracemalloc.start()
        try:
            _parse(data, root)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        report.traced_cases += 1
        report.max_traced_mib = max(report.max_traced_mib, peak / 2**20)
