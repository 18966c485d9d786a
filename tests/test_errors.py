"""Every error kind: a QCError with the exact line and column, the line and a caret,
and what was expected."""
import pytest

from qcircuit import Circuit, Gate, QCError, parse, parse_file
from qcircuit.ir import Pattern, Program, check_option

# (name, text, line, column, words in the message, words in expected)
CASES = [
    ("qudit out of range", "circuit c {\n  qudits 4 4\n  gate (0, 2)\n}", 3, 12,
     "qudit 2 out of range", "0..1"),
    ("qudit repeated", "circuit c {\n  qudits 4 4 4\n  gate (1, 2, 1)\n}", 3, 15,
     "qudit 1 repeated", "distinct"),
    ("negative qudit", "circuit c { qudits 4 4 gate (-1, 0) }", 1, 30, "at least 0", None),
    ("dims disagree", "circuit c {\n  qudits 4 8\n  gate (1, 0) 8x8\n}", 3, 15,
     "disagree with the wires", "8x4"),
    ("dims disagree after a change", "circuit c { qudits 4 4\n gate (0) 4 -> 2\n gate (0) 4 }",
     3, 11, "qudit 0 carries dim 2", "2"),
    ("wrong dim count", "circuit c { qudits 4 4 gate (0, 1) 4x4x4 }", 1, 36,
     "3 dims written for a gate on 2 qudits", "2 dims"),
    ("wrong output dim count", "circuit c { qudits 4 4 gate (0, 1) 4x4 -> 4 }", 1, 43,
     "1 dims written", "2 dims"),
    ("zero dim", "circuit c { qudits 4 0 gate (0, 1) }", 1, 22, "at least 1, got 0", None),
    ("negative dim", "circuit c { qudits 4 -3 gate (0, 1) }", 1, 22, "got -3", None),
    ("zero dim inside DxD", "circuit c { qudits 4 4 gate (0, 1) 4x4 -> 4x0 }", 1, 45,
     "got 0", None),
    ("huge dim", "circuit c { qudits 4 99999999999999999999 gate (0) }", 1, 22, "too large", None),
    ("dim over the cap", "circuit c { qudits 2000000 gate (0) }", 1, 20, "at most 1048576", None),
    ("outputs not reached", "circuit c {\n  qudits 4 4 -> 4 8\n  gate (0)\n}", 2, 19,
     "declared output dims 4 8 are not reached", None),
    ("output count", "circuit c { qudits 4 4 -> 4 gate (0) }", 1, 27,
     "1 output dims declared for 2 qudits", "2 output dims"),
    ("unknown circuit in apply", "circuit c { qudits 4 all_pairs_ }\n", None, None, None, None),
    ("duplicate circuit", "circuit c { qudits 2 gate (0) }\n\ncircuit c { qudits 2 gate (0) }",
     3, 9, "'c' is already defined (at t.qc:1:9)", "a new circuit name"),
    ("duplicate option", "option scale = 2\noption scale = 3", 2, 8, "already set", None),
    ("circuit without gates", "circuit c {\n  qudits 4 4\n}", 1, 9, "has no gates", "'gate'"),
    ("circuit without qudits", "circuit c {\n  gate (0)\n}", 2, 3, "unexpected 'gate'",
     "'qudits'"),
    ("empty repeat", "circuit c { qudits 2\n  repeat 2 { } }", 2, 3, "repeat has no gates", None),
    ("repeat zero", "circuit c { qudits 2 2 repeat 0 { all_pairs } }", 1, 31, "at least 1", None),
    ("repeat too large", "circuit c { qudits 2 2 repeat 20000 { all_pairs } }", 1, 31,
     "at most 4096", None),
    ("too many gates", "circuit c { qudits 2 2\n repeat 1000 { repeat 1000 { all_pairs } } }",
     2, 9, "too many gates: 0 + 1000 x 1000 (at most 4096", None),
    ("all_pairs on one qudit", "circuit c { qudits 4\n all_pairs }", 2, 2, "at least 2 qudits",
     None),
    ("dims in auto circuit", "circuit c { qudits auto 2 gate (0, 1) 4x4 }", 1, 39,
     "takes its dims from the layer", None),
    ("auto count zero", "circuit c { qudits auto 0 gate (0) }", 1, 25, "at least 1", None),
    ("unknown option", "option lr = 3", 1, 8, "unknown option 'lr'", "init or scale or dropout"),
    ("bad init", "option init = ones", 1, 15, "unknown init mode 'ones'", "freeze_one"),
    ("bad dropout", "option dropout = 1.5", 1, 18, "dropout must be in [0, 1)", None),
    ("infinite scale", "option scale = 1e400", 1, 16, "takes a number", None),
    ("number for init", "option init = 3", 1, 15, "unknown init mode", None),
    ("bad regex", "circuit c { qudits 2 gate (0) }\napply c to q, /(ab/", 2, 16, "bad regex",
     "regular expression"),
    # syntax
    ("missing paren", "circuit c {\n  qudits 4 4\n  gate (0 1)\n}", 3, 11, "unexpected '1'",
     "')' or ','"),
    ("truncated", "circuit c {\n  qudits 4 4\n  gate (0, 1)\n", 3, 14, "unexpected end of file",
     "'}'"),
    ("bad character", "circuit c { qudits 4 4 gate (0, 1) @ }", 1, 36, "unexpected character '@'",
     "dims like 16 or 16x16"),
    ("dims on the qudits line", "circuit c { qudits 4x4 gate (0) }", 1, 20,
     "one dim per qudit", "4 4"),
    ("dims for a qudit index", "circuit c { qudits 4 4 gate (0x1) }", 1, 30,
     "must be an integer", "an integer"),
    ("dims for a repeat count", "circuit c { qudits 4 4 repeat 2x2 { gate (0) } }", 1, 31,
     "must be an integer", "an integer"),
    ("missing name", "circuit { qudits 2 gate (0) }", 1, 9, "unexpected '{'", "a name"),
    ("apply without patterns", "apply c to\n", 1, 11, "unexpected end of file", "module name"),
    ("stray top-level word", "circuit c { qudits 2 gate (0) }\nfoo", 2, 1, "unexpected",
     "'circuit'"),
]
CASES = [c for c in CASES if c[2] is not None]


@pytest.mark.parametrize("name,text,line,column,message,expected", CASES, ids=[c[0] for c in CASES])
def test_error_location_and_message(name, text, line, column, message, expected):
    with pytest.raises(QCError) as info:
        parse(text, file="t.qc")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.file, err.line, err.column) == ("t.qc", line, column), str(err)
    assert message in err.message
    if expected is not None:
        assert expected in err.expected
    # rendered: location, the offending line and a caret under the column
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"t.qc:{line}:{column}: error: ")
    assert rendered[1] == "    " + text.split("\n")[line - 1]
    assert rendered[2] == "    " + " " * (column - 1) + "^"
    assert err.one_line().startswith(f"t.qc:{line}:{column}: ")


def test_unknown_circuit_in_apply_points_at_the_name():
    with pytest.raises(QCError) as info:
        parse("circuit attn { qudits 2 gate (0) }\n\napply atn to q_proj")
    err = info.value
    assert (err.line, err.column) == (3, 7)
    assert "unknown circuit 'atn'" in err.message and err.expected == "attn"


def test_tab_indented_line_caret_aligns():
    with pytest.raises(QCError) as info:
        parse("circuit c {\n\tqudits 4 0\n\tgate (0)\n}")
    assert (info.value.line, info.value.column) == (2, 11)
    lines = str(info.value).splitlines()
    assert lines[2].index("^") == lines[1].index("0")


def test_include_errors(tmp_path):
    (tmp_path / "a.qc").write_text('# a\ninclude "b.qc"\n')
    (tmp_path / "b.qc").write_text('\n\n  include "a.qc"\n')
    with pytest.raises(QCError) as info:
        parse_file(tmp_path / "a.qc")
    err = info.value
    assert "include cycle: a.qc -> b.qc -> a.qc" in err.message
    assert (err.file, err.line, err.column) == (str(tmp_path / "b.qc"), 3, 11)

    (tmp_path / "self.qc").write_text('include "self.qc"')
    with pytest.raises(QCError, match="include cycle"):
        parse_file(tmp_path / "self.qc")

    (tmp_path / "m.qc").write_text('circuit c { qudits 2 gate (0) }\ninclude "missing.qc"\n')
    with pytest.raises(QCError) as info:
        parse_file(tmp_path / "m.qc")
    assert (info.value.line, info.value.column) == (2, 9) and "not found" in info.value.message

    # an error inside an included file names that file
    (tmp_path / "bad.qc").write_text("circuit c {\n qudits 2\n gate (3)\n}\n")
    with pytest.raises(QCError) as info:
        parse('\ninclude "bad.qc"', base_dir=tmp_path)
    assert (info.value.file, info.value.line, info.value.column) == (str(tmp_path / "bad.qc"), 3, 8)

    # a duplicate name across files points at the second definition
    (tmp_path / "c.qc").write_text("circuit c { qudits 2 gate (0) }\n")
    with pytest.raises(QCError) as info:
        parse('include "c.qc"\ncircuit c { qudits 2 gate (0) }', base_dir=tmp_path)
    assert (info.value.line, info.value.column) == (2, 9)
    assert "c.qc:1:9" in info.value.message


def test_non_utf8_file(tmp_path):
    (tmp_path / "x.qc").write_bytes(b"circuit c {\n  qudits 4 \xff\n}")
    with pytest.raises(QCError) as info:
        parse_file(tmp_path / "x.qc")
    assert (info.value.line, info.value.column) == (2, 12)
    assert "UTF-8" in info.value.message


def test_missing_top_level_file(tmp_path):
    with pytest.raises(QCError, match="cannot read"):
        parse_file(tmp_path / "nope.qc")


@pytest.mark.parametrize("misuse", [
    lambda: Circuit(4, 0),
    lambda: Circuit(4, -2),
    lambda: Circuit(4, "x"),
    lambda: Circuit(4, 2.5),
    lambda: Circuit(4, 4).gate((0, 2)),
    lambda: Circuit(4, 4).gate((1, 1)),
    lambda: Circuit(4, 4).gate((-1, 0)),
    lambda: Circuit(4, 4).gate(()),
    lambda: Circuit(4, 4).gate(None),
    lambda: Circuit(4, 4).gate(("0", 1)),
    lambda: Circuit(4, 4).gate((0, 1), "4x8"),
    lambda: Circuit(4, 4).gate((0, 1), "4x4x4"),
    lambda: Circuit(4, 4).gate((0, 1), "4x4 -> 4x0"),
    lambda: Circuit(4, 4).gate((0, 1), "4x4 -> 4x4", out=(4, 4)),
    lambda: Circuit(4, 4).gate((0, 1), "banana"),
    lambda: Circuit().gate((0, 1)),
    lambda: Circuit(4, 4).repeat(0),
    lambda: Circuit(4, 4).gate((0, 1), out=(4, 8)).repeat(2),
    lambda: Circuit(4, 4).gate((0, 1)).resolve(15),
    lambda: Circuit.auto_dims(0),
    lambda: Circuit.auto_dims(2).gate((0, 1), "4x4"),
    lambda: Circuit.auto_dims(2).gate((0, 2)),
    lambda: Circuit.auto_dims(2).in_dims,
    lambda: Circuit().gate((0, 2), "4x4").in_dims,
    lambda: Circuit(4, 4).to_qc(),
    lambda: Circuit(4, 4).gate((0, 1)).to_qc(name="not a name"),
    lambda: Program({"c": Circuit(2).gate(0)}, (ApplyRuleFor("d"),)),
    lambda: Program({}, (), {"lr": 1.0}),
    lambda: check_option("scale", "big"),
    lambda: check_option("scale", True),
    lambda: Pattern(""),
    lambda: Circuit(*[2] * 65),
    lambda: Circuit(2 ** 21),
    lambda: Circuit(True),
    lambda: Circuit().gate(10 ** 9, "2"),
    lambda: Circuit(2).gate(0).repeat(10 ** 6),
    lambda: Circuit(2).gate(0).repeat(2.0),
    lambda: Gate((0, 0), (2, 2), (2, 2)),
    lambda: Gate((0, 1), (2,), (2,)),
    lambda: Gate((0,), (0,), (2,)),
    lambda: Gate((0,), (2,), ()),
    lambda: Gate([0], (2,), (2,)),
    lambda: Circuit(2, gates=[Gate((1,), (2,), (2,))]),
    lambda: Circuit(2, gates=[Gate((0,), (3,), (3,))]),
    lambda: Circuit(2, gates=[Gate((0,), (), ())]),
    lambda: Circuit(auto=2, gates=[Gate((0,), (2,), (2,))]),
    lambda: Circuit(2, gates=["gate"]),
])
def test_builder_misuse_raises_qcerror_without_location(misuse):
    with pytest.raises(QCError) as info:
        misuse()
    assert info.value.line is None and info.value.column is None and info.value.span is None


def ApplyRuleFor(name):
    from qcircuit.ir import ApplyRule
    return ApplyRule(name, (Pattern("q_proj"),))
