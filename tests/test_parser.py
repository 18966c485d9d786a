"""Parsing every construct of the .qc language into the IR."""
import os
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
    assert parse("").option("init") == "zero_last"   # chosen by measurement: docs/choosing.md
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
    # a bad byte after the mark is located the same way, and its line is shown without it
    with pytest.raises(QCError, match="not UTF-8") as info:
        parse(b"\xef\xbb\xbfoption scale = 1\x8a\n", file="b.qc")
    assert (info.value.line, info.value.column) == (1, 17)
    assert info.value.span.source_line == "option scale = 1\ufffd"


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


# --- untrusted text: linear line handling, safe includes, bounded sizes -------------------

def _peak_and_seconds(text, **kw):
    import time
    import tracemalloc
    tracemalloc.start()
    start = time.process_time()
    try:
        result = parse(text, **kw)
    except QCError as err:
        result = err
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak, seconds


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_one_long_line_parses_in_linear_memory_for_any_line_ending(end):
    # ~200 KiB on one line: every token used to keep its own copy of a CRLF line (quadratic)
    patterns = ", ".join(f"model.layers.{k}.self_attn.q_proj" for k in range(6000))
    text = f"circuit c {{ qudits 4 4 all_pairs }}{end}apply c to {patterns}{end}option scale = 2{end}"
    assert len(text) > 200 * 1024
    program, peak, seconds = _peak_and_seconds(text)
    assert isinstance(program, Program) and len(program.rules[0].patterns) == 6000
    assert peak < 50 * len(text), f"{peak / len(text):.0f} bytes traced per input character"
    assert seconds < 2.0, seconds


def test_error_on_a_long_crlf_line_shows_a_window_with_the_caret():
    patterns = ", ".join(f"model.layers.{k}.self_attn.q_proj" for k in range(6000))
    text = f"circuit c {{ qudits 4 4 all_pairs }}\r\napply c to {patterns}, /(a+)+$/\r\n"
    err, peak, seconds = _peak_and_seconds(text)
    assert isinstance(err, QCError) and peak < 50 * len(text) and seconds < 2.0
    assert (err.line, err.column) == (2, len(f"apply c to {patterns}, /(a+)") + 1)
    _, shown, caret = str(err).split("\n")[:3]
    assert len(shown) < 120 and shown.startswith("    …") and shown.endswith("$/")
    assert shown[caret.index("^")] == "+"


def test_text_over_the_size_cap_is_refused_before_parsing():
    import time
    from qcircuit.limits import MAX_TEXT_BYTES
    text = "circuit c { qudits 2 2 all_pairs }\n" * (10 * 2**20 // 35)  # 10 MB of circuits
    start = time.process_time()
    with pytest.raises(QCError, match=f"limit of {MAX_TEXT_BYTES} characters") as info:
        parse(text, file="big.qc")
    assert time.process_time() - start < 0.5
    assert info.value.line == MAX_TEXT_BYTES // 35 + 1 and info.value.column >= 1
    with pytest.raises(QCError, match=f"limit of {MAX_TEXT_BYTES} bytes"):
        parse(text.encode(), file="big.qc")


def test_a_megabyte_of_valid_text_parses_in_linear_time():
    import time

    def program_text(circuits):
        return "".join(f"circuit c{k} {{\n    qudits 16 8 8 4\n    all_pairs\n}}\n"
                       f"apply c{k} to layers.{k}.q_proj\n" for k in range(circuits))

    def cpu_seconds(circuits, rounds):
        text = program_text(circuits)
        best = float("inf")
        for _ in range(rounds):   # the fastest round: a shared machine only adds time
            start = time.process_time()
            assert len(parse(text).circuits) == circuits
            best = min(best, time.process_time() - start)
        return best, len(text)

    small, _ = cpu_seconds(1250, 3)      # ~100 KB
    large, size = cpu_seconds(12500, 1)  # ~1 MB
    assert size > 2**20
    # ten times the text takes ~10-25x the time (the garbage collector's passes grow with
    # the heap); quadratic parsing would take ~100x
    assert large < 40 * small + 1.0, (small, large)


def _fifo_or_skip(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(path)


def test_includes_read_only_regular_qc_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QC_TEST_SECRET", "hunter2-secret")
    (tmp_path / "notes.txt").write_text("SECRET_LINE = 1\n")
    os.symlink("/proc/self/environ", tmp_path / "env.qc")
    os.symlink("/dev/zero", tmp_path / "zero.qc")
    (tmp_path / "dir.qc").mkdir()
    _fifo_or_skip(tmp_path / "fifo.qc")
    cases = {'include "/proc/self/environ"': "only .qc files",
             'include "notes.txt"': "only .qc files",
             'include "env.qc"': "only .qc files",
             'include "/dev/zero"': "only .qc files",
             'include "zero.qc"': "only .qc files",
             'include "dir.qc"': "not a regular file",
             'include "fifo.qc"': "not a regular file"}
    for text, words in cases.items():
        with pytest.raises(QCError, match=words) as info:
            parse("option scale = 2\n" + text, file="main.qc", base_dir=tmp_path)
        err = info.value
        assert (err.file, err.line, err.column) == ("main.qc", 2, 9), text
        assert "hunter2" not in str(err) and "SECRET_LINE" not in str(err)
    for path in ("/proc/self/environ", "/dev/zero", tmp_path / "fifo.qc", tmp_path / "dir.qc"):
        with pytest.raises(QCError, match="not a regular file") as info:
            parse_file(path)
        assert "hunter2" not in str(info.value) and info.value.line == 1


def test_include_size_caps(tmp_path, monkeypatch):
    from qcircuit import parser
    from qcircuit.limits import MAX_TEXT_BYTES
    with open(tmp_path / "huge.qc", "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: refused by its size, never read
    with pytest.raises(QCError, match=f"over the limit of {MAX_TEXT_BYTES} bytes") as info:
        parse('\ninclude "huge.qc"', base_dir=tmp_path)
    assert (info.value.line, info.value.column) == (2, 9)
    # the total over all includes, each expansion counted
    (tmp_path / "rules.qc").write_text("apply c to x\n" * 100)
    monkeypatch.setattr(parser, "MAX_TOTAL_BYTES", 5000)
    text = "circuit c { qudits 2 gate (0) }\n" + 'include "rules.qc"\n' * 10
    with pytest.raises(QCError, match="exceed 5000 characters") as info:
        parse(text, base_dir=tmp_path)
    assert info.value.line == 5  # 32 + 4 x 1300 > 5000


def test_include_diamond_is_read_once_per_file_and_bounded(tmp_path, monkeypatch):
    import time
    from qcircuit import sources
    from qcircuit.limits import MAX_INCLUDES
    for k in range(20):  # 2**20 paths from d0 to d20
        (tmp_path / f"d{k}.qc").write_text(f'include "d{k + 1}.qc"\n' * 2)
    (tmp_path / "d20.qc").write_text("")
    reads = []
    real_read = sources.read_file
    monkeypatch.setattr("qcircuit.parser.read_file",
                        lambda path, span: reads.append(path) or real_read(path, span))
    start = time.process_time()
    with pytest.raises(QCError, match=f"more than {MAX_INCLUDES} includes") as info:
        parse_file(tmp_path / "d0.qc")
    assert time.process_time() - start < 2.0
    assert len(reads) == len(set(reads)) == 21  # d0 … d20, each read once
    assert info.value.line >= 1 and info.value.column == 9
    # a small diamond is fine, and a file included twice adds its items twice
    (tmp_path / "top.qc").write_text('include "d18.qc"\ncircuit c { qudits 2 gate (0) }\n')
    (tmp_path / "d20.qc").write_text("apply c to x\n")
    assert len(parse_file(tmp_path / "top.qc").rules) == 4


def test_includes_can_be_disabled(tmp_path):
    (tmp_path / "ok.qc").write_text("option scale = 2\n")
    assert parse('include "ok.qc"', base_dir=tmp_path).option("scale") == 2.0
    with pytest.raises(QCError, match="includes are disabled") as info:
        parse('circuit c { qudits 2 gate (0) }\n  include "ok.qc"', base_dir=tmp_path,
              includes=False)
    assert (info.value.line, info.value.column) == (2, 11)
    assert "checkpoint" in info.value.message


def test_nul_in_file_names_is_a_qcerror(tmp_path):
    for attempt in (lambda: parse("option scale = 2", file="a\x00b.qc"),
                    lambda: parse('include "a.qc"', base_dir=f"{tmp_path}\x00"),
                    lambda: parse_file(f"{tmp_path}/a\x00.qc")):
        with pytest.raises(QCError, match="NUL"):
            attempt()
    with pytest.raises(QCError, match="NUL") as info:
        parse('option scale = 2\ninclude "a\x00.qc"', base_dir=tmp_path)
    assert (info.value.line, info.value.column) == (2, 9)


def test_parsing_in_threads_keeps_each_texts_spans():
    from concurrent.futures import ThreadPoolExecutor

    def one(k):
        text = "\n" * k + f"circuit c{k} {{ qudits 2 " + "gate (0) " * 200 + "}"
        c = parse(text, file=f"f{k}.qc").circuits[f"c{k}"]
        return {(g.span.file, g.span.line, g.span.source_line[:9]) for g in c.gates}

    with ThreadPoolExecutor(4) as pool:
        for k, spans in enumerate(pool.map(one, range(16))):
            assert spans == {(f"f{k}.qc", k + 1, "circuit c")}


@pytest.mark.parametrize("text", [
    "apply x to /" + "1" * 200_000,                     # an unterminated regex
    "apply x to /" + "\\a" * 100_000 + "/",             # a regex of escapes
    "apply x to a" + ".a" * 100_000,                    # a path of 100,000 parts
    "circuit c { qudits 2 gate (0) 1" + "x1" * 100_000 + " }",  # dims of 100,000 parts
])
def test_huge_tokens_cost_linear_memory(text):
    # token patterns repeat no group without a bound: re keeps state per turn of a group
    err, peak, seconds = _peak_and_seconds(text)
    assert isinstance(err, QCError) and err.line == 1 and err.column > 1
    assert peak < 20 * len(text) and seconds < 2.0, (peak, seconds)


# --- per-rule options, sums and low rank (issue 16) -----------------------------------------

HYBRID = """\
circuit attn { qudits 8 8 6  all_pairs }
circuit lora { low_rank 8 }
apply attn to query, value
apply lora to query, value with init = zero_last, scale = 2
option dropout = 0.1
"""


def test_rule_options_override_the_program_options():
    p = parse(HYBRID)
    attn, lora = p.rules
    assert dict(attn.options) == {}
    assert dict(lora.options) == {"init": "zero_last", "scale": 2.0}
    assert p.options_for(attn) == {"init": "zero_last", "scale": 1.0, "dropout": 0.1}
    assert p.options_for(lora) == {"init": "zero_last", "scale": 2.0, "dropout": 0.1}
    both = parse("circuit c { qudits 2 gate (0) } option scale = 3\n"
                 "apply c to x with scale = -0.5, dropout = 0\napply c to y")
    assert [both.options_for(r)["scale"] for r in both.rules] == [-0.5, 3.0]
    assert both.options_for(both.rules[0])["dropout"] == 0.0


def test_with_options_in_any_order_and_layout():
    a = parse("circuit c { qudits 2 gate (0) } apply c to x, y with scale = 2, init = zero_last")
    b = parse("circuit c { qudits 2 gate (0) }\napply c to x,\n  y\n  with # why\n"
              "  init = zero_last ,\n  scale = 2.0\n")
    assert a == b
    assert a.to_qc().endswith("apply c to x, y with init = zero_last, scale = 2.0\n")


def test_with_is_a_keyword_only_after_a_pattern():
    # a module called 'with' (or 'low_rank') is still a pattern wherever one is expected
    p = parse("circuit with { qudits 2 gate (0) }\n"
              "apply with to with, low_rank, with.with with scale = 2\n"
              "apply with to /(^|\\.)with$/")
    first, second = p.rules
    assert first.circuit == "with"
    assert first.patterns == (Pattern("with"), Pattern("low_rank"), Pattern("with.with"))
    assert dict(first.options) == {"scale": 2.0}
    assert first.patterns[0].matches("encoder.with") and second.patterns[0].matches("a.with")
    assert parse(p.to_qc()) == p
    # 'with' cannot start a pattern list by mistake: 'apply c to with scale = 2' reads 'with'
    # as the module name, then refuses 'scale' where ',' or 'with' was expected
    with pytest.raises(QCError, match="unexpected 'scale'") as info:
        parse("circuit c { qudits 2 gate (0) } apply c to with scale = 2")
    assert "'with'" in info.value.expected


def test_low_rank_statement_forms():
    lora = one("circuit c { low_rank 8 }")
    assert lora.is_auto and lora.num_qudits == 1
    assert lora == one("circuit c { qudits auto 1 gate (0) -> 8 gate (0) }")
    assert lora == one("circuit c { qudits auto 1 low_rank 8 }")
    assert lora == Circuit.low_rank(8)
    assert lora.gates == (Gate((0,), (), (8,)), Gate((0,), (), ()))
    wide = one("circuit c { qudits 64 -> 172\n low_rank 8 }")
    assert wide == Circuit.low_rank(8, 64, 172) == lora.resolve(64, 172)
    assert [(g.in_dims, g.out_dims) for g in wide.gates] == [((64,), (8,)), ((8,), (172,))]
    square = one("circuit c { qudits 32 low_rank 4 }")
    assert square == Circuit(32).gate(0, out=4).gate(0, out=32) == Circuit.low_rank(4, 32)


def test_auto_gates_with_output_dims_resolve_from_the_wires():
    c = one("circuit c { qudits auto 2\n gate (0) -> 3\n gate (0, 1)\n gate (1) -> 5 gate (1) }")
    assert c.gates[0] == Gate((0,), (), (3,)) and c.gates[2] == Gate((1,), (), (5,))
    r = c.resolve(64, 96)  # 8x8 -> 12x8
    assert r.in_dims == (8, 8) and r.out_dims == (12, 8)
    # inputs come from the wires; the last gate on each qudit gives the layer's output dim
    assert [(g.in_dims, g.out_dims) for g in r.gates] == [
        ((8,), (3,)), ((3, 8), (12, 8)), ((8,), (5,)), ((5,), (8,))]
    assert c == Circuit.auto_dims(2).gate(0, out=3).gate((0, 1)).gate(1, out=5).gate(1)


def test_auto_output_dims_on_a_last_gate_must_agree_with_the_layer():
    c = one("circuit c {\n  qudits auto 1\n  gate (0) -> 8\n}")
    assert c.resolve(64, 8).gates == (Gate((0,), (64,), (8,)),)
    with pytest.raises(QCError, match="last gate on qudit 0 writes output dim 8") as info:
        c.resolve(64)
    assert (info.value.line, info.value.column) == (3, 3)
    assert "64 output features give qudit 0 dim 64" in info.value.message
