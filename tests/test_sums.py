"""Sums of circuits on one layer (branches): exactness against a float64 dense reference,
gradients, state moves, checkpoints and the PEFT door.

A hybrid layer computes ``W0·x + b + Σ_k s_k·(T_θk − T_θ0k)·x``; the reference multiplies
every branch's gate matrices out in float64 numpy (``reference.circuit_operator``).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from qcircuit import Circuit, QCError
from qcircuit.ir import ApplyRule, Pattern, Program
from qcircuit.runtime import AdaptedLayer, LayerState, attach, load
from qcircuit.runtime.branch import Branch
from reference import circuit_operator
from test_adapter import EPS32, perturb, rel_err

QUANTA = Circuit(4, 4, 4).all_pairs()                                   # 64 -> 64
QUANTA_UP = Circuit(4, 4, 4).all_pairs().gate((1, 2), out=(1, 43))       # 64 -> 172
LORA = Circuit(64).gate((0,), out=(8,)).gate((0,), out=(64,))            # rank 8
LORA_UP = Circuit(64).gate((0,), out=(8,)).gate((0,), out=(172,))


def hybrid_program(lora_options=None, **options) -> Program:
    """QuanTA on q/v/up with program options (init freeze_one unless told), plus a LoRA
    branch on q_proj and up_proj with its own options."""
    lora_options = {"init": "zero_last", "scale": 2.0} if lora_options is None else lora_options
    return Program(
        {"attn": QUANTA, "up": QUANTA_UP, "lora": LORA, "lora_up": LORA_UP},
        (ApplyRule("attn", (Pattern("q_proj"), Pattern("v_proj"))),
         ApplyRule("up", (Pattern("up_proj"),)),
         ApplyRule("lora", (Pattern("q_proj"),), options=lora_options),
         ApplyRule("lora_up", (Pattern("up_proj"),), options=lora_options)),
        {"init": "freeze_one", **options})


def _hybrid_layer(kind: str, dtype=torch.float64, dropout: float = 0.0):
    torch.manual_seed(3)
    out = 172 if kind == "linear" else 64
    base = (nn.Linear(64, out) if kind == "linear" else Conv1D(64, 64)).to(dtype)
    quanta, lora = (QUANTA_UP, LORA_UP) if kind == "linear" else (QUANTA, LORA)
    branches = [Branch("q", quanta, base.weight, init="freeze_one", scale=0.5, dropout=0.0),
                Branch("l", lora, base.weight, init="zero_last", scale=2.0, dropout=dropout),
                Branch("q2", quanta, base.weight, init="freeze_one", scale=-0.3,
                       dropout=dropout)]
    layer = AdaptedLayer(base, branches, name="hybrid")
    init = [[g.detach().clone() for g in b.adapter.gates] for b in layer.branches]
    with torch.no_grad():
        for g in layer.gate_parameters():
            g.add_(0.1 * torch.randn_like(g))
    w = base.weight.detach()
    w0 = (w.t() if kind == "conv1d" else w).double().clone()
    return layer, w0, base.bias.detach().double().clone(), init


def _reference_delta(layer: AdaptedLayer, init) -> torch.Tensor:
    total = 0.0
    for b, gates0 in zip(layer.branches, init):
        t = circuit_operator(b.circuit, b.adapter.gates)
        t0 = circuit_operator(b.circuit, gates0) if b.frozen is not None else 0.0
        total = total + b.scale * (t - t0)
    return total


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_sum_matches_dense_reference_in_every_state(kind):
    layer, w0, b0, init = _hybrid_layer(kind)
    delta = _reference_delta(layer, init)
    assert rel_err(layer.delta64(), delta) < 1e-12
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    want = x @ (w0 + delta).t() + b0
    with torch.no_grad():
        assert rel_err(layer(x), want) < 1e-12
        layer.fold()
        assert layer.state is LayerState.FOLDED
        # W holds W0 − Σ_foldable s·T_θ0: the QuanTA branches' frozen circuits only
        folded_w = layer.base_layer.weight.detach()
        folded_w = folded_w.t() if kind == "conv1d" else folded_w
        t0s = sum(b.scale * circuit_operator(b.circuit, g0)
                  for b, g0 in zip(layer.branches, init) if b.foldable)
        assert rel_err(folded_w, w0 - t0s) < 1e-12
        assert rel_err(layer(x), want) < 1e-12
        layer.merge()
        assert rel_err(layer(x), want) < 1e-12
        merged_w = layer.base_layer.weight.detach()
        assert rel_err(merged_w.t() if kind == "conv1d" else merged_w, w0 + delta) < 1e-12
        layer.unmerge()
        layer.unfold()
        w = layer.base_layer.weight.detach()
        assert rel_err(w.t() if kind == "conv1d" else w, w0) < 1e-14


def test_a_branch_with_dropout_stays_unfolded_in_a_folded_layer():
    layer, w0, b0, init = _hybrid_layer("linear", dropout=0.2)
    layer.eval()   # dropout off: the forward must still equal the formula
    layer.fold()
    assert layer.state is LayerState.FOLDED
    assert [b.foldable for b in layer.branches] == [True, False, False]
    w = layer.base_layer.weight.detach()
    b = layer.branches[0]
    assert rel_err(w, w0 - b.scale * circuit_operator(b.circuit, init[0])) < 1e-12
    x = torch.randn(4, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x), x @ (w0 + _reference_delta(layer, init)).t() + b0) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gradcheck_through_every_branch(kind):
    torch.manual_seed(0)
    small = Circuit(2, 2, 3).all_pairs()                                  # 12 -> 12
    low = Circuit(12).gate((0,), out=(2,)).gate((0,), out=(12,))
    base = (nn.Linear(12, 12) if kind == "linear" else Conv1D(12, 12)).double()
    layer = AdaptedLayer(base, [
        Branch("a", small, base.weight, init="freeze_one", scale=0.7, dropout=0.0),
        Branch("b", low, base.weight, init="freeze_one", scale=1.5, dropout=0.0)])
    trained = {id(p) for p in layer.gate_parameters()}
    names = [n for n, p in layer.named_parameters() if id(p) in trained]
    assert len(names) == len(small.gates) + len(low.gates)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    gates = [p.detach().clone().requires_grad_(True) for p in layer.gate_parameters()]

    def f(x, *gates):
        return torch.func.functional_call(layer, dict(zip(names, gates)), (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, *gates))
    layer.fold()
    assert torch.autograd.gradcheck(f, (x, *gates))


def test_a_layer_refuses_two_branches_of_one_name():
    base = nn.Linear(64, 64)
    b = Branch("q", QUANTA, base.weight, init="freeze_one", scale=1.0, dropout=0.0)
    c = Branch("q", LORA, base.weight, init="zero_last", scale=1.0, dropout=0.0)
    with pytest.raises(QCError, match="distinct circuit names"):
        AdaptedLayer(base, [b, c])
    layer = AdaptedLayer(base, [b, Branch("l", LORA, base.weight, init="zero_last",
                                          scale=1.0, dropout=0.0)])
    with pytest.raises(QCError, match="is a sum of 2 circuits"):
        layer.adapter


def test_hybrid_attach_save_load_merge(tiny_llama, tmp_path, token_ids):
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    fresh.load_state_dict(tiny_llama.state_dict())
    adapted = attach(tiny_llama, hybrid_program(), seed=0)
    q = adapted.layers["model.layers.0.self_attn.q_proj"]
    v = adapted.layers["model.layers.0.self_attn.v_proj"]
    assert [b.name for b in q.branches] == ["attn", "lora"] and len(v.branches) == 1
    assert q.branches[1].scale == 2.0 and q.branches[1].frozen is None
    assert q.branches[0].scale == 1.0 and q.branches[0].frozen is not None
    assert adapted.num_trainable == 2 * (2 * QUANTA.num_params + LORA.num_params
                                         + QUANTA_UP.num_params + LORA_UP.num_params)
    with torch.no_grad():   # zero_last LoRA and folded QuanTA: the base model at init
        assert rel_err(adapted(token_ids).logits, fresh(token_ids).logits) < 1e-5
    perturb(adapted)
    adapted.save(tmp_path / "h")
    tensors = load_file(str(tmp_path / "h" / "adapter_model.safetensors"))
    stem = "model.layers.0.self_attn.q_proj"
    assert {f"{stem}.attn.gates.0", f"{stem}.attn.init_gates.0", f"{stem}.lora.gates.1"} \
        <= tensors.keys()
    assert f"{stem}.lora.init_gates.0" not in tensors
    assert "model.layers.0.self_attn.v_proj.gates.0" in tensors   # one branch: plain names
    assert torch.equal(tensors[f"{stem}.lora.gates.1"], q.branches[1].adapter.gates[1])
    record = json.loads((tmp_path / "h" / "adapter_config.json").read_text())["layers"][stem]
    assert [(b["circuit"], b["init"], b["scale"]) for b in record["branches"]] == \
        [("attn", "freeze_one", 1.0), ("lora", "zero_last", 2.0)]
    loaded = load(fresh, tmp_path / "h")
    with torch.no_grad():
        want = adapted(token_ids).logits
        assert rel_err(loaded(token_ids).logits, want) < 1e-6
        for name, layer in adapted.layers.items():
            assert rel_err(loaded.layers[name].delta64(), layer.delta64()) < 1e-15
        adapted.merge()
        assert rel_err(adapted(token_ids).logits, want) < 1e-5
        adapted.unmerge()
        assert rel_err(adapted(token_ids).logits, want) < 1e-5
    assert "lora" in str(adapted) and "zero_last, scale 2" in str(adapted)


def test_loading_into_a_program_with_other_branch_options_is_refused(tiny_llama, tmp_path):
    attach(tiny_llama, hybrid_program(), seed=0).save(tmp_path / "h")
    config_path = tmp_path / "h" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["program"] = config["program"].replace("scale = 2", "scale = 3")
    config_path.write_text(json.dumps(config))
    fresh = type(tiny_llama)(tiny_llama.config)
    with pytest.raises(QCError, match="the record and the stored program differ: circuit 'lora': "
                                      "the checkpoint has scale 2.0, the program gives 3.0"):
        load(fresh, tmp_path / "h")


def test_merge_refuses_a_nan_in_any_branch_and_keeps_the_weights(tiny_llama):
    adapted = attach(tiny_llama, hybrid_program(), seed=0)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items() if "branches" not in k}
    q = adapted.layers["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        q.branches[1].adapter.gates[0][0, 0] = float("nan")
    with pytest.raises(QCError, match=r"q_proj \(lora\): gate 0 has non-finite"):
        adapted.merge()
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())
    assert set(adapted.states.values()) == {LayerState.FOLDED}


def test_float32_hybrid_fold_is_within_rounding(tiny_llama, token_ids):
    adapted = attach(tiny_llama, hybrid_program(), seed=0, fold=False)
    perturb(adapted)
    with torch.no_grad():
        want = adapted(token_ids).logits
        adapted.fold()
        assert rel_err(adapted(token_ids).logits, want) < 1e3 * EPS32


def test_peft_door_carries_the_sum(tiny_llama, tmp_path, token_ids):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from qcircuit.peft import QuanTAConfig
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    fresh.load_state_dict(tiny_llama.state_dict())
    twin = type(tiny_llama)(tiny_llama.config).eval()
    twin.load_state_dict(tiny_llama.state_dict())
    program = hybrid_program()
    peft_model = get_peft_model(tiny_llama, QuanTAConfig(program=program.to_qc(), seed=0))
    native = attach(twin, program, seed=0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == native.num_trainable
    perturb(native)
    native.save(tmp_path / "native")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "native")
    with torch.no_grad():
        assert rel_err(loaded(token_ids).logits, native(token_ids).logits) < 1e-6
    loaded.save_pretrained(tmp_path / "peft")
    back = load(type(twin)(twin.config).eval(), tmp_path / "peft")
    for name, layer in native.layers.items():
        assert rel_err(back.layers[name].delta64(), layer.delta64()) < 1e-15
