"""The immutable IR and its builder: shapes, all_pairs order, equality, resolve, summaries."""
import dataclasses
import itertools
import math

import pytest

from qcircuit import (Circuit, Gate, Program, QCError, Span, all_pairs_qudits, balanced_factors,
                      parse)
from qcircuit.ir import ApplyRule, GateSpec, Pattern, build_gates, check_option
from qcircuit.printer import circuit_summary


def test_all_pairs_reference_order():
    assert all_pairs_qudits(4) == [(2, 3), (1, 3), (0, 3), (1, 2), (0, 2), (0, 1)]
    assert all_pairs_qudits(2) == [(0, 1)]
    assert all_pairs_qudits(1) == []
    for n in range(2, 8):
        pairs = all_pairs_qudits(n)
        assert sorted(pairs) == sorted(itertools.combinations(range(n), 2))
        # j descending, then i descending
        assert pairs == sorted(pairs, key=lambda p: (-p[1], -p[0]))


def test_paper_configuration():
    c = Circuit(16, 8, 8, 4).all_pairs()
    assert [g.qudits for g in c.gates] == all_pairs_qudits(4)
    assert c.in_dims == c.out_dims == (16, 8, 8, 4)
    assert c.in_features == c.out_features == 4096
    assert c.num_qudits == 4 and not c.is_auto
    assert c.params_per_gate == (32**2, 32**2, 64**2, 64**2, 128**2, 128**2)
    assert c.num_params == 43008
    # 0.041 % of LLaMA-2-7B (6.74e9 parameters) on q_proj and v_proj of 32 layers
    assert round(100 * c.num_params * 2 * 32 / 6.738e9, 3) == 0.041


def test_non_square_builder():
    c = Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), out=(16, 43))
    assert c.gates[1] == Gate((1, 2), (16, 16), (16, 43))
    assert c.gates[1].shape == (16, 43, 16, 16)
    assert c.gates[1].num_params == 16 * 43 * 16 * 16
    assert not c.gates[1].is_square and c.gates[0].is_square
    assert c.out_dims == (16, 16, 43) and (c.in_features, c.out_features) == (4096, 11008)
    assert c == Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), "16x16 -> 16x43")
    assert c == Circuit(16, 16, 16).gate((0, 1), (16, 16)).gate((1, 2), "16x16", out="16x43")
    # the next gate sees the new dims
    d = c.gate((2, 0))
    assert d.gates[-1] == Gate((2, 0), (43, 16), (43, 16))


def test_learning_dims_from_first_gate():
    c = Circuit().gate((0, 2), "16x16")
    assert c.dims == (16, None, 16)
    with pytest.raises(QCError, match="qudit 1 has no dims"):
        c.in_dims
    c = c.gate(1, "8").gate((1, 2))
    assert c.in_dims == (16, 8, 16)
    assert c == Circuit(16, 8, 16).gate((0, 2)).gate(1).gate((1, 2))


def test_immutable_and_methods_return_new_circuits():
    base = Circuit(4, 4)
    grown = base.gate((0, 1))
    assert base.gates == () and len(grown.gates) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        grown.gates = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        grown.gates[0].qudits = (1, 0)
    p = Program({"c": grown}, (ApplyRule("c", (Pattern("x"),)),), {"scale": 2})
    with pytest.raises(TypeError):
        p.circuits["d"] = base
    with pytest.raises(TypeError):
        p.options["scale"] = 3.0


def test_then_and_repeat():
    a = Circuit(2, 3).gate((0, 1))
    b = Circuit(2, 3).gate(1).gate((1, 0))
    ab = a.then(b)
    assert [g.qudits for g in ab.gates] == [(0, 1), (1,), (1, 0)]
    assert a.repeat(3).gates == (Gate((0, 1), (2, 3), (2, 3)),) * 3
    assert a.repeat(1) == a
    # a circuit whose dims come back may repeat
    back = Circuit(2).gate(0, out=3).gate(0, out=2)
    assert len(back.repeat(2).gates) == 4 and back.repeat(2).out_dims == (2,)


def test_auto_circuit_and_resolve():
    c = Circuit.auto_dims(3).all_pairs()
    assert c.is_auto and c.num_qudits == 3 and c.gates[0] == Gate((1, 2), (), ())
    with pytest.raises(QCError, match="bind it to a layer"):
        c.num_params
    square = c.resolve(4096)
    assert square.in_dims == square.out_dims == (16, 16, 16)
    assert square == Circuit(16, 16, 16).all_pairs()
    wide = c.resolve(4096, 11008)
    assert math.prod(wide.in_dims) == 4096 and math.prod(wide.out_dims) == 11008
    # dims change at the last gate on each qudit
    for g in wide.gates:
        last = {q: max(k for k, h in enumerate(wide.gates) if q in h.qudits) for q in g.qudits}
        k = wide.gates.index(g)
        for q, i, o in zip(g.qudits, g.in_dims, g.out_dims):
            assert (i == o) or last[q] == k
    concrete = Circuit(16, 16, 16).all_pairs()
    assert concrete.resolve(4096) is concrete
    with pytest.raises(QCError, match="does not fit"):
        concrete.resolve(4096, 11008)


def test_balanced_factors():
    assert balanced_factors(4096, 4) == (8, 8, 8, 8)
    assert balanced_factors(4096, 3) == (16, 16, 16)
    assert balanced_factors(7, 2) == (7, 1)
    for n, parts in [(768, 3), (11008, 3), (3072, 4), (1, 2), (97 * 4, 2)]:
        f = balanced_factors(n, parts)
        assert math.prod(f) == n and len(f) == parts and list(f) == sorted(f, reverse=True)
    assert balanced_factors(768, 3) == (12, 8, 8)


def test_build_gates_declared_outputs():
    ins, gates = build_gates([2, 3], [GateSpec((0, 1)), GateSpec((1,))], out_dims=[5, 7])
    assert ins == (2, 3)
    assert gates == (Gate((0, 1), (2, 3), (5, 3)), Gate((1,), (3,), (7,)))
    with pytest.raises(QCError, match="not reached"):
        build_gates([2, 3], [GateSpec((0,))], out_dims=[2, 4])


def test_equality_ignores_spans():
    span = Span("f.qc", 3, 5, "gate (0, 1)")
    g1, g2 = Gate((0, 1), (2, 2), (2, 2), span), Gate((0, 1), (2, 2), (2, 2))
    assert g1 == g2 and hash(g1) == hash(g2)
    assert Pattern("q", span=span) == Pattern("q")
    assert ApplyRule("c", (Pattern("q"),), span) == ApplyRule("c", (Pattern("q"),))
    c1 = Circuit(2, 2, gates=(g1,), span=span)
    assert c1 == Circuit(2, 2).gate((0, 1)) and hash(c1) == hash(Circuit(2, 2).gate((0, 1)))
    assert Circuit(2, 2).gate((0, 1)) != Circuit(2, 2).gate((1, 0))
    assert Circuit(2, 2).gate((0, 1)) != Circuit(2, 3).gate((0, 1))
    assert Circuit.auto_dims(2).gate((0, 1)) != Circuit.auto_dims(3).gate((0, 1))
    assert Program({"c": c1}, options={"scale": 2}) == Program({"c": Circuit(2, 2).gate((0, 1))},
                                                                 options={"scale": 2.0})
    assert Program({"c": c1}) != Program({"d": c1})


def test_options():
    assert check_option("scale", 2) == 2.0 and isinstance(check_option("scale", 2), float)
    assert check_option("init", "zero_last") == "zero_last"
    assert Program({}).option("scale") == 1.0
    assert Program({}, options={"dropout": 0.5}).option("dropout") == 0.5


def test_pattern_matching():
    assert Pattern("q_proj").matches("model.layers.0.self_attn.q_proj")
    assert Pattern("q_proj").matches("q_proj")
    assert not Pattern("q_proj").matches("model.layers.0.self_attn.kq_proj")
    assert Pattern("self_attn.q_proj").matches("layers.0.self_attn.q_proj")
    assert not Pattern("self_attn.q_proj").matches("layers.0.xself_attn.q_proj")
    assert Pattern(r"layers\.[01]\.", regex=True).matches("model.layers.1.mlp")
    assert Pattern(r"a\/b", regex=True) == Pattern("a/b", regex=True)
    assert str(Pattern("x", regex=True)) == "/x/"


def test_summary():
    text = circuit_summary(Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), out=(16, 43)))
    assert "qudits      3: 16 16 16 -> 16 16 43" in text
    assert "features    4096 -> 11008" in text
    assert "65,536 params" in text and "176,128 params" in text
    assert text.splitlines()[-1] == f"parameters  {65536 + 176128:,}"
    assert Circuit(16, 8, 8, 4).all_pairs().summary().endswith("parameters  43,008")
    auto = Circuit.auto_dims(2).all_pairs().summary()
    assert "auto" in auto and "(0,1)" in auto


def test_summary_elides_long_circuits():
    c = Circuit(2, 2, 2).all_pairs().repeat(30)  # 90 gates
    lines = c.summary(max_gates=10).splitlines()
    assert "  … 80 more gates …" in lines
    gate_lines = [line for line in lines if line.startswith("  #")]
    assert len(gate_lines) == 10 and gate_lines[0].startswith("  #0 ")
    assert gate_lines[-1].startswith("  #89")
    assert lines[-1] == f"parameters  {90 * 16:,}"
    assert len(c.summary().splitlines()) == 3 + 50 + 1 + 1


def test_parameter_cap_applies_where_a_layer_or_text_sets_the_dims():
    from qcircuit.limits import MAX_PARAMS
    big = Circuit(2**15).gate(0)  # the builder draws it: 2**30 parameters
    assert big.num_params == 2**30 > MAX_PARAMS
    with pytest.raises(QCError, match="over the limit of 268435456"):
        parse(big.to_qc(name="big"))
    with pytest.raises(QCError, match="over the limit of 268435456"):
        Circuit.auto_dims(1).gate(0).resolve(2**15)
    assert Circuit.auto_dims(1).gate(0).resolve(2**14).num_params == MAX_PARAMS


def test_gate_cap_in_the_builder():
    from qcircuit.limits import MAX_GATES
    assert len(Circuit(2).gate(0).repeat(MAX_GATES).gates) == MAX_GATES
    with pytest.raises(QCError, match=f"at most {MAX_GATES}"):
        Circuit(2).gate(0).repeat(MAX_GATES).gate(0)
    with pytest.raises(QCError, match=f"at most {MAX_GATES}"):
        Circuit(2, gates=[Gate((0,), (2,), (2,))] * (MAX_GATES + 1))


# --- the builder says what the text says (issue 16) ----------------------------------------

def test_program_builder_matches_the_text():
    attn, lora = Circuit(8, 8, 6).all_pairs(), Circuit.low_rank(8)
    built = (Program()
             .define("attn", attn)
             .define("lora", lora)
             .apply("attn", "query", "value")
             .apply("lora", "query", Pattern("value"), init="zero_last", scale=2)
             .with_options(dropout=0.1))
    text = parse("circuit attn { qudits 8 8 6 all_pairs }\ncircuit lora { low_rank 8 }\n"
                 "apply attn to query, value\n"
                 "apply lora to query, value with init = zero_last, scale = 2\n"
                 "option dropout = 0.1\n")
    assert built == text
    assert parse(built.to_qc()) == built
    assert built.options_for(built.rules[1]) == {"init": "zero_last", "scale": 2.0,
                                                 "dropout": 0.1}


def test_program_builder_is_frozen_and_returns_new_programs():
    empty = Program()
    assert dict(empty.circuits) == {} and empty.rules == () and dict(empty.options) == {}
    one = empty.define("c", Circuit(2).gate(0))
    two = one.apply("c", "/layers\\.[0-3]\\.q_proj$/", "self_attn.v_proj")
    assert dict(empty.circuits) == {} and one.rules == () and len(two.rules) == 1
    assert two.rules[0].patterns == (Pattern("layers\\.[0-3]\\.q_proj$", regex=True),
                                     Pattern("self_attn.v_proj"))
    assert two.rules[0].patterns[0].matches("model.layers.2.q_proj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        two.rules = ()
    with pytest.raises(TypeError):
        two.rules[0].options["scale"] = 3.0


def test_program_builder_errors():
    p = Program().define("lora", Circuit.low_rank(8))
    with pytest.raises(QCError, match="unknown circuit 'attn'") as info:
        p.apply("attn", "q_proj")
    assert info.value.expected == "lora"
    with pytest.raises(QCError, match="unknown option 'rank'"):
        p.apply("lora", "q_proj", rank=8)
    with pytest.raises(QCError, match="dropout must be in"):
        p.apply("lora", "q_proj", dropout=1.0)
    with pytest.raises(QCError, match="already defined"):
        p.define("lora", Circuit.low_rank(4))
    with pytest.raises(QCError, match="bad module pattern"):
        p.apply("lora", "q proj")


def test_low_rank_builder_and_resolve():
    lora = Circuit.low_rank(8)
    assert lora == Circuit.auto_dims(1).gate(0, out=8).gate(0)
    wide = lora.resolve(64, 172)
    assert wide.in_dims == (64,) and wide.out_dims == (172,)
    assert wide.num_params == 64 * 8 + 8 * 172
    assert wide == Circuit.low_rank(8, 64, 172)
    assert Circuit.low_rank(8, 16) == Circuit(16).gate(0, out=8).gate(0, out=16)
    with pytest.raises(QCError, match="bind it to a layer"):
        lora.num_params


def test_auto_gate_output_dims_resolve():
    c = Circuit.auto_dims(2).gate((0, 1), out=(2, 3)).gate((0, 1))
    r = c.resolve(6 * 4, 5 * 5)  # 6x4 -> 5x5
    assert [(g.in_dims, g.out_dims) for g in r.gates] == [((6, 4), (2, 3)), ((2, 3), (5, 5))]
    with pytest.raises(QCError, match="no gate acts on it"):
        Circuit.auto_dims(2).gate(0).resolve(6, 15)  # qudit 1: 2 -> 3 with no gate
    with pytest.raises(QCError, match="writes output dim 3"):
        Circuit.auto_dims(1).gate(0, out=3).resolve(6, 15)


def test_low_rank_compiles_to_its_rank_and_lora_parameter_count():
    import torch
    from qcircuit.compiler import compile
    plan = compile(Circuit.low_rank(8).resolve(64, 172))
    assert plan.rank_bound == 8 and plan.num_params == 64 * 8 + 8 * 172
    assert compile(Circuit.low_rank(8).resolve(4, 6)).rank_bound == 4  # capped by the layer
    module = plan.module().double()
    a, b = (g.detach() for g in module.gates)  # shapes (8, 64) and (172, 8)
    dense = module.matrix().detach()
    assert dense.shape == (172, 64)
    assert torch.linalg.norm(dense - b @ a) <= 1e-12 * torch.linalg.norm(b @ a)
    assert torch.linalg.matrix_rank(dense).item() == 8


# --- the builder validates as the parser does (issue 22) --------------------------------------
@pytest.mark.parametrize("n", [None, 10**30, 4096, 65, 0, -1, 2.0, "3", True])
def test_auto_dims_takes_a_bounded_qudit_count(n):
    with pytest.raises(QCError, match=r"Circuit\.auto_dims takes a qudit count from 1 to 64"):
        Circuit.auto_dims(n)
    assert Circuit.auto_dims(64).all_pairs().num_qudits == 64


@pytest.mark.parametrize("qudits", [(0, [2, 2]), (0, None), (0.5,), (-1,), range(10**9),
                                    tuple(range(65))])
def test_gate_qudits_are_bounded_integers(qudits):
    with pytest.raises(QCError, match="a gate's qudits are up to 64 non-negative integer"):
        Circuit(2, 2).gate(qudits)


@pytest.mark.parametrize("call", [
    lambda: Circuit(range(10**12)), lambda: Circuit(2, 2).gate((0, 1), range(10**12)),
    lambda: Circuit().repeat(10**30), lambda: Circuit(2).then(5),
    lambda: Program({"c": 5}), lambda: Program({}, (5,)),
    lambda: Program().define("c", Circuit(2).gate(0)).apply("c", "a" * 2000)])
def test_hostile_builder_arguments_are_qcerrors(call):
    with pytest.raises(QCError):
        call()


@pytest.mark.parametrize("text", ["a\rb", "a\nb", "q_proj\r"])
def test_a_regex_holding_a_line_break_is_refused_where_it_is_made(text):
    with pytest.raises(QCError, match="cannot hold a line break"):
        Pattern(text, regex=True)


def test_a_regex_holding_a_cr_does_not_parse_so_every_parsed_program_prints():
    with pytest.raises(QCError, match="cannot hold a line break") as info:
        parse("circuit c { qudits 2 gate (0) }\napply c to /a\rb/\n")
    assert (info.value.line, info.value.column) == (2, 14)   # at the CR
