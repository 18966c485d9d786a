"""Adapter checkpoints: round trips, what the files hold, refusals, atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import qcircuit
from qcircuit import QCError, parse
from qcircuit.runtime import checkpoint
from qcircuit.runtime.adapter import attach, load
from test_adapter import gpt2_program, llama_program, perturb, rel_err


def _fresh(model):
    """A new model of the same class and config, with the same (base) weights."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("fixture,program", [("tiny_llama", llama_program),
                                             ("tiny_gpt2", gpt2_program)])
@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_save_load_round_trip(request, tmp_path, token_ids, fixture, program, init):
    model = request.getfixturevalue(fixture)
    base_copy = _fresh(model)
    adapted = attach(model, program(init=init, scale=0.5), seed=4)
    adapted.fold()
    perturb(adapted)
    with torch.no_grad():
        want = adapted(token_ids).logits
    adapted.save(tmp_path / "ckpt")
    restored = load(base_copy, tmp_path / "ckpt")
    assert restored.program == adapted.program
    assert [t.module_name for t in restored.targets] == [t.module_name for t in adapted.targets]
    for a, b in zip(adapted.trainable_parameters(), restored.trainable_parameters()):
        assert torch.equal(a, b) and b.requires_grad
    with torch.no_grad():
        got = restored(token_ids).logits   # unfolded: the exact formula
    assert rel_err(got, want) < 1e-5
    restored.fold()                         # folding from the fresh W0 gives the same W'
    for name, layer in adapted.layers.items():
        assert torch.equal(layer.base_layer.weight, restored.layers[name].base_layer.weight)
    with torch.no_grad():
        assert torch.equal(restored(token_ids).logits, want)


def test_checkpoint_contents(tiny_llama, tmp_path):
    adapted = attach(tiny_llama, llama_program(dropout=0.1), seed=0)
    adapted.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["qcircuit_version"] == qcircuit.__version__
    assert parse(config["program"]) == adapted.program
    assert config["options"] == {"init": "freeze_one", "scale": 1.0, "dropout": 0.1}
    assert config["model"]["model_type"] == "llama" and config["model"]["hidden_size"] == 64
    up = config["layers"]["model.layers.0.mlp.up_proj"]
    assert (up["in"], up["out"], up["circuit"], up["kind"]) == (64, 172, "up", "linear")
    assert up["gates"] == [[4, 4, 4, 4], [1, 43, 4, 4]]
    tensors = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert tensors.keys() == checkpoint.expected_tensors(config["layers"]).keys()
    layer = adapted.layers["model.layers.0.mlp.up_proj"]
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.gates.1"], layer.adapter.gates[1])
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.init_gates.0"], layer.frozen.gates[0])
    assert len(tensors) == 2 * sum(len(t.circuit.gates) for t in adapted.targets)


def test_zero_last_checkpoint_has_no_frozen_gates(tiny_gpt2, tmp_path):
    attach(tiny_gpt2, gpt2_program(init="zero_last")).save(tmp_path / "z")
    names = load_file(str(tmp_path / "z" / "adapter_model.safetensors")).keys()
    assert names and all(".gates." in n and "init_gates" not in n for n in names)


def _llama(**overrides):
    kw = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


@pytest.fixture
def auto_checkpoint(tmp_path, tiny_llama):
    """A checkpoint with 'qudits auto' circuits, so it binds to differently sized models."""
    from test_adapter import AUTO, adapter_program
    program = adapter_program({"a": (AUTO, ("q_proj", "up_proj"))})
    attach(tiny_llama, program, seed=0).save(tmp_path / "auto")
    return tmp_path / "auto"


def test_load_refuses_a_layer_of_another_shape(auto_checkpoint):
    with pytest.raises(QCError) as info:
        load(_llama(intermediate_size=256), auto_checkpoint)
    text = str(info.value)
    assert "does not match this model" in text and "shape mismatch" in text
    assert "model.layers.0.mlp.up_proj" in text and "64 -> 172" in text and "64 -> 256" in text
    assert "q_proj" not in text   # only what differs


def test_load_refuses_missing_and_extra_modules(auto_checkpoint):
    with pytest.raises(QCError, match=r"model\.layers\.1\.self_attn\.q_proj is in the checkpoint"):
        load(_llama(num_hidden_layers=1), auto_checkpoint)
    with pytest.raises(QCError, match=r"model\.layers\.2\.mlp\.up_proj of the model .* not in"):
        load(_llama(num_hidden_layers=3), auto_checkpoint)


def test_load_refuses_a_model_where_the_program_does_not_bind(tmp_path, tiny_llama, tiny_gpt2):
    attach(tiny_llama, llama_program()).save(tmp_path / "c")
    with pytest.raises(QCError, match="does not fit this model.*q_proj"):
        load(tiny_gpt2, tmp_path / "c")


def test_load_refuses_a_different_circuit_and_bad_tensors(tmp_path, tiny_llama):
    base = _fresh(tiny_llama)
    attach(tiny_llama, llama_program(), seed=0).save(tmp_path / "c")
    config_path = tmp_path / "c" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layers"]["model.layers.0.mlp.up_proj"]["gates"][0] = [16, 16]
    config_path.write_text(json.dumps(config))
    with pytest.raises(QCError, match=r"up_proj: different circuit.*\[16, 16\]"):
        load(base, tmp_path / "c")

    attach(_fresh(base), llama_program(), seed=0).save(tmp_path / "d")
    weights = tmp_path / "d" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.self_attn.v_proj.gates.2"] = torch.zeros(4, 4, 4, 3)
    del tensors["model.layers.0.self_attn.q_proj.init_gates.1"]
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, str(weights))
    with pytest.raises(QCError) as info:
        load(base, tmp_path / "d")
    text = str(info.value)
    assert "v_proj.gates.2 has shape (4, 4, 4, 3), expected (4, 4, 4, 4)" in text
    assert "q_proj.init_gates.1 is missing" in text and "unexpected tensor stray" in text


def test_load_refuses_what_is_not_a_checkpoint(tmp_path, tiny_llama):
    with pytest.raises(QCError, match="adapter_config.json is missing"):
        load(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(QCError, match="cannot read .*adapter_config.json"):
        load(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"format": "other"}')
    with pytest.raises(QCError, match="not a qcircuit adapter config"):
        load(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        '{"format": "qcircuit-adapter", "program": "", "options": {}, "layers": {}}')
    with pytest.raises(QCError, match="cannot read .*adapter_model.safetensors"):
        load(tiny_llama, tmp_path)


def test_load_onto_an_adapted_model_is_refused(tmp_path, tiny_llama):
    adapted = attach(tiny_llama, llama_program())
    adapted.save(tmp_path / "c")
    with pytest.raises(QCError, match="already carries"):
        load(tiny_llama, tmp_path / "c")


def test_save_is_atomic(tmp_path, tiny_llama, monkeypatch):
    adapted = attach(tiny_llama, llama_program(), seed=0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        adapted.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []          # no partial dir, no temp dir left

    monkeypatch.undo()
    adapted.save(tmp_path / "old")
    (tmp_path / "old" / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    perturb(adapted)
    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        adapted.save(tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.undo()
    adapted.save(tmp_path / "old")                 # overwrite keeps the user's other files
    assert (tmp_path / "old" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "old" / "adapter_model.safetensors").read_bytes() != \
        before["adapter_model.safetensors"]


def test_save_refuses_a_file_and_a_merged_adapter(tmp_path, tiny_llama):
    adapted = attach(tiny_llama, llama_program())
    (tmp_path / "f").write_text("x")
    with pytest.raises(QCError, match="is a file"):
        adapted.save(tmp_path / "f")
    adapted.merge()
    with pytest.raises(QCError, match="unmerge before saving"):
        adapted.save(tmp_path / "c")


def test_meta_model_saves_real_gates_that_load_onto_real_weights(tmp_path, tiny_llama_config,
                                                                  tiny_llama, token_ids):
    with torch.device("meta"):
        shape_only = LlamaForCausalLM(tiny_llama_config)
    adapted = attach(shape_only, llama_program(), seed=9)
    adapted.save(tmp_path / "meta")
    base = _fresh(tiny_llama)
    restored = load(tiny_llama, tmp_path / "meta", fold=False)
    for a, b in zip(adapted.trainable_parameters(), restored.trainable_parameters()):
        assert torch.equal(a, b) and not b.is_meta
    with torch.no_grad():   # T_θ = T_θ0 after load: the model is the base model exactly
        assert torch.equal(restored(token_ids).logits, base(token_ids).logits)


def test_no_pickle_in_the_runtime():
    root = Path(__file__).resolve().parents[1] / "runtime"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "torch.load" not in text and "import pickle" not in text, path


def test_load_refuses_a_bad_program_in_the_config(tmp_path, tiny_llama):
    base = _fresh(tiny_llama)
    attach(tiny_llama, llama_program()).save(tmp_path / "c")
    path = tmp_path / "c" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["options"]["init"] = "random"
    path.write_text(json.dumps(config))
    with pytest.raises(QCError, match="bad program or options.*random"):
        load(base, tmp_path / "c")
