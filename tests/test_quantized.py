"""Quantized base models (``runtime/quantized.py``): bitsandbytes NF4 and int8, torchao int8.

Each kind is loaded by transformers from a saved tiny LLaMA (the path users take) and
compared with its *twin*: the float32 model whose quantized layers hold their dequantized
weights, computed here with the libraries' own calls. Forwards run under ``no_grad`` in
train mode, where bitsandbytes int8 multiplies by its dequantized weight on the CPU (tiny
LLaMA has no dropout: the same function as eval mode), so a quantized model and its twin
agree to float32 summation order, ``F32``. In eval mode LLM.int8 also rounds each
activation row to int8 (a step of ``absmax/127``): about 1 % of the output, checked once
with ``INT8_EVAL``. Merged weights are checked against the exact float64 merge.
"""
from __future__ import annotations

import math
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")   # the optional extra: pip install 'qcircuit[quant]'
peft = pytest.importorskip("peft")
try:   # in the quant extra, not in test: see pyproject.toml
    import torchao  # noqa: F401
except ImportError:
    torchao = None
NEEDS_TORCHAO = pytest.mark.skipif(torchao is None, reason="torchao: pip install 'qcircuit[quant]'")

import bitsandbytes.functional as BF  # noqa: E402
import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          TorchAoConfig)

from qcircuit import Circuit, QCError, parse  # noqa: E402
from qcircuit.peft import QuanTAConfig  # noqa: E402
from qcircuit.runtime import AdaptedLayer, attach, load, quantized  # noqa: E402
from qcircuit.runtime.reference import import_reference  # noqa: E402

KINDS = ("nf4", "int8", pytest.param("torchao", marks=NEEDS_TORCHAO))
F32 = 1e-5          # float32, the same function, another summation order
INT8_EVAL = 3e-2    # LLM.int8's activation rounding in eval mode (about 1 %)
PROGRAM = """
option init = freeze_one
circuit attn { qudits 4 4 4  all_pairs }
circuit lora { low_rank 2 }
apply attn to q_proj, v_proj
apply lora to v_proj, down_proj with init = zero_last, scale = 2
"""
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def float_model() -> LlamaForCausalLM:
    """The tiny LLaMA of conftest (same seed, same weights)."""
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: more intra-op threads only contend on a shared machine (4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    float_model().save_pretrained(path)
    return path


def load_quantized(base_dir, kind: str) -> LlamaForCausalLM:
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        config = TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(base_dir, quantization_config=config,
                                            device_map="cpu", dtype=torch.float32).eval()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers by the name of the module they are (or an adapter wraps)."""
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter}


def library_dequantize(module: nn.Module, parts: dict | None = None) -> torch.Tensor:
    """The weight a quantized layer computes with, by the library's own call, float64."""
    w = module.weight
    if isinstance(w, bnb.nn.Params4bit):
        data, state = (w.data, w.quant_state) if parts is None else (parts["data"], parts["qs"])
        return BF.dequantize_4bit(data, state).double()
    if isinstance(w, bnb.nn.Int8Params):
        scb = w.SCB if w.SCB is not None else module.state.SCB
        data, scb = (w.data, scb) if parts is None else (parts["data"], parts["SCB"])
        return BF.int8_vectorwise_dequant(data, scb).double()
    return w.dequantize().double()


def snapshot(module: nn.Module) -> dict:
    """Copies of everything a quantized weight stores, by name."""
    w = module.weight
    if isinstance(w, bnb.nn.Params4bit):
        qs = w.quant_state
        parts = {"data": w.data, "absmax": qs.absmax, "code": qs.code, "offset": qs.offset,
                 "absmax2": qs.state2.absmax, "code2": qs.state2.code}
        return {**{k: v.clone() for k, v in parts.items()}, "qs": qs}
    if isinstance(w, bnb.nn.Int8Params):
        scb = w.SCB if w.SCB is not None else module.state.SCB
        return {"data": w.data.clone(), "SCB": scb.clone()}
    return {"qdata": w.qdata.clone(), "scale": w.scale.clone(), "zero_point": w.zero_point.clone()}


def same_storage(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def stored_bytes(parts: dict) -> int:
    return sum(t.numel() * t.element_size() for k, t in parts.items() if torch.is_tensor(t))


def twin(quantized_model: nn.Module) -> LlamaForCausalLM:
    """The float32 model holding the quantized model's dequantized weights."""
    model = float_model()
    with torch.no_grad():
        for name, module in quantized_layers(quantized_model).items():
            model.get_submodule(name).weight.copy_(library_dequantize(module).float())
    return model


def logits(model, train: bool = True) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        out = model(IDS).logits
    model.eval()
    return out


def train(adapted, steps: int = 4) -> list[float]:
    optimizer = torch.optim.Adam(adapted.trainable_parameters(), lr=1e-2)
    adapted.model.train()
    losses = []
    for _ in range(steps):
        loss = adapted(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    adapted.model.eval()
    return losses


@pytest.fixture(scope="module", params=KINDS)
def trained(request, base_dir, tmp_path_factory):
    """An adapter trained on the quantized model, the same on its twin, and the checkpoint."""
    kind = request.param
    model = load_quantized(base_dir, kind)
    before = {n: snapshot(m) for n, m in quantized_layers(model).items()}
    twin_adapted = attach(twin(model), parse(PROGRAM), seed=0, fold=False)
    adapted = attach(model, parse(PROGRAM), seed=0)
    losses, twin_losses = train(adapted), train(twin_adapted)
    path = tmp_path_factory.mktemp(kind) / "adapter"
    adapted.save(path)
    return SimpleNamespace(kind=kind, adapted=adapted, twin=twin_adapted, losses=losses,
                           twin_losses=twin_losses, before=before, path=path)


# --- training ----------------------------------------------------------------------------
def test_training_runs_beside_the_untouched_quantized_weights(trained):
    assert all(math.isfinite(x) for x in trained.losses)
    assert trained.losses[-1] < trained.losses[0]
    assert all(abs(a - b) <= F32 * abs(b) for a, b in zip(trained.losses, trained.twin_losses))
    layers = quantized_layers(trained.adapted.model)
    assert all(same_storage(snapshot(m), trained.before[n]) for n, m in layers.items())
    assert {s.value for s in trained.adapted.states.values()} == {"unfolded"}   # never folded
    assert rel(logits(trained.adapted), logits(trained.twin)) <= F32
    eval_tol = INT8_EVAL if trained.kind == "int8" else F32
    assert rel(logits(trained.adapted, train=False), logits(trained.twin, train=False)) <= eval_tol


def test_checkpoints_load_onto_float_and_requantized_bases(trained, base_dir):
    requantized = load(load_quantized(base_dir, trained.kind), trained.path)
    assert torch.equal(logits(requantized), logits(trained.adapted))   # same bytes, same gates
    on_twin = load(twin(requantized.model), trained.path)
    assert rel(logits(on_twin), logits(trained.adapted)) <= F32
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the base's storage is no reason to warn
        on_float = load(float_model(), trained.path)
    assert {s.value for s in on_float.states.values()} == {"folded", "unfolded"}
    for name, layer in on_float.layers.items():
        for a, b in zip(layer.gate_parameters(), trained.adapted.layers[name].gate_parameters()):
            assert torch.equal(a, b)
    # and the other way: trained on the float model, loaded onto the quantized one
    on_float.save(base_dir / f"from-float-{trained.kind}")
    quantized_model = load_quantized(base_dir, trained.kind)
    back = load(quantized_model, base_dir / f"from-float-{trained.kind}")
    assert rel(logits(back), logits(load(twin(quantized_model),
                                         base_dir / f"from-float-{trained.kind}"))) <= F32


# --- merge -------------------------------------------------------------------------------
def test_merge_reports_its_error_and_unmerge_restores_the_bytes(trained, base_dir):
    adapted = load(load_quantized(base_dir, trained.kind), trained.path)
    before = {n: snapshot(adapted.model.get_submodule(n).base_layer) for n in adapted.layers}
    exact = {n: library_dequantize(layer.base_layer) + layer.delta64()
             for n, layer in adapted.layers.items()}
    y = logits(adapted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted.merge()
    reports = adapted.merge_reports
    assert set(reports) == set(adapted.layers)
    for name, report in reports.items():
        layer = adapted.layers[name]
        merged = library_dequantize(layer.base_layer)
        gap = float((merged - exact[name]).norm())
        delta = float(layer.delta64().norm())
        assert report.error == pytest.approx(gap / float(exact[name].norm()), rel=1e-9)
        assert report.update_error == pytest.approx(gap / delta, rel=1e-9)
        assert report.update_error <= 1 + 1e-9   # never farther than the unmerged weight
        assert report.kept_bytes == stored_bytes(before[name])
    lossy = [r for r in reports.values() if r.update_error > quantized.MERGE_WARN]
    assert bool(lossy) == any("merge_and_unload(dtype=" in str(w.message) for w in caught)
    # the merged model is its base alone, with the requantized weights
    plain = twin(adapted.model)
    for name, layer in adapted.layers.items():
        with torch.no_grad():
            plain.get_submodule(name).weight.copy_(library_dequantize(layer.base_layer).float())
    assert rel(logits(adapted), logits(plain)) <= F32
    adapted.unmerge()
    for name in adapted.layers:
        assert same_storage(snapshot(adapted.layers[name].base_layer), before[name])
    assert torch.equal(logits(adapted), y)


def test_merge_and_unload_with_a_dtype_is_the_exact_float_merge(trained, base_dir):
    adapted = load(load_quantized(base_dir, trained.kind), trained.path)
    on_twin = load(twin(adapted.model), trained.path)
    exact = {n: (library_dequantize(layer.base_layer) + layer.delta64()).float()
             for n, layer in adapted.layers.items()}
    adapted.merge()   # merged first: merge_and_unload(dtype=...) starts from the original
    exported = adapted.merge_and_unload(dtype=torch.float32)
    for name, weight in exact.items():
        layer = exported.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert rel(layer.weight, weight) <= 1e-7   # one rounding of the float64 merge
    assert rel(logits(exported), logits(on_twin.merge_and_unload())) <= F32


def test_nf4_merge_is_exact_at_init_and_warns_when_the_update_is_lost(base_dir):
    adapted = attach(load_quantized(base_dir, "nf4"), parse(PROGRAM), seed=0)
    before = {n: snapshot(layer.base_layer) for n, layer in adapted.layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted.merge()   # Δ = 0: the kept scales reproduce every byte
    assert all(r.error == 0 and r.scales == "kept" for r in adapted.merge_reports.values())
    assert all(same_storage(snapshot(layer.base_layer), before[n])
               for n, layer in adapted.layers.items())
    adapted.unmerge()
    with torch.no_grad():   # an update far below NF4's step rounds away
        for g in adapted.trainable_parameters():
            g.add_(1e-4)
    with pytest.warns(UserWarning, match=r"lost more than 25% of the adapter's update"):
        adapted.merge()
    assert all(r.update_error > quantized.MERGE_WARN for r in adapted.merge_reports.values())


def test_nf4_in_the_cpu_kernel_layout_merges_and_unmerges(base_dir):
    """An eval forward on an AVX512-BF16 CPU repacks NF4 codes for bitsandbytes' kernel;
    merge reads them as bitsandbytes saves them and unmerge puts the repacked ones back."""
    model = load_quantized(base_dir, "nf4")
    base = model.model.layers[0].self_attn.q_proj
    canonical = library_dequantize(base)
    base.weight.data, base.weight.quant_state = BF._convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state)
    packed, state = base.weight.data, base.weight.quant_state
    layer = AdaptedLayer.of(base, Circuit(4, 4, 4).all_pairs(), init="freeze_one", name="q_proj")
    assert rel(quantized.dequantized(base, layer.quant), canonical) <= 4e-3   # absmax in bf16
    layer.merge()
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    layer.unmerge()
    assert base.weight.data.data_ptr() == packed.data_ptr()
    assert base.weight.quant_state is state


# --- the PEFT door -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_peft_door_round_trip(kind, base_dir, tmp_path):
    model = get_peft_model(load_quantized(base_dir, kind), QuanTAConfig(program=PROGRAM, seed=0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    model.save_pretrained(tmp_path)
    y = logits(model)
    again = PeftModel.from_pretrained(load_quantized(base_dir, kind), tmp_path)
    assert torch.equal(logits(again), y)
    on_twin = PeftModel.from_pretrained(twin(again.base_model.model), tmp_path)
    assert rel(logits(on_twin), y) <= F32
    layers = {n: m.base_layer for n, m in again.named_modules() if hasattr(m, "qc_adapters")}
    before = {n: snapshot(m) for n, m in layers.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        again.merge_adapter()
    reports = [m.qc_adapters["default"].quant_merged.report for m in again.modules()
               if hasattr(m, "qc_adapters")]
    assert len(reports) == len(layers)   # one warning at most, not one per layer:
    assert len([w for w in caught if "requantizing" in str(w.message)]) == any(
        r.lossy for r in reports)
    assert not all(same_storage(snapshot(m), before[n]) for n, m in layers.items())
    again.unmerge_adapter()
    assert all(same_storage(snapshot(m), before[n]) for n, m in layers.items())
    assert torch.equal(logits(again), y)
    exported = again.merge_and_unload(dtype=torch.float32)
    assert all(type(exported.get_submodule(n.removeprefix("base_model.model."))) is nn.Linear
               for n in layers)
    assert rel(logits(exported), logits(on_twin.merge_and_unload())) <= F32


def test_import_reference_onto_a_quantized_base(base_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {}
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        for i, j in ((-1, -2), (-1, -3), (-2, -3)):
            t0 = torch.randn(4, 4, 4, 4, generator=g) / 3
            state[f"base_model.model.{m}.quanta_weights.{i} {j}"] = t0 + 0.1 * torch.randn(
                t0.shape, generator=g)
            state[f"base_model.model.{m}.quanta_weights2.{i} {j}"] = t0
    save_file(state, str(tmp_path / "model.safetensors"))
    adapted = import_reference(load_quantized(base_dir, "nf4"), tmp_path)
    reference = import_reference(twin(adapted.model), tmp_path)
    assert rel(logits(adapted), logits(reference)) <= F32


# --- refusals ----------------------------------------------------------------------------
def one_layer(layer: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(proj=layer))


def _torchao_float8():
    from torchao.quantization import Float8WeightOnlyConfig, quantize_
    model = one_layer(nn.Linear(64, 64))
    quantize_(model, Float8WeightOnlyConfig())
    return model


class QuantLinear(nn.Module):
    """The shape of a GPTQ/AWQ layer: packed ``qweight`` and ``scales`` buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 64, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, 64))


def _int8_plain():
    layer = nn.Linear(64, 64)
    layer.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    return one_layer(layer)


def _bnb_meta():
    with torch.device("meta"):
        return one_layer(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))


@pytest.mark.parametrize("build, message", [
    pytest.param(_torchao_float8, "torchao Float8Tensor weights are not supported",
                 marks=NEEDS_TORCHAO),
    (lambda: one_layer(QuantLinear()), "QuantLinear is a quantized layer type qcircuit does not"),
    (_int8_plain, "its weight is a Parameter of torch.int8"),
    (lambda: one_layer(bnb.nn.Linear4bit(64, 64)), "whose weight is not quantized"),
    (_bnb_meta, "on the meta device cannot be adapted"),
    (lambda: one_layer(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)), "has_fp16_weights"),
    (lambda: one_layer(bnb.nn.Embedding4bit(64, 64)), "Embedding4bit layers are not supported"),
])
def test_unsupported_layers_are_refused_by_name(build, message):
    model = build()
    program = parse("circuit c { qudits 4 4 4  all_pairs }\napply c to proj\n")
    with pytest.raises(QCError, match=message) as err:
        attach(model, program)
    assert "pattern 'proj' matches module 'proj'" in str(err.value)


@pytest.mark.parametrize("kind, library", [
    ("nf4", "bitsandbytes"), pytest.param("torchao", "torchao.quantization", marks=NEEDS_TORCHAO)])
def test_without_the_extra_a_quantized_layer_names_it(kind, library, base_dir, monkeypatch):
    model = load_quantized(base_dir, kind)
    monkeypatch.setitem(sys.modules, library, None)   # as if it were not installed
    with pytest.raises(QCError, match=r"pip install 'qcircuit\[quant\]'"):
        attach(model, parse(PROGRAM))
    adapted = attach(float_model(), parse(PROGRAM), seed=0)   # the rest does not need it
    adapted.merge()
    assert adapted.merge_reports == {}


# --- the documentation -------------------------------------------------------------------
def test_the_docs_example_runs(base_dir, tmp_path):
    """docs/quantized.md's code, with ``base_dir`` the tiny LLaMA's directory."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "quantized.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    scope = {"base_dir": base_dir, "out_dir": tmp_path / "out"}
    for block in blocks:
        exec(compile(block, "docs/quantized.md", "exec"), scope)
    q_proj = scope["plain"].model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    # the default init (zero_last) keeps no frozen copy: a float layer stays unfolded too
    assert {s.value for s in scope["adapted_full"].states.values()} == {"unfolded"}


def test_unmerge_of_a_merged_state_from_a_state_dict_is_refused(base_dir):
    """A merged state restored by ``load_state_dict`` holds requantized bytes, not the
    original ones, which only the merging process kept: unmerge refuses, writing nothing."""
    merged = attach(load_quantized(base_dir, "int8"), parse(PROGRAM), seed=0)
    with torch.no_grad():
        for g in merged.trainable_parameters():
            g.add_(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the update is partly lost to requantization
        merged.merge()
    state = merged.model.state_dict()
    restored = attach(load_quantized(base_dir, "int8"), parse(PROGRAM), seed=1)
    restored.model.load_state_dict(state)
    assert {s.value for s in restored.states.values()} == {"merged"}
    before = {n: snapshot(layer.base_layer) for n, layer in restored.layers.items()}
    y = logits(restored)
    with pytest.raises(QCError, match=r"the original quantized weight is not in memory"):
        restored.unmerge()
    assert all(same_storage(snapshot(layer.base_layer), before[n])
               for n, layer in restored.layers.items())
    assert torch.equal(logits(restored), y)
    assert rel(y, logits(merged)) <= F32
