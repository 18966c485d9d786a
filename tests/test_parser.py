"""Parsing every construct of the .qc language into the IR."""
from pathlib import Path

import pytest

from qcircuit import Circuit, Gate, Program, QCError, parse, parse_file
from qcircuit.ir import ApplyRule, Pattern

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The language sketch from DESIGN.md, verbatim.
DESIGN_EXAMPLE = """\
# llama2_qv.qc — the paper's LLaMA-2 configuration
circuit attn {
    qudits 16 8 8 4            # 16·8·8·4 = 4096
    all_pairs                  # one gate on every pair of qudits
}

circuit up {
    qudits 16 16 16 -> 16 16 43
    gate (0, 1)                # dims taken from the wires: 16x16
    gate (1, 2) 16x16 -> 16x43 # explicit dims are checked against the wires
    gate (0, 2)
}

apply attn to q_proj, v_proj   # module-name suffixes, or /regex/
apply up to up_proj
option init = freeze_one
"""


def one(text: str) -> Circuit:
    (circuit,) = parse(text).circuits.values()
    return circuit


def test_design_example_parses_as_written():
    p = parse(DESIGN_EXAMPLE)
    assert list(p.circuits) == ["attn", "up"]
    assert p.circuits["attn"] == Circuit(16, 8, 8, 4).all_pairs()
    up = p.circuits["up"]
    assert up.gates == (
        Gate((0, 1), (16, 16), (16, 16)),
        Gate((1, 2), (16, 16), (16, 43)),
        Gate((0, 2), (16, 43), (16, 43)),
    )
    assert (up.in_features, up.out_features) == (4096, 11008)
    assert p.rules == (ApplyRule("attn", (Pattern("q_proj"), Pattern("v_proj"))),
                       ApplyRule("up", (Pattern("up_proj"),)))
    assert dict(p.options) == {"init": "freeze_one"}
    assert parse_file(EXAMPLES / "llama2_qv_up.qc") == p


def test_paper_example_file_is_only_the_paper_configuration():
    p = parse_file(EXAMPLES / "llama2_qv.qc")
    assert dict(p.circuits) == {"attn": Circuit(16, 8, 8, 4).all_pairs()}
    assert p.rules == (ApplyRule("attn", (Pattern("q_proj"), Pattern("v_proj"))),)
    assert dict(p.options) == {"init": "freeze_one"}
    assert p.circuits["attn"].num_params == 43008


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.qc")), ids=lambda p: p.name)
def test_every_example_parses_and_round_trips(path):
    p = parse_file(path)
    assert p.circuits
    assert parse(p.to_qc()) == p


def test_all_pairs_reference_order():
    c = one("circuit c { qudits 2 3 4 5 all_pairs }")
    assert [g.qudits for g in c.gates] == [(2, 3), (1, 3), (0, 3), (1, 2), (0, 2), (0, 1)]
    assert [g.in_dims for g in c.gates] == [(4, 5), (3, 5), (2, 5), (3, 4), (2, 4), (2, 3)]


def test_gate_dims_forms_and_arity():
    c = one("""circuit c {
        qudits 2 3 4
        gate (2)               # arity 1, dims from the wire
        gate (1) 3             # arity 1 with dims
        gate (1) 3 -> 5        # arity 1, non-square
        gate (0, 1, 2) 2x5x4   # arity 3
        gate (2, 0) -> 6x2     # output dims only
        gate (0,1,)            # trailing comma
    }""")
    assert c.gates == (
        Gate((2,), (4,), (4,)), Gate((1,), (3,), (3,)), Gate((1,), (3,), (5,)),
        Gate((0, 1, 2), (2, 5, 4), (2, 5, 4)), Gate((2, 0), (4, 2), (6, 2)),
        Gate((0, 1), (2, 5), (2, 5)),
    )
    assert c.out_dims == (2, 5, 6)


def test_capital_x_and_qudits_out_of_order():
    c = one("circuit c { qudits 4 2 gate (1, 0) 2X4 -> 3x4 }")
    assert c.gates == (Gate((1, 0), (2, 4), (3, 4)),)
    assert c.out_dims == (4, 3)


def test_declared_outputs_map_last_gate_on_each_qudit():
    c = one("""circuit c {
        qudits 2 3 4 -> 5 3 6
        gate (0, 1)      # not last on 0 or 1: square
        gate (1, 2)      # last on 1 and 2: 3x4 -> 3x6
        gate (0)         # last on 0: 2 -> 5
    }""")
    assert c.gates == (Gate((0, 1), (2, 3), (2, 3)), Gate((1, 2), (3, 4), (3, 6)),
                       Gate((0,), (2,), (5,)))
    # a written output overrides the default, even on the last gate
    c = one("circuit c { qudits 2 2 -> 2 3 gate (0, 1) -> 2x3 gate (0) }")
    assert c.gates == (Gate((0, 1), (2, 2), (2, 3)), Gate((0,), (2,), (2,)))


def test_repeat_nested():
    c = one("""circuit c {
        qudits 2 2 2
        repeat 2 {
            gate (0, 1)
            repeat 3 { gate (2) }
        }
        repeat 1 { all_pairs }
    }""")
    assert [g.qudits for g in c.gates] == [(0, 1), (2,), (2,), (2,)] * 2 + [(1, 2), (0, 2), (0, 1)]
    assert c == Circuit(2, 2, 2).gate((0, 1)).gate(2).gate(2).gate(2).repeat(2).all_pairs()


def test_auto_circuit_resolved_later():
    c = one("circuit c { qudits auto 3 all_pairs gate (2) }")
    assert c.is_auto and c.num_qudits == 3
    assert c == Circuit.auto_dims(3).all_pairs().gate(2)
    r = c.resolve(768)
    assert r.in_dims == (12, 8, 8) and r.out_dims == (12, 8, 8)
    assert [g.qudits for g in r.gates] == [(1, 2), (0, 2), (0, 1), (2,)]


def test_apply_patterns_and_regexes():
    p = parse(r"""circuit c { qudits 2 2 all_pairs }
        apply c to q_proj, self_attn.v_proj, layers.0.mlp.up_proj,
                   /attention\.self\.(query|key)$/, /a\/b/
    """)
    (rule,) = p.rules
    assert rule.circuit == "c"
    assert rule.patterns == (Pattern("q_proj"), Pattern("self_attn.v_proj"),
                             Pattern("layers.0.mlp.up_proj"),
                             Pattern(r"attention\.self\.(query|key)$", regex=True),
                             Pattern("a/b", regex=True))
    assert rule.patterns[0].matches("model.layers.3.self_attn.q_proj")
    assert not rule.patterns[0].matches("model.layers.3.self_attn.qq_proj")
    assert rule.patterns[1].matches("model.layers.3.self_attn.v_proj")
    assert rule.patterns[3].matches("roberta.encoder.layer.0.attention.self.key")
    assert not rule.patterns[3].matches("roberta.encoder.layer.0.attention.self.value")
    assert rule.patterns[4].matches("x/a/b")


def test_apply_before_its_circuit_and_keywords_as_names():
    p = parse("apply gate to gate, to circuit gate { qudits 2 2 all_pairs }")
    assert p.rules == (ApplyRule("gate", (Pattern("gate"), Pattern("to"))),)


def test_options():
    p = parse("option init = zero_last option scale = 2 option dropout = .25")
    assert dict(p.options) == {"init": "zero_last", "scale": 2.0, "dropout": 0.25}
    assert parse("option scale = -1.5e-1").option("scale") == -0.15
    assert parse("").option("init") == "freeze_one"
    assert parse("").option("dropout") == 0.0


def test_comments_and_layout_are_free():
    a = parse("circuit c{qudits 4 4 gate(0,1)}apply c to x")
    b = parse("# head\n\ncircuit c # name\n{\n\tqudits 4 # one\n 4\r\n gate ( 0 ,\n 1 )\n}\n"
              "apply c to # patterns follow\n x # end")
    assert a == b


def test_crlf_line_endings():
    text = DESIGN_EXAMPLE.replace("\n", "\r\n")
    assert parse(text) == parse(DESIGN_EXAMPLE)
    with pytest.raises(QCError) as info:
        parse(text.replace("gate (0, 2)", "gate (0, 3)"))
    assert (info.value.line, info.value.column) == (11, 14)
    assert info.value.span.source_line == "    gate (0, 3)"


def test_include_relative_to_including_file(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "attn.qc").write_text('include "more/opts.qc"\n'
                                               "circuit attn { qudits 4 4 all_pairs }\n")
    (tmp_path / "lib" / "more").mkdir()
    (tmp_path / "lib" / "more" / "opts.qc").write_text("option scale = 3\n")
    (tmp_path / "main.qc").write_text('include "lib/attn.qc"\napply attn to q_proj\n')
    p = parse_file(tmp_path / "main.qc")
    assert dict(p.circuits) == {"attn": Circuit(4, 4).all_pairs()}
    assert p.option("scale") == 3.0 and len(p.rules) == 1
    # a string resolves includes against base_dir
    q = parse('include "attn.qc" apply attn to x', base_dir=tmp_path / "lib")
    assert q.circuits["attn"] == p.circuits["attn"]
    # the same file may be included twice only if it defines nothing twice
    (tmp_path / "rules.qc").write_text("apply attn to v_proj\n")
    r = parse_file_text(tmp_path, 'include "lib/attn.qc"\ninclude "rules.qc"\ninclude "rules.qc"\n')
    assert len(r.rules) == 2


def parse_file_text(tmp_path, text):
    path = tmp_path / "top.qc"
    path.write_text(text)
    return parse_file(path)


def test_spans_recorded_but_ignored_by_equality():
    p = parse("\n\ncircuit c {\n  qudits 4 4\n  gate (0, 1)\n}\n", file="x.qc")
    c = p.circuits["c"]
    assert (c.span.file, c.span.line, c.span.column) == ("x.qc", 3, 1)
    assert (c.gates[0].span.line, c.gates[0].span.column) == (5, 3)
    assert c.gates[0].span.source_line == "  gate (0, 1)"
    assert c == Circuit(4, 4).gate((0, 1))
    assert hash(c) == hash(Circuit(4, 4).gate((0, 1)))
    assert p == Program({"c": Circuit(4, 4).gate((0, 1))})


def test_empty_program_and_bytes_input():
    assert parse("# nothing\n") == Program({})
    assert parse(b"circuit c { qudits 2 all_pairs_x }".replace(b"all_pairs_x", b"gate (0)")) \
        == Program({"c": Circuit(2).gate(0)})


def test_byte_order_mark_is_ignored(tmp_path):
    (tmp_path / "bom.qc").write_bytes(b"\xef\xbb\xbfcircuit c { qudits 2 gate (0) }")
    assert parse_file(tmp_path / "bom.qc") == Program({"c": Circuit(2).gate(0)})
    with pytest.raises(QCError) as info:
        parse("\ufeffcircuit c { qudits 2 gate (1) }")
    assert (info.value.line, info.value.column) == (1, 28)


def test_parse_rejects_non_text():
    with pytest.raises(QCError):
        parse(42)


def test_design_api_block():
    c = Circuit(16, 8, 8, 4).all_pairs()
    assert parse(c.to_qc(name="c")).circuits["c"] == c
    c = Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), out=(16, 43))
    assert parse(c.to_qc(name="c")).circuits["c"] == c
    assert c.to_qc(name="c") == ("circuit c {\n    qudits 16 16 16 -> 16 16 43\n    gate (0, 1)\n"
                                 "    gate (1, 2) 16x16 -> 16x43\n}\n")
    c = Circuit().gate((0, 2), "16x16")
    assert c.gates == (Gate((0, 2), (16, 16), (16, 16)),)
    with pytest.raises(QCError, match="qudit 1 has no dims"):
        c.to_qc(name="c")
