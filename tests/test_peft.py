"""QuanTA through stock PEFT (``qcircuit.peft``), checked against qcircuit's native path.

The PEFT layer is the native ``AdaptedLayer``, so with the same seed both front doors hold
the same gates and compute the same function: outputs agree to float32 rounding
(``‖a − b‖/‖b‖ ≤ 1e-6``; the native path is used unfolded, the form PEFT layers keep).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")  # an optional dependency: pip install 'qcircuit[peft]'

import qcircuit.peft  # noqa: E402  (registers the method)
from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING,  # noqa: E402
                          PEFT_TYPE_TO_TUNER_MAPPING)
from qcircuit import QCError, parse  # noqa: E402
from qcircuit.peft import QuanTAConfig, QuanTALayer, QuanTAModel  # noqa: E402
from qcircuit.runtime import attach, load  # noqa: E402
from formats import as_format  # noqa: E402

PROGRAM = """
circuit attn {
    qudits 4 4 4
    all_pairs
}
apply attn to q_proj, v_proj
"""
OTHER = """
circuit small {
    qudits 8 8
    gate (0, 1)
}
apply small to o_proj, q_proj
option scale = 0.5
"""
F32 = 1e-6  # float32: the same layer, same operations; only summation order may differ


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def perturb(model, seed: int = 7, scale: float = 0.3) -> None:
    """Move every trainable gate away from its init, so the adapter's delta is not zero
    (at 0.3 the tiny LLaMA's update is about 25 times its base weight: too large for a
    merge to be undone, see test_merge_reversible.py; at 0.05, about twice)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def native_twin(fresh, program: str, seed: int, peft_model, adapter: str = "default"):
    """``attach`` on a copy of the base model, gates copied from the PEFT model by name."""
    adapted = attach(fresh, parse(program), seed=seed, fold=False)
    layers = qcircuit.peft.model.adapted_layers(peft_model, adapter)
    assert set(layers) == set(adapted.layers)
    with torch.no_grad():
        for name, layer in adapted.layers.items():
            for mine, theirs in zip(layer.adapter.gates, layers[name][1].adapter.gates):
                mine.copy_(theirs)
    return adapted


@pytest.fixture
def peft_llama(make_llama):
    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    perturb(model)
    return model


@pytest.fixture
def mergeable_llama(make_llama):
    """``peft_llama`` trained less far: its merge can be undone within rounding."""
    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    perturb(model, scale=0.05)
    return model


# --- registration and config ---------------------------------------------------------------
def test_import_registers_the_method_under_a_string_key():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["QUANTA"] is QuanTAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["QUANTA"] is QuanTAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["QUANTA"] == QuanTAModel.prefix
    config = QuanTAConfig(program=PROGRAM)
    assert config.peft_type == "QUANTA" and config.peft_type.value == "QUANTA"
    qcircuit.peft.register()  # idempotent
    assert PEFT_TYPE_TO_TUNER_MAPPING["QUANTA"] is QuanTAModel


def test_register_checks_the_peft_hooks_it_relies_on(monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.delattr(BaseTuner, "_remap_adapter_state_dict_for_load")
    with pytest.raises(ImportError, match="lacks _remap_adapter_state_dict_for_load"):
        qcircuit.peft.register()


def test_register_refuses_a_taken_name(monkeypatch):
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "QUANTA", object)
    with pytest.raises(RuntimeError, match="already has a method called 'QUANTA'"):
        qcircuit.peft.register()


def test_config_from_path_text_and_options(tmp_path):
    path = tmp_path / "a.qc"
    path.write_text(PROGRAM)
    from_path, from_text = QuanTAConfig(program=str(path)), QuanTAConfig(program=PROGRAM)
    assert from_path.program == from_text.program == parse(PROGRAM).to_qc()
    assert from_text.options == {"init": "zero_last", "scale": 1.0, "dropout": 0.0}
    assert QuanTAConfig(program=OTHER).options["scale"] == 0.5
    assert QuanTAConfig(program=OTHER, options={"scale": 2.0}).options["scale"] == 2.0


def test_config_refuses_bad_programs(tmp_path):
    with pytest.raises(QCError) as err:
        QuanTAConfig(program="circuit c {\n  qudits 4 4\n  gate (0, 7)\n}\napply c to q_proj\n")
    assert err.value.line == 3
    with pytest.raises(QCError, match="needs program="):
        QuanTAConfig()
    with pytest.raises(QCError, match="cannot read"):
        QuanTAConfig(program=str(tmp_path / "missing.qc"))
    with pytest.raises(QCError, match="unknown option"):
        QuanTAConfig(program=PROGRAM, options={"rank": 4})


# --- get_peft_model and the native path ----------------------------------------------------
def test_get_peft_model_matches_attach(make_llama, token_ids, capsys):
    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    native = attach(make_llama(), parse(PROGRAM), seed=5, fold=False)
    peft_layers = qcircuit.peft.model.adapted_layers(model, "default")
    for name, layer in native.layers.items():  # the same seed draws the same gates
        for a, b in zip(layer.adapter.gates, peft_layers[name][1].adapter.gates):
            assert torch.equal(a, b)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(native.trainable_parameters())
    assert all(".adapter.gates." in n for n in trainable)
    model.print_trainable_parameters()
    assert f"trainable params: {native.num_trainable:,}" in capsys.readouterr().out
    status = model.get_model_status()
    assert status.peft_types == {"default": "QUANTA"} and status.num_adapter_layers == 4
    perturb(model)
    twin = native_twin(make_llama(), PROGRAM, 5, model)
    assert rel(logits(model, token_ids), logits(twin, token_ids)) <= F32
    assert rel(logits(model, token_ids), logits(make_llama(), token_ids)) > 1e-2


def test_gpt2_conv1d_matches_attach(tiny_gpt2_config, token_ids, tmp_path):
    from transformers import GPT2LMHeadModel

    def make():
        torch.manual_seed(2)
        return GPT2LMHeadModel(tiny_gpt2_config).eval()
    program = "circuit c {\n qudits 4 4 4\n all_pairs\n}\napply c to attn.c_proj\n"
    model = get_peft_model(make(), QuanTAConfig(program=program, seed=3))
    perturb(model)
    twin = native_twin(make(), program, 3, model)
    assert rel(logits(model, token_ids), logits(twin, token_ids)) <= F32
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(logits(again, token_ids), logits(model, token_ids))


def test_training_loop_matches_native(make_llama, token_ids):
    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    twin = attach(make_llama(), parse(PROGRAM), seed=5, fold=False)
    peft_layers = qcircuit.peft.model.adapted_layers(model, "default")
    names = list(twin.layers)
    ours = [g for n in names for g in peft_layers[n][1].adapter.gates]
    theirs = [g for n in names for g in twin.layers[n].adapter.gates]
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for params, net in ((ours, model), (theirs, twin)):
        opt = torch.optim.AdamW(params, lr=1e-2)
        net.train()
        trace = []
        for _ in range(4):
            loss = net(token_ids, labels=token_ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            trace.append(loss.item())
        losses.append(trace)
    assert losses[0][-1] < losses[0][0]
    for a, b in zip(ours, theirs):
        assert rel(a.detach(), b.detach()) <= 1e-5  # four Adam steps on equal float32 gradients
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_trainer_trains_only_the_gates(make_llama, token_ids, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    before = {n: p.clone() for n, p in model.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in token_ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # gates moved, nothing else


def test_bfloat16_base_keeps_its_dtype_and_float32_gates(make_llama, token_ids):
    def make():
        return make_llama().to(torch.bfloat16)
    model = get_peft_model(make(), QuanTAConfig(program=PROGRAM, seed=5))
    layers = qcircuit.peft.model.adapted_layers(model, "default")
    for _, layer in layers.values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in layer.adapter.gates)
    perturb(model)
    twin = native_twin(make(), PROGRAM, 5, model)
    assert torch.equal(logits(model, token_ids), logits(twin, token_ids))  # the same ops


def test_refuses_tied_weights_and_low_cpu_mem_usage(tiny_gpt2, make_llama, tmp_path):
    tied = "circuit c {\n qudits auto 2\n all_pairs\n}\napply c to lm_head\n"
    with pytest.raises(QCError, match="shares its weight"):
        get_peft_model(tiny_gpt2, QuanTAConfig(program=tied))
    assert not any(isinstance(m, QuanTALayer) for m in tiny_gpt2.modules())
    get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM)).save_pretrained(tmp_path)
    with pytest.raises(QCError, match="low_cpu_mem_usage"):
        PeftModel.from_pretrained(make_llama(), tmp_path, low_cpu_mem_usage=True)


# --- checkpoints -----------------------------------------------------------------------------
def test_save_pretrained_and_from_pretrained(peft_llama, make_llama, token_ids, tmp_path):
    peft_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QUANTA" and config["format"] == "qcircuit-adapter"
    assert isinstance(PeftConfig.from_pretrained(tmp_path), QuanTAConfig)
    again = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert torch.equal(logits(again, token_ids), logits(peft_llama, token_ids))
    assert not any(p.requires_grad for p in again.parameters())  # inference by default
    trainable = PeftModel.from_pretrained(make_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_from_pretrained_in_a_fresh_process(peft_llama, token_ids, tmp_path):
    peft_llama.save_pretrained(tmp_path / "adapter")
    script = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import save_file
import peft.functional
import qcircuit.peft
from peft import PeftModel
torch.manual_seed(1)
base = LlamaForCausalLM(LlamaConfig(**{peft_llama.config.to_diff_dict()!r})).eval()
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
ids = torch.tensor({token_ids.tolist()!r})
with torch.no_grad():
    save_file({{"logits": model(ids).logits}}, {str(tmp_path / "out.safetensors")!r})
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file
    theirs = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert rel(theirs, logits(peft_llama, token_ids)) <= F32


def test_native_load_reads_save_pretrained(peft_llama, make_llama, token_ids, tmp_path):
    peft_llama.save_pretrained(tmp_path)
    native = load(make_llama(), tmp_path, fold=False)
    assert rel(logits(native, token_ids), logits(peft_llama, token_ids)) <= F32


def test_peft_loads_a_native_save(make_llama, token_ids, tmp_path):
    native = attach(make_llama(), parse(PROGRAM), seed=5)
    perturb(native.model)
    native.save(tmp_path)
    model = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert rel(logits(model, token_ids), logits(native, token_ids)) <= 1e-5  # native is folded


def test_older_format_directories_load_through_both_doors(peft_llama, make_llama, token_ids,
                                                          tmp_path):
    """save_pretrained directories of formats 2 (one circuit per layer) and 3 (no trained
    modules) load with PeftModel.from_pretrained and with the native load."""
    peft_llama.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    fresh = path.read_text()
    for version in (3, 2):
        path.write_text(json.dumps(as_format(json.loads(fresh), version)))
        want = logits(peft_llama, token_ids)
        got = PeftModel.from_pretrained(make_llama(), tmp_path)
        assert rel(logits(got, token_ids), want) <= F32
        assert rel(logits(load(make_llama(), tmp_path, fold=False), token_ids), want) <= F32


def test_loading_refuses_a_checkpoint_of_another_program(peft_llama, make_llama, tmp_path):
    peft_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["program"] = config["program"].replace("q_proj, v_proj", "q_proj, k_proj")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QCError, match="k_proj"):
        PeftModel.from_pretrained(make_llama(), tmp_path)


def test_loading_refuses_missing_tensors(make_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    config = QuanTAConfig(program=PROGRAM, seed=5, options={"init": "freeze_one"})
    get_peft_model(make_llama(), config).save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.v_proj.init_gates.2"]
    save_file(tensors, path)
    with pytest.raises(QCError, match=r"missing \['model.layers.1.self_attn.v_proj.init_gates.2'\]"):
        PeftModel.from_pretrained(make_llama(), tmp_path)


# --- several adapters and the state calls ------------------------------------------------
def test_second_adapter_set_adapter_and_delete(peft_llama, make_llama, token_ids):
    first = logits(peft_llama, token_ids)
    peft_llama.add_adapter("other", QuanTAConfig(program=OTHER, seed=9))
    assert torch.equal(logits(peft_llama, token_ids), first)  # added, not active
    q_proj = peft_llama.base_model.model.model.layers[0].self_attn.q_proj
    assert "(default): AdaptedLayer(" in repr(q_proj) and "(other): AdaptedLayer(" in repr(q_proj)
    peft_llama.set_adapter("other")
    perturb(peft_llama, seed=11)
    twin = native_twin(make_llama(), OTHER, 9, peft_llama, adapter="other")
    assert rel(logits(peft_llama, token_ids), logits(twin, token_ids)) <= F32
    assert not any(p.requires_grad for n, p in peft_llama.named_parameters() if "default" in n)
    peft_llama.set_adapter("default")
    assert torch.equal(logits(peft_llama, token_ids), first)  # switching touches no weight
    with pytest.raises(QCError, match="one adapter at a time"):
        peft_llama.base_model.set_adapter(["default", "other"])
    peft_llama.delete_adapter("other")
    assert list(peft_llama.peft_config) == ["default"]
    assert not any(isinstance(m, QuanTALayer) and "other" in m.qc_adapters
                   for m in peft_llama.modules())
    assert torch.equal(logits(peft_llama, token_ids), first)


def test_merge_and_unload_with_adapters_on_different_layers(mergeable_llama, make_llama, token_ids):
    """OTHER adapts o_proj, which the active adapter does not: merging skips it there."""
    expected = logits(mergeable_llama, token_ids)
    mergeable_llama.add_adapter("other", QuanTAConfig(program=OTHER, seed=9))
    perturb(mergeable_llama, seed=11, scale=0.05)  # moves only the active adapter's gates
    assert rel(logits(mergeable_llama, token_ids), expected) > 1e-2
    expected = logits(mergeable_llama, token_ids)
    mergeable_llama.merge_adapter()
    assert rel(logits(mergeable_llama, token_ids), expected) <= F32
    mergeable_llama.unmerge_adapter()
    merged = mergeable_llama.merge_and_unload()
    assert not any(isinstance(m, QuanTALayer) for m in merged.modules())
    assert rel(logits(merged, token_ids), expected) <= F32


def test_disable_adapter_is_the_base_model(mergeable_llama, make_llama, token_ids):
    base = logits(make_llama(), token_ids)
    with mergeable_llama.disable_adapter():
        assert torch.equal(logits(mergeable_llama, token_ids), base)
    assert rel(logits(mergeable_llama, token_ids), base) > 1e-2
    mergeable_llama.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mergeable_llama.disable_adapter():  # unmerges first (a named call, not the forward)
            assert rel(logits(mergeable_llama, token_ids), base) <= F32


def test_merge_unmerge_and_merge_and_unload(mergeable_llama, make_llama, token_ids):
    unmerged = logits(mergeable_llama, token_ids)
    w0 = {n: p.clone() for n, p in mergeable_llama.named_parameters() if n.endswith("base_layer.weight")}
    mergeable_llama.merge_adapter()
    assert rel(logits(mergeable_llama, token_ids), unmerged) <= F32
    w1 = {n: p.clone() for n, p in mergeable_llama.named_parameters() if n in w0}
    with pytest.raises(ValueError, match="while they are merged"):
        mergeable_llama.delete_adapter("default")
    mergeable_llama.unmerge_adapter()
    eps = torch.finfo(torch.float32).eps
    for n, p in mergeable_llama.named_parameters():
        if n in w0:  # back to W0 up to the roundings of W0 + delta and of W0
            bound = eps * (1 + float(w1[n].norm() / w0[n].norm()))
            assert rel(p, w0[n]) <= bound, n
    twin = native_twin(make_llama(), PROGRAM, 5, mergeable_llama)
    merged = mergeable_llama.merge_and_unload()
    assert not any(isinstance(m, QuanTALayer) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert rel(logits(merged, token_ids), logits(twin.merge_and_unload(), token_ids)) <= F32
    assert rel(logits(merged, token_ids), unmerged) <= F32


def test_unload_gives_back_the_base_model(peft_llama, make_llama, token_ids):
    base = make_llama()
    plain = peft_llama.unload()
    assert not any(isinstance(m, QuanTALayer) for m in plain.modules())
    for (n, a), (_, b) in zip(plain.named_parameters(), base.named_parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(logits(plain, token_ids), logits(base, token_ids))


# --- what PEFT reserves for LoRA ------------------------------------------------------------
def test_mixed_batches_refuse(peft_llama, token_ids):
    with pytest.raises(QCError, match="mixed adapter batches"):
        peft_llama(token_ids, adapter_names=["default", "default"])


def test_hotswap_refuses(peft_llama, tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    peft_llama.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hotswapping only supports .* QUANTA was passed"):
        hotswap_adapter(peft_llama, str(tmp_path), adapter_name="default")
