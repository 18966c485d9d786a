"""Random calls of the builder API (``Circuit``, ``Program``), checked like the parser.

Each case starts a circuit (``Circuit(*dims)``, ``Circuit()``, ``Circuit.auto_dims(n)``,
``Circuit.low_rank(...)``), applies a few builder calls (``gate``, ``all_pairs``,
``repeat``, ``then``, ``resolve``), and sometimes wraps the result in a ``Program``
(``define``, ``apply``, ``with_options``, ``train``). Arguments mix good values with hostile ones:
``None``, floats, bools, strings, nested lists, huge iterables (``range(10**12)``), numbers
past every cap (``10**30``, 4096 qudits), unsafe regexes, regexes holding a line break,
out-of-range options. The rules: a call either returns or raises ``QCError`` (nothing
else), within ``time_limit`` CPU seconds; and whatever was built prints as ``.qc`` text
that parses back to an equal value (or refuses to print with a ``QCError``, for a circuit
whose dims are not all known), so anything the builder accepts can be saved.
"""
from __future__ import annotations

import random
import time
import traceback
from pathlib import Path

from qcircuit import Circuit, Program, QCError, parse

from .run import RSS_JUMP_MIB, Report, error_kind, peak_rss_mib

HOSTILE = [None, -1, 0, 1.5, True, "4", "x", [2, 2], (3,), 10 ** 30, range(10 ** 12), object(),
           float("nan"), 2 ** 20 + 1, b"4"]
DIMS = [2, 3, 4, 8, 16, 43, 1] + HOSTILE
COUNTS = [1, 2, 3, 4, 64, 65, 4096, 4097, 10 ** 30, 0, -1, None, "3", 2.0]
QUDITS = [(0, 1), (1, 0), (0,), 0, 1, 2, (0, 2), (2, 1, 0), (0, [2, 2]), (0, 0), (70,), (),
          "01", None, (True,), range(10 ** 9), (0.0, 1), (-1,), [1, 0], 3]
GATE_DIMS = [None, "4x4", "4x4 -> 2x8", (4, 4), 4, "0x4", "4x", "x" * 10_000, range(10 ** 12),
             [None], object(), "4" + "x4" * 200, "2x2", (2, 8), 16]
NAMES = ["c", "attn", "lora", "_", "1x", "", None, "a" * 300, "apply", "c d", 7]
PATTERNS = ["q_proj", "v_proj", "self_attn.q_proj", "/q_proj$/", r"/layers\.[0-3]\./",
            "/a\rb/", "/a\nb/", "/(a+)+$/", "/[/", "x.y", "a." * 100 + "b", "", 5, None,
            "/" + "x" * 300 + "/", "a" * 2000, "/\u2028/", "/a\\/b/", "q_proj\r"]
OPTIONS = [{"scale": 2}, {"init": "zero_last"}, {"dropout": 0.1}, {"scale": "x"},
           {"rank": 4}, {"scale": float("nan")}, {"scale": 1e9}, {"init": None}, {},
           {"dropout": 1.0}, {"scale": -0.5}]


class BuilderCase:
    """One random sequence of builder calls, replayable and describable."""

    def __init__(self, rng: random.Random):
        self.calls: list[tuple[str, tuple, dict]] = []
        start = rng.randrange(4)
        if start == 0:
            self.calls.append(("Circuit", tuple(rng.choice(DIMS) for _ in range(
                rng.choice([1, 2, 3, 4, 65]))), {}))
        elif start == 1:
            self.calls.append(("Circuit", (), {}))
        elif start == 2:
            self.calls.append(("auto_dims", (rng.choice(COUNTS),), {}))
        else:
            self.calls.append(("low_rank", tuple(rng.choice(DIMS) for _ in range(
                rng.randrange(1, 4))), {}))
        for _ in range(rng.randrange(6)):
            op = rng.randrange(6)
            if op <= 1:
                kwargs = {"out": rng.choice(GATE_DIMS)} if rng.random() < 0.3 else {}
                self.calls.append(("gate", (rng.choice(QUDITS), rng.choice(GATE_DIMS)), kwargs))
            elif op == 2:
                self.calls.append(("all_pairs", (), {}))
            elif op == 3:
                self.calls.append(("repeat", (rng.choice(COUNTS),), {}))
            elif op == 4:
                self.calls.append(("then", (rng.choice(["self", "small", 5]),), {}))
            else:
                self.calls.append(("resolve", (rng.choice([64, 172, 4096, 7, 10 ** 30, None]),
                                               rng.choice([None, 64, 172, 43, 0])), {}))
        if rng.random() < 0.5:
            trained = tuple(rng.choice(PATTERNS) for _ in range(rng.randrange(0, 3))) \
                if rng.random() < 0.4 else None
            self.calls.append(("program", (rng.choice(NAMES), tuple(rng.choice(PATTERNS)
                               for _ in range(rng.randrange(0, 3))), rng.choice(OPTIONS),
                               rng.choice(OPTIONS), trained), {}))

    def describe(self) -> str:
        return "; ".join(f"{name}{args!r:.60}" for name, args, _ in self.calls)[:300]

    def build(self) -> Circuit | Program:
        """Make the calls; whatever is built (the last value)."""
        name, args, _ = self.calls[0]
        value = (Circuit(*args) if name == "Circuit" else Circuit.auto_dims(*args)
                 if name == "auto_dims" else Circuit.low_rank(*args))
        for name, args, kwargs in self.calls[1:]:
            if name == "then":
                other = {"self": value, "small": Circuit(2, 2).gate((0, 1))}.get(args[0], args[0])
                value = value.then(other)
            elif name == "program":
                cname, patterns, program_options, rule_options, trained = args
                value = Program().define(cname, value).apply(cname, *patterns, **rule_options)
                value = value.with_options(**program_options)
                if trained is not None:
                    value = value.train(*trained)
            else:
                value = getattr(value, name)(*args, **kwargs)
        return value


def round_trip(value: Circuit | Program) -> str | None:
    """What is wrong with printing ``value`` and parsing it back, or None."""
    try:
        text = value.to_qc(name="c") if isinstance(value, Circuit) else value.to_qc()
    except QCError:
        return None   # refused to print (dims not known yet): a refusal, not a break
    try:
        again = parse(text, file="printed.qc", includes=False)
    except QCError as err:
        return f"printed text does not parse: {err.one_line()[:160]}"
    back = again.circuits["c"] if isinstance(value, Circuit) else again
    return None if back == value else "printed text parses to a different value"


def run_builder(cases: int, seed: int = 0, time_limit: float = 1.0) -> Report:
    """Generate and check ``cases`` builder call sequences."""
    rng, report = random.Random(seed), Report(accepted_as="built and printed back")
    start = time.perf_counter()
    for _ in range(cases):
        case = BuilderCase(rng)
        report.cases += 1
        rss_before, began = peak_rss_mib(), time.process_time()
        try:
            value = case.build()
            problem = round_trip(value)
        except QCError as err:
            report.refused[error_kind(err)] += 1
            problem = None
        except Exception as exc:  # noqa: BLE001 - the rule under test: nothing but QCError
            where = traceback.extract_tb(exc.__traceback__)[-1]
            problem = (f"{type(exc).__name__}: {str(exc)[:100]} at "
                       f"{Path(where.filename).name}:{where.lineno}")
        else:
            report.accepted += 1
        spent = time.process_time() - began
        if spent > report.slowest_s:
            report.slowest_s, report.slowest_input = spent, case.describe()[:80]
        if spent > time_limit:
            report.over_limit += 1
            problem = problem or f"slow: {spent:.2f} s CPU"
        if peak_rss_mib() - rss_before > RSS_JUMP_MIB:
            problem = problem or f"peak RSS {rss_before:.0f} -> {peak_rss_mib():.0f} MiB"
        if problem:
            report.findings.append(f"{problem} <- {case.describe()}")
    report.wall_s = time.perf_counter() - start
    return report
