"""The adapted layer and the Adapted handle, on tiny LLaMA (nn.Linear) and GPT-2 (Conv1D)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import ApplyRule, Circuit, Pattern, Program, QCError, parse
from qcircuit.runtime import AdaptedLayer, LayerState, attach
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
    """Three circuits on a tiny LLaMA; init freeze_one unless told (its frozen copy and
    fold are what most tests here exercise)."""
    return adapter_program({"attn": (SQUARE, ("q_proj", "v_proj")), "up": (UP, ("up_proj",)),
                            "down": (DOWN, ("down_proj",))}, **{"init": "freeze_one", **options})


def gpt2_program(**options) -> Program:
    """Two circuits on a tiny GPT-2 (Conv1D layers); init freeze_one unless told."""
    return adapter_program({"a": (AUTO, ("c_attn", "c_fc")), "p": (SQUARE, ("attn.c_proj",))},
                           **{"init": "freeze_one", **options})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ``‖a − b‖ / ‖b‖`` (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


EPS32 = torch.finfo(torch.float32).eps


def fold_amplification(adapted) -> float:
    """How much a fold magnifies float32 rounding: the largest ``‖s·T_θ0‖ / ‖W0‖`` of any
    layer (``W'·x`` and ``T_θ·x`` are that much larger than ``W0·x`` and cancel)."""
    worst = 1.0
    for layer in adapted.layers.values():
        if layer.frozen is not None:
            w0 = layer.base_layer.weight.detach().double() + 0.0
            w0 = w0 - layer.offset64().to(w0).t() if layer.transposed else \
                w0 - layer.offset64().to(w0)
            t0 = abs(layer.scale) * circuit_operator(layer.circuit, layer.frozen.gates)
            worst = max(worst, (torch.linalg.vector_norm(t0) / torch.linalg.vector_norm(w0)).item())
    return worst


def perturb(adapted, amount: float = 0.05, seed: int = 7) -> None:
    """Move every trainable gate, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=p.dtype))


MODELS = [("tiny_llama", llama_program), ("tiny_gpt2", gpt2_program)]


@pytest.mark.parametrize("fixture,program", MODELS)
@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_unfolded_outputs_at_init_equal_base_bit_for_bit(request, token_ids, fixture, program,
                                                          init):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        before = model(token_ids).logits
        adapted = attach(model, program(init=init), seed=0, fold=False)
        after = adapted(token_ids).logits
    assert torch.equal(after, before)   # the same float ops on the same numbers: delta is 0
    assert set(adapted.states.values()) == {LayerState.UNFOLDED}
    assert adapted.targets and all(isinstance(model.get_submodule(t.module_name), AdaptedLayer)
                                   for t in adapted.targets)


@pytest.mark.parametrize("fixture,program", MODELS)
@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_attach_folds_freeze_one_within_float32_rounding(request, token_ids, fixture, program,
                                                         init):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        before = model(token_ids).logits
    adapted = attach(model, program(init=init), seed=0)
    want = LayerState.FOLDED if init == "freeze_one" else LayerState.UNFOLDED
    assert set(adapted.states.values()) == {want}
    with torch.no_grad():
        after = adapted(token_ids).logits
    if init == "zero_last":
        assert torch.equal(after, before)
    else:  # rounding of W' = W0 − T0 and of T·x, magnified by the cancellation
        assert rel_err(after, before) <= 64 * EPS32 * fold_amplification(adapted)


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
@pytest.mark.parametrize("fold", [False, True])
def test_forward_changes_no_state(request, token_ids, fixture, program, fold, monkeypatch):
    """Training and eval forwards write no parameter, buffer or module attribute."""
    model = request.getfixturevalue(fixture)
    adapted = attach(model, program(dropout=0.0), seed=0, fold=fold)
    states = adapted.states
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    versions = {n: t._version for n, t in tensors.items()}
    values = {n: t.detach().clone() for n, t in tensors.items()}
    writes = []
    real_setattr = nn.Module.__setattr__

    def spy(self, name, value):
        writes.append((type(self).__name__, name))
        real_setattr(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", spy)
    for mode in (model.train, model.eval):
        mode()
        writes.clear()
        adapted(input_ids=token_ids, labels=token_ids).loss.backward()
        assert [w for w in writes if w[1] != "training"] == []
    monkeypatch.undo()
    assert adapted.states == states
    assert {n: t._version for n, t in tensors.items()} == versions
    assert all(torch.equal(t, values[n]) for n, t in tensors.items())


def _layer_case(kind: str, init: str, scale: float):
    torch.manual_seed(11)
    circuit = UP if kind == "linear" else SQUARE.resolve(64, 64)
    base = nn.Linear(64, circuit.out_features) if kind == "linear" else Conv1D(64, 64)
    w0 = (base.weight.detach().t() if kind == "conv1d" else base.weight.detach()).double().clone()
    b0 = base.bias.detach().double().clone()
    layer = AdaptedLayer.of(base, circuit, init=init, scale=scale, dropout=0.0)
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
    assert layer.state is LayerState.UNFOLDED
    layer.fold()
    assert layer.folded == (init == "freeze_one")
    folded = layer(x)
    assert folded.shape == unfolded.shape == (3, 5, circuit.out_features)
    assert rel_err(unfolded, want) < 1e-5 and rel_err(folded, want) < 1e-5
    layer.merge()   # the merged weight is the same map
    assert rel_err(layer(x), want) < 1e-5
    merged_w = layer.base_layer.weight.detach().double()
    merged_w = merged_w.t() if kind == "conv1d" else merged_w
    assert rel_err(merged_w, w0 + scale * (t - t0)) < 1e-6
    layer.unmerge()
    assert layer.folded == (init == "freeze_one")
    layer.unfold()
    w = layer.base_layer.weight.detach().double()
    assert rel_err(w.t() if kind == "conv1d" else w, w0) < 4 * EPS32 * (1 + scale)


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
    assert rel_err(deltas[1], 3.0 * deltas[0]) < 1e-5


@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_dropout_applies_to_adapter_input_only(init):
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = AdaptedLayer.of(base, SQUARE, init=init, scale=1.0, dropout=0.5)
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
    adapted = attach(model, program(), seed=1, fold=fold)
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
        assert set(adapted.states.values()) == {
            LayerState.FOLDED if fold else LayerState.UNFOLDED}
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
    assert "model.layers.1.mlp.up_proj" in text and "64 -> 172" in text and "folded" in text
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
    with pytest.raises(QCError, match="attach takes a Program, a .qc path or .qc text, got int"):
        attach(tiny_llama, 42)


def test_attach_takes_text_a_path_or_a_program_by_quanta_configs_rule(make_llama, tmp_path,
                                                                      token_ids):
    """Issue 24: ``attach(model, "<qc text>")`` is text, as in ``QuanTAConfig(program=)``."""
    text = "circuit attn { qudits 4 4 4 all_pairs }\napply attn to q_proj, v_proj\n"
    (tmp_path / "a.qc").write_text(text)
    outs = []
    for source in (text, str(tmp_path / "a.qc"), tmp_path / "a.qc", parse(text)):
        adapted = attach(make_llama(), source, seed=3)
        assert adapted.program == parse(text)
        outs.append(adapted(token_ids).logits)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(QCError, match=r"missing\.qc"):   # a .qc name is a path: not found
        attach(make_llama(), str(tmp_path / "missing.qc"))
    with pytest.raises(QCError, match=r"^<string>:1:25: error: unexpected"):   # text is text
        attach(make_llama(), "apply attn to q_proj.qc {")


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
    """A freeze_one layer that is not folded (fold=False, dropout, meta) runs both circuits."""
    torch.manual_seed(0)
    base = nn.Linear(64, 172)
    layer = AdaptedLayer.of(base, UP, init="freeze_one", scale=0.5, dropout=0.0)
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


def test_the_default_init_is_zero_last(tiny_llama, token_ids):
    """A program without ``option init`` attaches zero_last (chosen by measurement,
    docs/choosing.md): no frozen copy, nothing folded, the model exactly unchanged."""
    with torch.no_grad():
        before = tiny_llama(token_ids).logits
    adapted = attach(tiny_llama, adapter_program({"attn": (SQUARE, ("q_proj", "v_proj"))}),
                     seed=0)
    assert adapted.program.option("init") == "zero_last"
    assert set(adapted.states.values()) == {LayerState.UNFOLDED}
    assert all(layer.frozen is None for layer in adapted.layers.values())
    assert all(layer.adapter.gates[0].any() and not layer.adapter.gates[-1].any()
               for layer in adapted.layers.values())
    with torch.no_grad():
        assert torch.equal(adapted(token_ids).logits, before)


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
    layer = AdaptedLayer.of(base, circuit, init="freeze_one", scale=0.7, dropout=0.0)
    assert layer.adapter.gates[0].dtype == torch.float64
    names = [f"branches.0.adapter.gates.{i}" for i in range(len(circuit.gates))]
    assert all(dict(layer.named_parameters())[n] is g for n, g in zip(names, layer.adapter.gates))
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    gates = [g.detach().clone().requires_grad_(True) for g in layer.adapter.gates]

    def f(x, *gates):
        return torch.func.functional_call(layer, dict(zip(names, gates)), (x,))

    assert torch.autograd.gradcheck(f, (x, *gates))
    layer.fold()
    assert layer.folded
    assert torch.autograd.gradcheck(f, (x, *gates))


def test_attach_plans_the_named_token_counts_once_per_circuit(tiny_llama, monkeypatch):
    from qcircuit.compiler.plan import Plan
    calls = []
    real = Plan.warm_up

    def spy(self, *tokens, **kw):
        calls.append((self.circuit, tokens, kw["dtype"]))
        return real(self, *tokens, **kw)

    monkeypatch.setattr(Plan, "warm_up", spy)
    monkeypatch.setenv("QCIRCUIT_TUNE", "0")
    adapted = attach(tiny_llama, llama_program(), warm_up=(16, 200))
    assert sorted(map(str, (c for c, _, _ in calls))) == sorted(
        map(str, {t.circuit for t in adapted.targets}))   # three circuits, each once
    assert all(tokens == (16, 200) and dtype == torch.float32 for _, tokens, dtype in calls)
