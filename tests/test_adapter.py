"""The adapted layer and the Adapted handle, on tiny LLaMA (nn.Linear) and GPT-2 (Conv1D)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import ApplyRule, Circuit, Pattern, Program, QCError
from qcircuit.runtime.adapter import AdaptedLayer, attach
from reference import circuit_operator

SQUARE = Circuit(4, 4, 4).all_pairs()                              # 64 -> 64, 3 gates
UP = Circuit(4, 4, 4).gate((0, 1)).gate((1, 2), out=(1, 43))       # 64 -> 172, non-square
DOWN = Circuit(4, 43).gate((0, 1), out=(4, 16)).gate(1)            # 172 -> 64, non-square
AUTO = Circuit.auto_dims(3).all_pairs()


def adapter_program(rules: dict[str, tuple[Circuit, tuple[str, ...]]], **options) -> Program:
    """A Program from {circuit name: (circuit, patterns)} and options."""
    return Program({k: c for k, (c, _) in rules.items()},
                   tuple(ApplyRule(k, tuple(Pattern(p) for p in pats))
                         for k, (_, pats) in rules.items()), options)


def llama_program(**options) -> Program:
    return adapter_program({"attn": (SQUARE, ("q_proj", "v_proj")), "up": (UP, ("up_proj",)),
                            "down": (DOWN, ("down_proj",))}, **options)


def gpt2_program(**options) -> Program:
    return adapter_program({"a": (AUTO, ("c_attn", "c_fc")), "p": (SQUARE, ("attn.c_proj",))},
                           **options)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def perturb(adapted, amount: float = 0.05, seed: int = 7) -> None:
    """Move every trainable gate, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=p.dtype))


MODELS = [("tiny_llama", llama_program), ("tiny_gpt2", gpt2_program)]


@pytest.mark.parametrize("fixture,program", MODELS)
@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_outputs_at_init_equal_base(request, token_ids, fixture, program, init):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        before = model(token_ids).logits
        adapted = attach(model, program(init=init), seed=0)
        after = adapted(token_ids).logits
    assert torch.equal(after, before)   # bit for bit: nothing folded yet, the delta is 0
    assert not any(layer.folded for layer in adapted.layers.values())
    assert adapted.targets and all(isinstance(model.get_submodule(t.module_name), AdaptedLayer)
                                   for t in adapted.targets)


@pytest.mark.parametrize("fixture,program", MODELS)
def test_only_gates_train_and_count_matches_circuits(request, fixture, program):
    model = request.getfixturevalue(fixture)
    adapted = attach(model, program())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapted.trainable_parameters()}
    expected = sum(t.circuit.num_params for t in adapted.targets)
    assert sum(p.numel() for p in trainable) == expected == adapted.num_trainable
    frozen = [p for layer in adapted.layers.values() for p in layer.frozen.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("fixture,program", MODELS)
def test_first_training_forward_folds_within_float32_rounding(request, token_ids, fixture,
                                                            program):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        before = model(token_ids).logits
    adapted = attach(model, program(), seed=0)
    after = adapted(token_ids).logits          # grad enabled: folds, then one circuit
    assert all(layer.folded for layer in adapted.layers.values())
    assert rel_err(after, before) <= 3e-6      # measured 0.6e-6 .. 1.6e-6
    with torch.no_grad():
        assert rel_err(adapted(token_ids).logits, after) == 0.0


def _layer_case(kind: str, init: str, scale: float):
    torch.manual_seed(11)
    circuit = UP if kind == "linear" else SQUARE.resolve(64, 64)
    base = nn.Linear(64, circuit.out_features) if kind == "linear" else Conv1D(64, 64)
    w0 = (base.weight.detach().t() if kind == "conv1d" else base.weight.detach()).double().clone()
    b0 = base.bias.detach().double().clone()
    layer = AdaptedLayer(base, circuit, init=init, scale=scale, dropout=0.0)
    init_gates = [g.detach().clone() for g in layer.adapter.gates]
    with torch.no_grad():
        for g in layer.adapter.gates:
            g.add_(0.1 * torch.randn_like(g))
    return layer, circuit, w0, b0, init_gates


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_layer_matches_dense_float64_reference(kind, init, scale):
    layer, circuit, w0, b0, init_gates = _layer_case(kind, init, scale)
    t = circuit_operator(circuit, layer.adapter.gates)
    t0 = circuit_operator(circuit, init_gates) if init == "freeze_one" else torch.zeros_like(t)
    x = torch.randn(3, 5, 64)
    want = x.double() @ (w0 + scale * (t - t0)).t() + b0
    with torch.no_grad():
        unfolded = layer(x)
    assert not layer.folded
    folded = layer(x)
    assert layer.folded == (init == "freeze_one")
    assert folded.shape == unfolded.shape == (3, 5, circuit.out_features)
    assert rel_err(unfolded, want) < 1e-5 and rel_err(folded, want) < 1e-5
    layer.merge()   # the merged weight is the same map
    assert rel_err(layer(x), want) < 1e-5
    merged_w = layer.base_layer.weight.detach().double()
    merged_w = merged_w.t() if kind == "conv1d" else merged_w
    assert rel_err(merged_w, w0 + scale * (t - t0)) < 1e-6


def test_scale_multiplies_the_delta(tiny_llama, token_ids):
    deltas = []
    for scale in (1.0, 3.0):
        model = type(tiny_llama)(tiny_llama.config).eval()
        model.load_state_dict(tiny_llama.state_dict())
        with torch.no_grad():
            base = model(token_ids).logits
            layer_in = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
            adapted = attach(model, llama_program(scale=scale), seed=3)
            perturb(adapted)
            q = model.model.layers[0].self_attn.q_proj
            deltas.append(q(layer_in) - q.base_layer(layer_in))
            assert q.scale == scale
            assert not torch.allclose(adapted(token_ids).logits, base)
    assert torch.allclose(deltas[1], 3.0 * deltas[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_dropout_applies_to_adapter_input_only(init):
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = AdaptedLayer(base, SQUARE, init=init, scale=1.0, dropout=0.5)
    with torch.no_grad():
        for g in layer.adapter.gates:
            g.add_(0.1 * torch.randn_like(g))
    t = circuit_operator(SQUARE, layer.adapter.gates)
    if layer.frozen is not None:
        t = t - circuit_operator(SQUARE, layer.frozen.gates)
    x = torch.randn(4, 64)
    layer.train()
    layer.fold()
    assert not layer.folded  # with dropout, both circuits must see the same dropout(x)
    torch.manual_seed(5)
    got = layer(x)
    assert not layer.folded
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    # base path sees x, undropped; the delta (T − T0) sees dropout(x)
    want = base(x).double() + dropped.double() @ t.t()
    assert rel_err(got, want) < 1e-5
    layer.eval()
    assert rel_err(layer(x), base(x).double() + x.double() @ t.t()) < 1e-5


@pytest.mark.parametrize("fixture,program", MODELS)
@pytest.mark.parametrize("fold", [False, True])
def test_merge_unmerge_keep_outputs(request, token_ids, fixture, program, fold):
    model = request.getfixturevalue(fixture)
    adapted = attach(model, program(), seed=1)
    if fold:
        adapted.fold()
    perturb(adapted)
    with torch.no_grad():
        ref = adapted(token_ids).logits
        with pytest.raises(QCError, match="not merged"):
            adapted.unmerge()
        adapted.merge()
        assert adapted.merged
        assert rel_err(adapted(token_ids).logits, ref) < 1e-5
        with pytest.raises(QCError, match="already merged"):
            adapted.merge()
        with pytest.raises(QCError, match="unmerge before"):
            adapted.fold()
        adapted.unmerge()
        assert not adapted.merged
        assert rel_err(adapted(token_ids).logits, ref) < 1e-5


@pytest.mark.parametrize("fixture,program", MODELS)
def test_merge_and_unload_gives_plain_model(request, token_ids, fixture, program):
    model = request.getfixturevalue(fixture)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = attach(model, program(), seed=2)
    perturb(adapted)
    with torch.no_grad():
        ref = adapted(token_ids).logits
        plain = adapted.merge_and_unload()
        out = plain(token_ids).logits
    assert plain is model
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    kinds = {type(plain.get_submodule(t.module_name)) for t in adapted.targets}
    assert kinds == ({nn.Linear} if fixture == "tiny_llama" else {Conv1D})
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(QCError, match="unloaded"):
        adapted.merge()


def test_seed_makes_gates_reproducible(tiny_llama_config):
    from transformers import LlamaForCausalLM
    gates = []
    for _ in range(2):
        adapted = attach(LlamaForCausalLM(tiny_llama_config), llama_program(), seed=42)
        gates.append([g.detach().clone() for g in adapted.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gates))


def test_handle_is_callable_like_the_model_and_summarises(tiny_llama, token_ids):
    adapted = attach(tiny_llama, llama_program())
    assert adapted.model is tiny_llama and adapted.config is tiny_llama.config
    assert torch.equal(adapted(token_ids).logits, tiny_llama(token_ids).logits)
    text = str(adapted)
    assert "model.layers.1.mlp.up_proj" in text and "64 -> 172" in text
    assert f"{adapted.num_trainable:,}" in text and "%" in text
    assert len(adapted.targets) == 8   # q, v, up, down in 2 layers
    pct = 100 * adapted.num_trainable / adapted.num_base
    assert f"{pct:.4f} %" in text
    assert adapted.num_base == sum(p.numel() for p in type(tiny_llama)(
        tiny_llama.config).parameters())


def test_attach_twice_is_refused(tiny_llama):
    attach(tiny_llama, llama_program())
    with pytest.raises(QCError, match="already carries"):
        attach(tiny_llama, llama_program())


def test_attach_rejects_bad_argument(tiny_llama):
    with pytest.raises(QCError, match="Program or a .qc path"):
        attach(tiny_llama, 42)


def test_attach_on_meta_device_keeps_real_gates(tiny_llama_config):
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config)
    adapted = attach(model, llama_program(), seed=0)
    for layer in adapted.layers.values():
        assert layer.base_layer.weight.is_meta and not layer.folded
        for g in list(layer.adapter.gates) + list(layer.frozen.gates):
            assert g.device.type == "cpu" and not g.is_meta
        assert all(torch.equal(a, b) for a, b in zip(layer.adapter.gates, layer.frozen.gates))
    assert adapted.num_trainable == sum(t.circuit.num_params for t in adapted.targets)
    with pytest.raises(QCError, match="meta device"):
        adapted.merge()


def test_unfolded_layer_computes_exact_formula():
    """A freeze_one layer not folded yet (no training forward, or meta) runs both circuits."""
    torch.manual_seed(0)
    base = nn.Linear(64, 172)
    layer = AdaptedLayer(base, UP, init="freeze_one", scale=0.5, dropout=0.0)
    x = torch.randn(6, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
        for g in layer.adapter.gates:
            g.add_(0.1 * torch.randn_like(g))
        t = circuit_operator(UP, layer.adapter.gates)
        t0 = circuit_operator(UP, layer.frozen.gates)
        want = base(x).double() + 0.5 * x.double() @ (t - t0).t()
        assert rel_err(layer(x), want) < 1e-5
    assert not layer.folded


def test_attach_reads_a_qc_file(tmp_path, tiny_llama, token_ids):
    from qcircuit.runtime import attach as exported
    path = tmp_path / "adapter.qc"
    path.write_text("circuit attn {\n    qudits auto 3\n    all_pairs\n}\n"
                    "apply attn to q_proj, /mlp\\.down_proj$/\noption init = zero_last\n")
    adapted = exported(tiny_llama, str(path))
    assert [t.module_name.rsplit(".", 1)[-1] for t in adapted.targets] == [
        "q_proj", "q_proj", "down_proj", "down_proj"]
    assert adapted.program.option("init") == "zero_last"
    down = adapted.layers["model.layers.0.mlp.down_proj"]
    assert (down.circuit.in_features, down.circuit.out_features) == (172, 64)
    with pytest.raises(QCError):
        attach(type(tiny_llama)(tiny_llama.config), tmp_path / "missing.qc")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradcheck_inputs_and_gates(kind):
    torch.manual_seed(0)
    circuit = Circuit(2, 2, 3).all_pairs().gate((0, 2), out=(3, 3))    # 12 -> 18
    base = (nn.Linear(12, 18) if kind == "linear" else Conv1D(18, 12)).double()
    layer = AdaptedLayer(base, circuit, init="freeze_one", scale=0.7, dropout=0.0)
    assert layer.adapter.gates[0].dtype == torch.float64
    names = [f"adapter.gates.{i}" for i in range(len(circuit.gates))]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    gates = [g.detach().clone().requires_grad_(True) for g in layer.adapter.gates]

    def f(x, *gates):
        return torch.func.functional_call(layer, dict(zip(names, gates)), (x,))

    assert torch.autograd.gradcheck(f, (x, *gates))
    assert layer.folded
