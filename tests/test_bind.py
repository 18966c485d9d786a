"""Binding programs to modules: patterns, auto resolution, Conv1D, and every error kind."""
from __future__ import annotations

import math

import pytest

from qcircuit import QCError
from qcircuit.errors import Span
from qcircuit.ir import ApplyRule, Circuit, Pattern, Program
from qcircuit.runtime import Target, bind
from qcircuit.runtime.bind import by_layer


def program(rules, **circuits):
    return Program(circuits=circuits,
                   rules=tuple(ApplyRule(c, tuple(Pattern(p[1:-1], regex=True)
                                                  if p.startswith("/") else Pattern(p)
                                                  for p in pats))
                               for c, pats in rules))


def test_suffix_patterns_on_tiny_llama(tiny_llama):
    attn = Circuit(8, 8).all_pairs()
    targets = bind(tiny_llama, program([("attn", ["q_proj", "v_proj"])], attn=attn))
    assert [t.module_name for t in targets] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    for t in targets:
        assert isinstance(t, Target)
        assert (t.in_features, t.out_features, t.kind) == (64, 64, "linear")
        assert t.circuit == attn and t.circuit_name == "attn"
    assert [t.pattern for t in targets] == ["q_proj"] * 2 + ["v_proj"] * 2


def test_full_dotted_suffix_and_exact_name(tiny_llama):
    c = Circuit(8, 8).all_pairs()
    targets = bind(tiny_llama, program([("c", ["layers.1.self_attn.o_proj"])], c=c))
    assert [t.module_name for t in targets] == ["model.layers.1.self_attn.o_proj"]
    # a suffix must end at a dot: "proj" is not a suffix of "q_proj"
    with pytest.raises(QCError, match="matches no module"):
        bind(tiny_llama, program([("c", ["proj"])], c=c))


def test_regex_patterns(tiny_llama):
    c = Circuit(8, 8).all_pairs()
    targets = bind(tiny_llama, program([("c", [r"/layers\.1\..*\.(q|k)_proj$/"])], c=c))
    assert [t.module_name for t in targets] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert targets[0].pattern == r"/layers\.1\..*\.(q|k)_proj$/"


def test_auto_resolution_non_square(tiny_llama):
    auto = Circuit.auto_dims(2).all_pairs()
    targets = bind(tiny_llama, program([("up", ["up_proj", "down_proj"])], up=auto))
    up, down = targets[0], targets[2]
    assert (up.in_features, up.out_features) == (64, 172)
    assert up.circuit == auto.resolve(64, 172)
    assert up.circuit.in_dims == (8, 8) and math.prod(up.circuit.out_dims) == 172
    assert (down.circuit.in_features, down.circuit.out_features) == (172, 64)
    assert not up.circuit.is_auto and not down.circuit.is_auto
    # same circuit and layer shape -> the same resolved circuit object
    assert targets[0].circuit is targets[1].circuit


def test_concrete_non_square_circuit_fits(tiny_llama):
    up = Circuit(8, 8).gate((0, 1), out=(43, 4))
    targets = bind(tiny_llama, program([("up", ["gate_proj"])], up=up))
    assert len(targets) == 2 and targets[0].circuit == up


def test_gpt2_conv1d_layers(tiny_gpt2):
    auto = Circuit.auto_dims(2).all_pairs()
    targets = bind(tiny_gpt2, program([("a", ["c_attn", "mlp.c_proj"])], a=auto))
    by_name = {t.module_name: t for t in targets}
    qkv = by_name["transformer.h.0.attn.c_attn"]
    assert (qkv.kind, qkv.in_features, qkv.out_features) == ("conv1d", 64, 192)
    assert tuple(tiny_gpt2.get_submodule(qkv.module_name).weight.shape) == (64, 192)
    assert (qkv.circuit.in_features, qkv.circuit.out_features) == (64, 192)
    proj = by_name["transformer.h.1.mlp.c_proj"]
    assert (proj.kind, proj.in_features, proj.out_features) == ("conv1d", 256, 64)
    assert "transformer.h.0.attn.c_proj" not in by_name  # "mlp.c_proj" is a dotted suffix


def test_two_rules(tiny_llama):
    p = program([("attn", ["q_proj"]), ("mlp", ["down_proj"])],
                attn=Circuit(8, 8).all_pairs(), mlp=Circuit(43, 4).gate((0, 1), out=(8, 8)))
    targets = bind(tiny_llama, p)
    assert [t.circuit_name for t in targets] == ["attn", "attn", "mlp", "mlp"]


def test_pattern_matching_nothing(tiny_llama):
    with pytest.raises(QCError) as info:
        bind(tiny_llama, program([("c", ["query"])], c=Circuit(8, 8).all_pairs()))
    text = str(info.value)
    assert "'query'" in text and "LlamaForCausalLM" in text and "q_proj" in text


def test_pattern_matching_a_non_linear_module(tiny_llama):
    with pytest.raises(QCError, match=r"'model.layers.0.self_attn'.*LlamaAttention.*not a linear"):
        bind(tiny_llama, program([("c", ["self_attn"])], c=Circuit(8, 8).all_pairs()))
    with pytest.raises(QCError, match="not a linear layer"):
        bind(tiny_llama, program([("c", [r"/mlp/"])], c=Circuit(8, 8).all_pairs()))


def test_same_circuit_twice_on_a_layer(tiny_llama):
    c = Circuit(8, 8).all_pairs()
    with pytest.raises(QCError, match=r"circuit 'c' is applied twice to module "
                                      r"'model.layers.0.self_attn.q_proj'"):
        bind(tiny_llama, program([("c", ["q_proj", "self_attn.q_proj"])], c=c))
    with pytest.raises(QCError, match="applied twice"):
        bind(tiny_llama, program([("c", ["q_proj"]), ("c", [r"/[qk]_proj$/"])], c=c))


def test_different_circuits_on_a_layer_are_branches(tiny_llama):
    c = Circuit(8, 8).all_pairs()
    targets = bind(tiny_llama, program([("c", ["q_proj"]), ("d", [r"/[qk]_proj$/"])], c=c, d=c))
    layers = by_layer(targets)
    q = "model.layers.0.self_attn.q_proj"
    assert [t.circuit_name for t in layers[q]] == ["c", "d"]
    assert [t.circuit_name for t in layers["model.layers.0.self_attn.k_proj"]] == ["d"]


def test_circuit_that_does_not_fit(tiny_llama):
    with pytest.raises(QCError) as info:
        bind(tiny_llama, program([("attn", ["up_proj"])], attn=Circuit(8, 8).all_pairs()))
    text = str(info.value)
    assert "model.layers.0.mlp.up_proj" in text
    assert "64 -> 172" in text and "qudits 8 8: 64 -> 64 features" in text and "'attn'" in text


def test_auto_circuit_that_cannot_reach_the_output(tiny_llama):
    # 64 -> 172: inputs 4 4 4, outputs 43 2 2; qudit 2 has no gate to change its dim
    c = Circuit.auto_dims(3).gate((0, 1))
    with pytest.raises(QCError) as info:
        bind(tiny_llama, program([("c", ["up_proj"])], c=c))
    text = str(info.value)
    assert "model.layers.0.mlp.up_proj" in text and "64 -> 172" in text and "auto 3" in text


def test_errors_keep_the_pattern_location(tiny_llama):
    span = Span("adapter.qc", 7, 15, "apply attn to up_proj")
    rule = ApplyRule("attn", (Pattern("up_proj", span=span),), span=Span("adapter.qc", 7, 1))
    p = Program(circuits={"attn": Circuit(8, 8).all_pairs()}, rules=(rule,))
    with pytest.raises(QCError) as info:
        bind(tiny_llama, p)
    assert (info.value.file, info.value.line, info.value.column) == ("adapter.qc", 7, 15)
    assert "apply attn to up_proj" in str(info.value)
    # without a pattern span the rule's span is used
    rule = ApplyRule("attn", (Pattern("nothing"),), span=Span("adapter.qc", 9, 1))
    with pytest.raises(QCError) as info:
        bind(tiny_llama, Program(circuits={"attn": Circuit(8, 8)}, rules=(rule,)))
    assert info.value.line == 9


def test_program_without_rules(tiny_llama):
    with pytest.raises(QCError, match="no 'apply' rule"):
        bind(tiny_llama, Program(circuits={"c": Circuit(8, 8).all_pairs()}))


def test_binding_a_meta_model():
    from qcircuit.runtime import load_model

    model = load_model("llama-2-7b").model
    targets = bind(model, program([("attn", ["q_proj", "v_proj"])],
                                  attn=Circuit(16, 8, 8, 4).all_pairs()))
    assert len(targets) == 64
    assert sum(t.circuit.num_params for t in targets) == 2_752_512


def test_bad_regex_is_a_qcerror(tiny_llama):
    with pytest.raises(QCError, match=r"bad regex '/q_proj\(/'"):
        bind(tiny_llama, program([("c", ["/q_proj(/"])], c=Circuit(8, 8).all_pairs()))
