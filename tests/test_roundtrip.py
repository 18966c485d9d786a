"""Printing then parsing gives back an equal object, for random circuits and programs."""
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcircuit import Circuit, Program, QCError, parse
from qcircuit.ir import ApplyRule, Pattern, all_pairs_qudits
from qcircuit.printer import circuit_to_qc

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def low_rank_circuits(draw):
    """``low_rank R`` in its forms: auto (``Circuit.low_rank(r)``) or ``D -> R -> E``."""
    rank = draw(st.integers(1, 9))
    if draw(st.booleans()):
        return Circuit.low_rank(rank)
    return Circuit.low_rank(rank, draw(st.integers(1, 9)), draw(st.integers(1, 9)))


@st.composite
def circuits(draw, allow_auto=True, allow_low_rank=True):
    if allow_low_rank and draw(st.integers(0, 5)) == 0:
        return draw(low_rank_circuits())
    n = draw(st.integers(1 if allow_auto else 2, 5))
    auto = allow_auto and draw(st.integers(0, 4)) == 0
    c = Circuit.auto_dims(n) if auto else Circuit(*draw(st.lists(st.integers(1, 6), min_size=n,
                                                                  max_size=n)))
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            c = c.all_pairs()
        elif kind == 1 and 0 < len(c.gates) < 8:
            try:
                c = c.repeat(draw(st.integers(1, 3)))
            except QCError:  # a circuit that changes dims cannot repeat: fine
                pass
        else:
            arity = draw(st.integers(1, min(3, n)))
            qudits = tuple(draw(st.permutations(range(n)))[:arity])
            out = None  # auto circuits too: 'gate (0) -> 8' (output dims only)
            if draw(st.booleans()):
                out = tuple(draw(st.lists(st.integers(1, 6), min_size=arity, max_size=arity)))
            c = c.gate(qudits, out=out)
    return c if c.gates else c.gate(0)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
paths = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,4}(\.[A-Za-z0-9_]{1,4}){0,3}", fullmatch=True)
regexes = st.from_regex(r"([a-z/.]|\\[./d]|\(a\|b\)|\[0-9\]|\$)+", fullmatch=True)


@st.composite
def patterns(draw):
    if draw(st.booleans()):
        return Pattern(draw(paths))
    return Pattern(draw(regexes), regex=True)


@st.composite
def option_sets(draw):
    """Some of the options, in any order (the printer sorts them)."""
    options = {}
    if draw(st.booleans()):
        options["init"] = draw(st.sampled_from(["freeze_one", "zero_last"]))
    if draw(st.booleans()):
        options["scale"] = draw(st.floats(1e-6, 1e4) | st.floats(-1e4, -1e-6) | st.integers(1, 9))
    if draw(st.booleans()):
        options["dropout"] = draw(st.floats(0.0, 0.999))
    keys = draw(st.permutations(list(options)))
    return {k: options[k] for k in keys}


@st.composite
def programs(draw):
    circuit_names = draw(st.lists(names, min_size=0, max_size=3, unique=True))
    circuit_map = {name: draw(circuits()) for name in circuit_names}
    rules = ()
    if circuit_names:
        rules = tuple(ApplyRule(draw(st.sampled_from(circuit_names)),
                                tuple(draw(st.lists(patterns(), min_size=1, max_size=3))),
                                options=draw(option_sets()))
                      for _ in range(draw(st.integers(0, 3))))
    return Program(circuit_map, rules, draw(option_sets()))


@SETTINGS
@given(circuits(), names)
def test_circuit_round_trip(circuit, name):
    text = circuit.to_qc(name=name)
    back = parse(text).circuits[name]
    assert back == circuit
    # the builder's incremental wires agree with a replay of the gates
    assert back.out_dims_partial() == circuit.out_dims_partial()
    rebuilt = Circuit(*circuit.dims, gates=circuit.gates, auto=circuit.auto)
    assert rebuilt == circuit and rebuilt.out_dims_partial() == circuit.out_dims_partial()
    assert back.to_qc(name=name) == text  # canonical: printing is stable


@SETTINGS
@given(programs())
def test_program_round_trip(program):
    text = program.to_qc()
    back = parse(text)
    assert back == program
    assert list(back.circuits) == list(program.circuits)
    assert back.to_qc() == text


@SETTINGS
@given(circuits(allow_auto=False, allow_low_rank=False))
def test_written_dims_only_on_gates_that_change_dims(circuit):
    text = circuit.to_qc(name="c")
    statements = [s.strip() for line in text.splitlines()[2:] for s in line.split("{")]
    written = {s.rstrip(" }") for s in statements if s.startswith("gate") and "->" in s}
    changing = {f"gate ({', '.join(map(str, g.qudits))}) "
                f"{'x'.join(map(str, g.in_dims))} -> {'x'.join(map(str, g.out_dims))}"
                for g in circuit.gates if not g.is_square}
    assert written == changing
    assert ("->" in text.splitlines()[1]) == (circuit.out_dims != circuit.in_dims)


def test_all_pairs_folds_and_repeat():
    c = Circuit(4, 4, 4).gate((0, 1)).all_pairs().all_pairs().all_pairs()
    text = circuit_to_qc(c, "x")
    assert text == ("circuit x {\n    qudits 4 4 4\n    gate (0, 1)\n"
                    "    repeat 3 { all_pairs }\n}\n")
    assert parse(text).circuits["x"] == c


def test_non_square_all_pairs_is_printed_gate_by_gate():
    c = Circuit(2, 2, 2)._with([])  # start empty
    for i, j in all_pairs_qudits(3):
        c = c.gate((i, j), out=(3, 3) if (i, j) == (0, 1) else None)
    text = c.to_qc(name="x")
    assert "all_pairs" not in text and "gate (0, 1) 2x2 -> 3x3" in text
    assert "qudits 2 2 2 -> 3 3 2" in text
    assert parse(text).circuits["x"] == c


def test_regex_slash_is_escaped():
    p = Program({"c": Circuit(2).gate(0)}, (ApplyRule("c", (Pattern(r"a/b\/c\\", regex=True),)),))
    text = p.to_qc()
    assert r"/a\/b\/c\\/" in text
    assert parse(text) == p
    assert re.search(parse(text).rules[0].patterns[0].text, "xa/b/c\\")


def test_keywords_are_fine_as_names_and_patterns():
    words = ["circuit", "qudits", "gate", "all_pairs", "repeat", "apply", "option", "include",
             "auto", "to", "x", "init", "with", "low_rank", "scale"]
    c = Circuit(2, 3).gate((1, 0))
    p = Program({w: c for w in words},
                tuple(ApplyRule(w, tuple(Pattern(q) for q in words),
                                options={"scale": 2.0} if w == "with" else {}) for w in words))
    assert parse(p.to_qc()) == p


@SETTINGS
@given(low_rank_circuits(), names)
def test_low_rank_prints_as_low_rank_when_it_is_a_bottleneck(circuit, name):
    text = circuit.to_qc(name=name)
    first, last = circuit.gates
    bottleneck = circuit.is_auto or first.out_dims[0] < min(first.in_dims[0], last.out_dims[0])
    assert ("low_rank" in text) == bottleneck
    assert parse(text).circuits[name] == circuit


def test_rule_options_print_in_canonical_order():
    c = Circuit.low_rank(8)
    p = Program({"lora": c}, (ApplyRule("lora", (Pattern("q_proj"),),
                                        options={"dropout": 0.05, "scale": 2, "init": "zero_last"}),
                              ApplyRule("lora", (Pattern("v_proj"),))))
    text = p.to_qc()
    assert text == ("circuit lora {\n    low_rank 8\n}\n\n"
                    "apply lora to q_proj with init = zero_last, scale = 2.0, dropout = 0.05\n"
                    "apply lora to v_proj\n")
    assert parse(text) == p


def test_long_repeats_print_within_the_parser_limit():
    from qcircuit.limits import MAX_GATES, MAX_REPEAT
    c = Circuit(2, 3).gate(0).gate(1).gate(0).repeat(MAX_GATES // 3)
    text = c.to_qc(name="c")
    counts = [int(k) for k in re.findall(r"repeat (\d+)", text)]
    assert counts and max(counts) <= MAX_REPEAT
    assert parse(text).circuits["c"] == c
