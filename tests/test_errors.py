"""Every error kind: a QCError with the exact line and column, the line and a caret,
and what was expected."""
import pytest

from qcircuit import Circuit, Gate, QCError, parse, parse_file
from qcircuit.ir import Pattern, Program, check_option

C2 = "circuit c { qudits 2 gate (0) }\n"
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
     "takes its input dims from the layer", None),
    ("auto count zero", "circuit c { qudits auto 0 gate (0) }", 1, 25, "at least 1", None),
    ("unknown option", "option lr = 3", 1, 8, "unknown option 'lr'", "init or scale or dropout"),
    ("bad init", "option init = ones", 1, 15, "unknown init mode 'ones'", "freeze_one"),
    ("bad dropout", "option dropout = 1.5", 1, 18, "dropout must be in [0, 1)", None),
    ("infinite scale", "option scale = 1e400", 1, 16, "takes a number", None),
    ("number for init", "option init = 3", 1, 15, "unknown init mode", None),
    ("bad regex", "circuit c { qudits 2 gate (0) }\napply c to q, /(ab/", 2, 16, "bad regex",
     "regular expression"),
    # per-rule options (after 'with') and low_rank
    ("unknown rule option", C2 + "apply c to q_proj with lr = 3", 2, 24, "unknown option 'lr'",
     "init or scale or dropout"),
    ("bad rule scale", C2 + "apply c to q_proj, v_proj with init = zero_last, scale = big",
     2, 58, "option scale takes a number, got 'big'", None),
    ("bad rule init", C2 + "apply c to q_proj with init = 3", 2, 31, "unknown init mode '3'",
     "freeze_one or zero_last"),
    ("bad rule dropout", C2 + "apply c to q_proj\n  with dropout = 1", 3, 18,
     "dropout must be in [0, 1)", None),
    ("rule option twice", C2 + "apply c to q_proj with scale = 2, init = zero_last, scale = 3",
     2, 53, "option 'scale' is given twice in this rule (first at t.qc:2:24)", "each key once"),
    ("with and nothing", C2 + "apply c to q_proj with", 2, 23, "unexpected end of file",
     "a name"),
    ("with without a value", C2 + "apply c to q_proj with scale =", 2, 31,
     "unexpected end of file", "a number"),
    ("option without with", C2 + "apply c to q_proj scale = 2", 2, 19, "unexpected 'scale'",
     "'with'"),
    ("low_rank on two qudits", "circuit c {\n  qudits 4 4\n  low_rank 2\n}", 3, 3,
     "low_rank needs a circuit of one qudit", "'qudits auto 1'"),
    ("low_rank on auto 2", "circuit c { qudits auto 2 low_rank 2 }", 1, 27,
     "this one has 2", None),
    ("low_rank then a gate", "circuit c {\n  low_rank 8\n  gate (0)\n}", 3, 3,
     "cannot be mixed with other statements", "'}' after 'low_rank R'"),
    ("a gate then low_rank", "circuit c { qudits 8 gate (0) low_rank 2 }", 1, 22,
     "cannot be mixed", None),
    ("low_rank twice", "circuit c { low_rank 2 low_rank 3 }", 1, 24, "cannot be mixed", None),
    ("low_rank in repeat", "circuit c { qudits 8 repeat 2 { low_rank 2 } }", 1, 33,
     "cannot go inside repeat", None),
    ("rank zero", "circuit c { low_rank 0 }", 1, 22, "the rank must be at least 1", None),
    ("rank too large", "circuit c { low_rank 2000000 }", 1, 22, "too large", None),
    ("rank as dims", "circuit c { low_rank 2x2 }", 1, 22, "must be an integer", None),
    ("low_rank outputs for two qudits", "circuit c { qudits 8 -> 8 8 low_rank 2 }", 1, 27,
     "2 output dims declared for 1 qudits", None),
    ("auto gate output count", "circuit c { qudits auto 2 gate (0, 1) -> 8 }", 1, 42,
     "1 dims written for a gate on 2 qudits", "2 dims"),
    ("auto gate with both dims", "circuit c { qudits auto 1 gate (0) 4 -> 8 }", 1, 36,
     "input dims from the layer", None),
    ("no qudits line", "circuit c { gate (0) }", 1, 13, "unexpected 'gate'",
     "'low_rank' or 'qudits'"),
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
    lambda: Circuit.auto_dims(2).gate((0, 1), out=(4,)),
    lambda: Circuit.auto_dims(1).gate(0, "4 -> 8"),
    lambda: Circuit.low_rank(0),
    lambda: Circuit.low_rank(2**21),
    lambda: Circuit.low_rank(8, out_dim=16),
    lambda: Circuit.low_rank(8).resolve(64, 0),
    lambda: Circuit.auto_dims(1).gate(0, out=8).resolve(64),
    lambda: Circuit.auto_dims(2).gate(0).resolve(6, 15),
    lambda: Gate((0,), (), (2, 2)),
    lambda: Program().apply("lora", "q_proj"),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora"),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", "q_proj", rank=8),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", "q_proj", scale=0.0),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", "q_proj", init="ones"),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", "a b"),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", "/(a+)+/"),
    lambda: Program().define("lora", Circuit.low_rank(8)).apply("lora", 3),
    lambda: Program().define("lora", Circuit.low_rank(8)).define("lora", Circuit.low_rank(4)),
    lambda: Program().define("not a name", Circuit.low_rank(8)),
    lambda: Program().define("lora", "low_rank 8"),
    lambda: Program().with_options(dropout=1.0),
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


# --- limits, option ranges and regex safety: each a located error naming the limit ----------

LIMIT_CASES = [
    ("repeat expands past the gate cap", "circuit c { qudits 2\n  repeat 10000 { gate (0) } }",
     2, 10, "at most 4096"),
    ("repeat of ten gates", "circuit c { qudits 2 2\n repeat 1000 { "
     + "gate (0) " * 10 + "} }", 2, 9, "1000 x 10 (at most 4096"),
    ("all_pairs past the gate cap", "circuit c { qudits " + "2 " * 64
     + "\n repeat 2 { all_pairs }\n all_pairs all_pairs }", 3, 2, "after 4032 gates"),
    ("too many qudits", "circuit c { qudits " + "2 " * 65 + "gate (0) }", 1, 148, "at most 64"),
    ("auto count over the cap", "circuit c { qudits auto 65 all_pairs }", 1, 25, "at most 64"),
    ("parameters over the cap", "circuit c {\n qudits 1048576 1048576\n gate (0, 1) }", 3, 2,
     "over the limit of 268435456 (2**28)"),
    ("parameters over the cap across gates", "circuit c { qudits 8192 8192\n"
     + "gate (0)\n" * 3 + "gate (1)\n" * 2 + "}", 6, 1, "brings the circuit to 335544320"),
    ("repeat nesting", "circuit c { qudits 2 " + "repeat 1 { " * 40 + "gate (0)" + " }" * 40
     + " }", 1, 374, "nested too deep (at most 32)"),
    ("scale 1e308", "option scale = 1e308", 1, 16, "magnitude in [1e-06, 10000]"),
    ("scale zero", "option scale = 0", 1, 16, "magnitude in [1e-06, 10000]"),
    ("scale just over", "option scale = -10000.5", 1, 16, "got -10000.5"),
    ("scale nan", "option scale = nan", 1, 16, "takes a number"),
    ("dropout one", "option dropout = 1", 1, 18, "in [0, 1)"),
    ("dropout negative", "option dropout = -0.1", 1, 18, "in [0, 1)"),
    ("init unknown", "option init = kaiming", 1, 15, "unknown init mode"),
]


@pytest.mark.parametrize("name,text,line,column,message", LIMIT_CASES,
                         ids=[c[0] for c in LIMIT_CASES])
def test_limits_and_option_ranges_are_located(name, text, line, column, message):
    import time
    start = time.process_time()
    with pytest.raises(QCError) as info:
        parse(text, file="t.qc")
    assert time.process_time() - start < 1.0
    err = info.value
    assert (err.file, err.line, err.column) == ("t.qc", line, column), str(err)
    assert message in err.message, err.message
    assert "^" in str(err)


@pytest.mark.parametrize("value,ok", [(1.0, True), (-2.0, True), (1e-6, True), (1e4, True),
                                      (0.0, False), (1e308, False), (1e-7, False),
                                      (float("inf"), False), (float("nan"), False)])
def test_scale_range_is_the_same_for_text_and_the_api(value, ok):
    text = f"option scale = {value!r}"
    if ok:
        assert check_option("scale", value) == value
        assert parse(text).option("scale") == value
        assert Program({}, (), {"scale": value}).option("scale") == value
        return
    for attempt in (lambda: check_option("scale", value), lambda: parse(text),
                    lambda: Program({}, (), {"scale": value})):
        with pytest.raises(QCError):
            attempt()


def test_auto_circuit_refuses_dim_one_qudits_at_bind_time():
    import time
    c = parse("circuit c { qudits auto 64 all_pairs }").circuits["c"]
    assert len(c.gates) == 2016
    start = time.process_time()
    with pytest.raises(QCError, match="4096 has 12 prime factors") as info:
        c.resolve(4096)
    assert time.process_time() - start < 1.0
    assert info.value.expected == "qudits auto 12 or fewer" and info.value.line == 1
    twelve = Circuit.auto_dims(12).all_pairs().resolve(4096)
    assert twelve.in_dims == (2,) * 12
    assert Circuit.auto_dims(3).all_pairs().resolve(64, 172).out_dims == (43, 2, 2)
    with pytest.raises(QCError, match="positive integer up to"):
        Circuit.auto_dims(2).gate((0, 1)).resolve(2**61 - 1)  # no trial division to 2**30


UNSAFE_REGEXES = ["(a+)+$", "(a|a)*b", "(x+x+)+y", "(a*)*", "(a|aa)+", "(a?){25}a{25}",
                  "((ab)*c)+", ".*.*.*.*Z", r"(a)\1", "(?=q)proj", "(?<!x)proj", "(?P<n>a)(?P=n)",
                  "(?x)a b", "a" * 257]
SAFE_REGEXES = [r"layers\.[0-3]\.self_attn\.(q|v)_proj$", r"q_proj$", r".*\.v_proj",
                r"layers\.\d+\.mlp\.(up|down)_proj", r"(\.\d+)?_proj", "[0-9]+", "(ab){2}",
                r"(q|k|v)_proj", r"a\/b", ".*.*.*Z", "(?i)Q_PROJ"]


@pytest.mark.parametrize("regex", UNSAFE_REGEXES)
def test_catastrophic_regexes_are_refused_where_written(regex):
    import time
    text = f"circuit c {{ qudits 2 gate (0) }}\napply c to q_proj, /{regex}/"
    start = time.process_time()
    with pytest.raises(QCError) as info:
        parse(text, file="r.qc")
    assert time.process_time() - start < 0.5
    err = info.value
    assert err.line == 2 and 20 <= err.column <= 21 + len(regex), (err.column, str(err))
    assert "^" in str(err)
    with pytest.raises(QCError):  # the API refuses it the same way, without a location
        Pattern(regex, regex=True)


@pytest.mark.parametrize("regex", SAFE_REGEXES)
def test_ordinary_regexes_are_accepted(regex):
    program = parse(f"circuit c {{ qudits 2 gate (0) }}\napply c to /{regex}/")
    pattern = program.rules[0].patterns[0]
    assert pattern.regex and pattern == Pattern(regex, regex=True)


def test_nested_quantifier_error_points_at_the_outer_repeat():
    with pytest.raises(QCError) as info:
        parse("circuit c { qudits 2 gate (0) }\napply c to /x(a+)+$/", file="r.qc")
    assert (info.value.line, info.value.column) == (2, 18)  # the '+' after ')'
    assert "nested" in info.value.message


def test_non_utf8_bytes_and_text_give_located_errors():
    with pytest.raises(QCError, match="not UTF-8") as info:
        parse(b"circuit c {\r\n  qudits 2 \xc3\x28 }", file="b.qc")
    assert (info.value.file, info.value.line, info.value.column) == ("b.qc", 2, 12)
    assert info.value.span.source_line.startswith("  qudits 2 ")
