"""Mutated or truncated .qc text never raises anything but QCError, and every QCError
from text carries a file position."""
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcircuit import QCError, parse

from test_roundtrip import programs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEEDS = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.qc"))]
SEEDS.append("circuit c { qudits 2 3 -> 4 3 repeat 2 { gate (1) } gate (0, 1) 2x3 -> 4x3 }\n"
             "apply c to /a\\/b/, x.y\noption scale = -1e-3\n")
SEEDS.append("circuit a { qudits 8 8 6 all_pairs }\ncircuit l { low_rank 8 }\n"
             "circuit u { qudits auto 2 gate (0) -> 3 gate (0, 1) }\napply a to query, value\n"
             "apply l to query, value with init = zero_last, scale = 2\n")
# pieces of the language, so mutations reach deep into the grammar
TOKENS = ["circuit", "qudits", "auto", "gate", "all_pairs", "repeat", "apply", "to", "option",
          "include", "with", "low_rank", "init", "scale", "dropout", "{", "}", "(", ")", ",", "->", "-", ">", "x",
          "16x16", "0", "1", "-1", "99999999999999999999", "1e999", "=", "#", "\n", " ", "\t",
          '"', '"llama2_qv.qc"', '"nope.qc"', "/", "\\", "é", "\x00", "\r", "𝕏", "16", ".", "_"]


@st.composite
def mutated(draw):
    if draw(st.integers(0, 3)) == 0:  # a random valid program's text
        text = draw(programs()).to_qc()
    else:
        text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        if op == 0:  # delete a slice
            text = text[:i] + text[j:]
        elif op == 1:  # insert a language token
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif op == 2:  # insert arbitrary characters
            text = text[:i] + draw(st.text(max_size=5)) + text[i:]
        elif op == 3:  # duplicate a slice
            text = text[:j] + text[i:j] + text[j:]
        else:  # truncate
            text = text[:i]
    return text


def check(text: str) -> None:
    try:
        parse(text, file="fuzz.qc", base_dir=EXAMPLES)
    except QCError as err:
        assert err.span is not None, str(err)
        assert isinstance(err.line, int) and err.line >= 1, str(err)
        assert isinstance(err.column, int) and err.column >= 1, str(err)
        str(err)  # renders


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_text_raises_only_located_qcerror(text):
    check(text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SEEDS), st.binary(max_size=6), st.integers(0, 10**6))
def test_raw_bytes_raise_only_located_qcerror(seed, junk, where):
    data = seed.encode("utf-8")
    i = where % (len(data) + 1)
    data = data[:i] + junk + data[i:]
    try:
        parse(data, file="bytes.qc", base_dir=EXAMPLES)
    except QCError as err:
        assert err.line >= 1 and err.column >= 1, str(err)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncation_raises_only_located_qcerror(seed):
    text = SEEDS[seed]
    for cut in range(len(text)):
        check(text[:cut])


@pytest.mark.parametrize("text", [
    "circuit c { qudits 2 " + "repeat 1 { " * 3000 + "gate (0)" + " }" * 3000 + " }",
    "circuit c { qudits " + "2 " * 5000 + "gate (0) }",
    "circuit c { qudits 2 gate (" + "0, " * 5000 + "1) }",
    "circuit c { qudits 2 gate (0) " + "9" * 5000 + " }",
    "circuit c { qudits " + "2 " * 64 + "repeat 10000 { all_pairs } }",
    "option scale = " + "9" * 5000,
    "apply c to /" + "(" * 5000 + "/",
    "{" * 10000,
    "circuit c { qudits 2 gate (0) }\n" * 2 + "\x00",
])
def test_pathological_inputs_give_qcerror(text):
    with pytest.raises(QCError) as info:
        parse(text, file="p.qc")
    assert info.value.line >= 1 and info.value.column >= 1


# --- the grammar-aware fuzzer (tests/fuzz): a few thousand cases here, 100,000 on demand with
# ``python -m tests.fuzz --cases 100000`` -------------------------------------------------------

def test_generated_cases_raise_only_located_qcerrors_quickly(tmp_path):
    from fuzz.run import run
    report = run(3000, seed=17, max_bytes=100_000, time_limit=1.0, trace_every=40,
                 include_dir=tmp_path / "inc")
    print("\n".join(report.lines()))
    assert report.findings == []  # other exceptions, unlocated errors, echoes, slow cases
    assert report.cases == 3000 and report.largest_input > 50_000
    # both sides of the language are reached: programs that parse, and many kinds of error
    assert report.accepted > 100 and len(report.refused) > 30
    assert report.slowest_s < 1.0
    assert report.max_traced_mib < 16  # per case, for inputs up to 100 KB


def test_fuzz_checks_catch_what_they_claim():
    from fuzz.run import CANARY, check_error
    from qcircuit import Span
    text = "circuit c {\n  qudits 2\n}"
    assert check_error(QCError("x", Span("fuzz.qc", 2, 3, "  qudits 2")), text) is None
    assert "without a location" in check_error(QCError("x"), text)
    assert "not the text's line" in check_error(QCError("x", Span("fuzz.qc", 2, 3, "qudits")), text)
    assert "past the end" in check_error(QCError("x", Span("fuzz.qc", 9, 1)), text)
    assert "echoes" in check_error(QCError(CANARY, Span("inc.qc", 1, 1)), text)


def test_the_builder_api_raises_only_qcerrors_and_prints_back_what_it_built():
    """The builder fuzzer (tests/fuzz/builder.py): hostile arguments to every builder call;
    100,000 cases on demand with ``python -m tests.fuzz --builder --cases 100000``."""
    from fuzz.builder import run_builder
    report = run_builder(2000, seed=23)
    print("\n".join(report.lines()))
    assert report.findings == []
    assert report.accepted > 50 and len(report.refused) > 30
    assert report.slowest_s < 1.0


def test_parsed_programs_print_back_and_the_check_catches_one_that_does_not(monkeypatch):
    from fuzz import run as fuzz_run
    from qcircuit import printer
    program = parse("circuit c { qudits 4 4 all_pairs }\napply c to /q_proj$/\n")
    fuzz_run._printable(program)
    monkeypatch.setattr(printer, "program_to_qc", lambda p: "circuit c { qudits 2 2 all_pairs }"
                                                           "\napply c to /q_proj$/\n")
    with pytest.raises(fuzz_run.NotPrintable, match="parses to another program"):
        fuzz_run._printable(program)
    monkeypatch.setattr(printer, "program_to_qc", lambda p: "circuit {")
    with pytest.raises(fuzz_run.NotPrintable, match="does not print back"):
        fuzz_run._printable(program)
