"""transformers' own adapter calls on QuanTA adapters: ``model.load_adapter``,
``from_pretrained`` of an adapter directory, named adapters and the state calls, and the
refusals that keep a bad checkpoint's layers from ever running random gates. Outputs are
checked against qcircuit's native ``load`` (float32, ``‖a − b‖/‖b‖ ≤ 1e-6``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")  # an optional dependency: pip install 'qcircuit[peft]'

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from qcircuit import QCError, parse  # noqa: E402
from qcircuit.peft import QuanTAConfig, QuanTALayer, QuanTAModel  # noqa: E402
from qcircuit.runtime import attach, load  # noqa: E402
from test_peft import F32, OTHER, PROGRAM, logits, perturb, rel  # noqa: E402


# --- transformers' model.load_adapter ---------------------------------------------------------
def gates_moved(model, seed: int) -> None:
    """``perturb`` for a PEFT model's gates (trainable or not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".adapter.gates." in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture
def saved(make_llama, tmp_path):
    """Two adapter directories, both freeze_one (gates and their frozen copy): PROGRAM by
    save_pretrained, OTHER by the native save."""
    config = QuanTAConfig(program=PROGRAM, seed=5, options={"init": "freeze_one"})
    model = get_peft_model(make_llama(), config)
    gates_moved(model, 7)
    model.save_pretrained(tmp_path / "peft")
    native = attach(make_llama(), parse(OTHER + "option init = freeze_one\n"), seed=9)
    perturb(native.model, seed=11)
    native.save(tmp_path / "native")
    return tmp_path / "peft", tmp_path / "native"


def landing_left(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, qcircuit.peft.landing.Slot)]


@pytest.mark.parametrize("which", [0, 1], ids=["save_pretrained", "native_save"])
def test_transformers_load_adapter_matches_native_load(saved, which, make_llama, token_ids):
    folder = saved[which]
    model = make_llama()
    info = model.load_adapter(str(folder))
    assert not info.unexpected_keys and not info.missing_keys  # every tensor landed, a clean report
    assert not landing_left(model) and not any(  # ... and was verified and copied in
        isinstance(m, QuanTALayer) and m.qc_pending for m in model.modules())
    native = load(make_llama(), folder, fold=False)
    assert rel(logits(model, token_ids), logits(native, token_ids)) <= F32
    assert rel(logits(model, token_ids), logits(make_llama(), token_ids)) > 1e-2
    assert not any(p.requires_grad for p in model.parameters())  # inference by default


def test_transformers_load_adapter_of_a_sum(make_llama, token_ids, tmp_path):
    """Two circuits on q_proj: its keys name the circuit (``<module>.<circuit>.gates.<i>``)."""
    program = PROGRAM + "circuit small {\n    qudits 8 8\n    gate (0, 1)\n}\napply small to q_proj\n"
    native = attach(make_llama(), parse(program), seed=4)
    perturb(native.model, seed=8)
    native.save(tmp_path)
    model = make_llama()
    info = model.load_adapter(str(tmp_path))
    assert not info.unexpected_keys and not info.missing_keys and not landing_left(model)
    expected = logits(load(make_llama(), tmp_path, fold=False), token_ids)
    assert rel(logits(model, token_ids), expected) <= F32


def test_transformers_load_adapter_trainable_and_gpt2(tiny_gpt2_config, token_ids, tmp_path):
    from transformers import GPT2LMHeadModel

    def make():
        torch.manual_seed(2)
        return GPT2LMHeadModel(tiny_gpt2_config).eval()
    program = "circuit c {\n qudits 4 4 4\n all_pairs\n}\napply c to attn.c_proj\n"
    trained = get_peft_model(make(), QuanTAConfig(program=program, seed=3))
    perturb(trained)
    trained.save_pretrained(tmp_path)
    model = make()
    model.load_adapter(str(tmp_path), is_trainable=True)
    assert rel(logits(model, token_ids), logits(trained, token_ids)) <= F32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapter.gates." in n}
    assert len(trainable) == 2 * 3  # 2 blocks, 3 gates


def test_transformers_from_pretrained_of_an_adapter_directory(make_llama, token_ids, tmp_path):
    """``AutoModelForCausalLM.from_pretrained(adapter_dir)`` loads the base model the adapter
    names, then calls ``load_adapter`` with its own load settings (here a bfloat16 dtype)."""
    from transformers import AutoModelForCausalLM

    make_llama().save_pretrained(tmp_path / "base")
    def base(**kw):
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kw).eval()
    trained = get_peft_model(base(), QuanTAConfig(program=PROGRAM, seed=5))
    perturb(trained)
    trained.save_pretrained(tmp_path / "adapter")
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=dtype).eval()
        assert list(model.peft_config) == ["default"] and not landing_left(model)
        native = load(base(dtype=dtype), tmp_path / "adapter", fold=False)
        assert torch.equal(logits(model, token_ids), logits(native, token_ids))  # the same ops


def test_inject_adapter_in_model_then_set_peft_model_state_dict(saved, make_llama, token_ids):
    """PEFT's functional door, as transformers 4.x's load_adapter and diffusers use it: the
    tuner's hooks run, so the landing slots are settled by the verified tensors."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = inject_adapter_in_model(PeftConfig.from_pretrained(saved[0]), make_llama())
    with pytest.raises(QCError, match="never arrived"):
        model(token_ids)
    set_peft_model_state_dict(model, load_file(saved[0] / "adapter_model.safetensors"))
    assert not landing_left(model)
    native = load(make_llama(), saved[0], fold=False)
    assert rel(logits(model, token_ids), logits(native, token_ids)) <= F32


def test_transformers_load_adapter_in_a_fresh_process(saved, make_llama, token_ids, tmp_path):
    script = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import save_file
import peft.functional
import qcircuit.peft
torch.manual_seed(1)
base = LlamaForCausalLM(LlamaConfig(**{make_llama().config.to_diff_dict()!r})).eval()
base.load_adapter({str(saved[0])!r})
base.load_adapter({str(saved[1])!r}, adapter_name="b")
ids = torch.tensor({token_ids.tolist()!r})
with torch.no_grad():
    first = base(ids).logits
    peft.functional.set_adapter(base, "b")
    save_file({{"default": first, "b": base(ids).logits}}, {str(tmp_path / "out.safetensors")!r})
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for name, folder in (("default", saved[0]), ("b", saved[1])):
        ours = logits(load(make_llama(), folder, fold=False), token_ids)
        assert rel(theirs[name], ours) <= F32, name


def test_transformers_second_adapter_and_state_calls(saved, make_llama, token_ids, monkeypatch):
    import transformers.integrations.peft as hf_peft
    from packaging.version import Version
    from peft.functional import set_adapter

    model = make_llama()
    model.load_adapter(str(saved[0]))
    first = logits(model, token_ids)
    info = model.load_adapter(str(saved[1]), adapter_name="other")  # also adapts o_proj
    assert not info.unexpected_keys and not info.missing_keys and not landing_left(model)
    assert torch.equal(logits(model, token_ids), first)   # loaded, not active
    set_adapter(model, "other")                           # PEFT's API for integrations
    second = logits(load(make_llama(), saved[1], fold=False), token_ids)
    assert rel(logits(model, token_ids), second) <= F32
    set_adapter(model, "default")
    assert torch.equal(logits(model, token_ids), first)
    # transformers' own state calls want peft>=0.22 and refuse the pinned 0.21 ...
    if Version(peft.__version__) < Version(hf_peft.MIN_PEFT_VERSION):
        with pytest.raises(ValueError, match="version of PEFT"):
            model.set_adapter("other")
    # ... and without that check they drive the QuanTA layers as they drive LoRA's
    monkeypatch.setattr(hf_peft, "check_peft_version", lambda min_version: None)
    model.set_adapter("other")
    assert model.active_adapters() == ["other"]
    assert rel(logits(model, token_ids), second) <= F32
    model.disable_adapters()
    assert torch.equal(logits(model, token_ids), logits(make_llama(), token_ids))
    model.enable_adapters()
    assert rel(logits(model, token_ids), second) <= F32
    with pytest.raises(QCError, match="one adapter at a time"):
        model.set_adapter(["default", "other"])
    model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters() == ["default"]
    assert not any(isinstance(m, QuanTALayer) and "other" in m.qc_adapters for m in model.modules())
    assert torch.equal(logits(model, token_ids), first)


def test_peft_model_load_adapter_second_named_adapter(saved, make_llama, token_ids):
    model = PeftModel.from_pretrained(make_llama(), saved[0])
    model.load_adapter(str(saved[1]), adapter_name="b")
    model.set_adapter("b")
    expected = logits(load(make_llama(), saved[1], fold=False), token_ids)
    assert rel(logits(model, token_ids), expected) <= F32
    model.set_adapter("default")
    expected = logits(load(make_llama(), saved[0], fold=False), token_ids)
    assert rel(logits(model, token_ids), expected) <= F32


# --- refusals: a bad checkpoint never leaves random gates in use -------------------------------
def rewrite_tensors(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    path = str(folder / "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_load_adapter_refuses_a_tampered_gate(saved, make_llama, token_ids):
    def bump(tensors):
        tensors["model.layers.1.self_attn.v_proj.gates.2"][0, 0, 0, 0] += 1e-3
    rewrite_tensors(saved[0], bump)
    model = make_llama()
    with pytest.raises(QCError, match=r"v_proj.gates.2 does not match its sha256"):
        model.load_adapter(str(saved[0]))   # the directory is checked before anything is built
    assert not any(isinstance(m, QuanTALayer) for m in model.modules())
    assert torch.equal(logits(model, token_ids), logits(make_llama(), token_ids))
    with pytest.raises(QCError, match="sha256"):  # PEFT's own door checks the hashes too
        PeftModel.from_pretrained(make_llama(), saved[0])


def state_dict_door(model, folder, change) -> None:
    """transformers' ``load_adapter`` with a config and tensors handed over in memory
    (no file qcircuit can check first): the tensors land in the landing slots."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(tensors)
    model.load_adapter(peft_config=PeftConfig.from_pretrained(folder), adapter_state_dict=tensors)


def test_load_adapter_refuses_to_run_with_a_missing_tensor(saved, make_llama, token_ids):
    from peft.functional import delete_adapter

    with pytest.raises(QCError, match=r"missing \['model.layers.0.self_attn.q_proj.gates.1'\]"):
        rewrite_tensors(saved[0], lambda t: t.pop("model.layers.0.self_attn.q_proj.gates.1"))
        make_llama().load_adapter(str(saved[0]))   # the file: refused before anything is built
    model = make_llama()   # in memory, transformers' loader cannot say what the tensors lack ...
    state_dict_door(model, saved[1], lambda t: t.pop("model.layers.0.self_attn.q_proj.gates.0"))
    assert landing_left(model) == ["model.layers.0.self_attn.q_proj.gates",  # that layer only
                                   "model.layers.0.self_attn.q_proj.init_gates"]
    with pytest.raises(QCError, match=r"q_proj was injected for a saved checkpoint whose "
                                      r"tensors never arrived \(missing \['model.layers.0.self_"
                                      r"attn.q_proj.gates.0'\]\)"):
        model(token_ids)  # ... so the layer refuses to run random gates
    with pytest.raises(QCError, match="never arrived"):
        qcircuit.peft.model.checkpoint_tensors(model, "default")  # nor saves them
    state = model.state_dict()
    assert not any(k.startswith("model.layers.0.self_attn.q_proj.qc_") for k in state)
    assert any(k.startswith("model.layers.1.self_attn.q_proj.qc_") for k in state)  # loaded
    delete_adapter(model, "default", prefix=QuanTAModel.prefix)
    assert not landing_left(model)
    assert torch.equal(logits(model, token_ids), logits(make_llama(), token_ids))


def test_load_adapter_refuses_a_reshaped_gate(saved, make_llama, token_ids):
    key = "model.layers.0.self_attn.q_proj.gates.0"
    def reshape(t):
        t[key] = t[key].reshape(64, 64)
    model = make_llama()
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' refusal
        state_dict_door(model, saved[1], reshape)
    with pytest.raises(QCError, match=r"q_proj was injected .* never arrived"):
        model(token_ids)
    rewrite_tensors(saved[1], reshape)
    with pytest.raises(QCError, match=r"q_proj.gates.0 is stored as float32 \[64, 64\], the "
                                      r"config says float32 \[8, 8, 8, 8\]"):
        make_llama().load_adapter(str(saved[1]))


def test_load_adapter_refuses_a_bad_config(saved, make_llama):
    path = saved[0] / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["tensors"]
    path.write_text(json.dumps(config))
    with pytest.raises(QCError, match=r'adapter_config.json: \$: key "tensors" is missing'):
        make_llama().load_adapter(str(saved[0]))
    config["tensors"] = {"model.layers.0.self_attn.q_proj.gates.0": {"dtype": "float32"}}
    path.write_text(json.dumps(config))
    with pytest.raises(QCError, match=r"\$.tensors\["):
        make_llama().load_adapter(str(saved[0]))


def test_load_adapter_refuses_another_model(saved, tiny_gpt2):
    with pytest.raises(QCError, match="'q_proj' .* matches no module"):
        tiny_gpt2.load_adapter(str(saved[0]))
    assert not any(isinstance(m, QuanTALayer) for m in tiny_gpt2.modules())
