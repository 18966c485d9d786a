"""Tampered checkpoints: every edit is refused by ``load`` with one ``QCError``, quickly.

Each case copies a valid checkpoint (tiny LLaMA, ``freeze_one`` or ``zero_last``), changes
one thing, and loads it onto a fresh base model. The test fails if anything but a
``QCError`` comes out, if the message does not say what is wrong, if the model changed,
or if the refusal takes more than ``TIME_BOUND`` seconds. Where the tamperer also
rewrites the config's hashes (``rehash``), the case tests the check behind the hash.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qcircuit import QCError
from qcircuit.runtime import attach, checkpoint, load
from test_adapter import llama_program, perturb
from formats import as_format  # noqa: E402

TIME_BOUND = 5.0   # seconds; every case takes well under 0.5 s on a 2-core machine
CONFIG, WEIGHTS = checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME
Q0 = "model.layers.0.self_attn.q_proj"
RECORD_KEYS = ("kind", "in", "out", "state", "branches")
BRANCH_KEYS = ("circuit", "qc", "gates", "frozen", "init", "scale", "dropout")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Valid checkpoints, one per init mode, with trained-looking gates."""
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for init in ("freeze_one", "zero_last"):
        adapted = attach(_tiny_llama(), llama_program(init=init), seed=0)
        perturb(adapted)
        adapted.save(root / init)
        out[init] = root / init
    return out


# --- tampering tools ----------------------------------------------------------------------
def _config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def _edit(change):
    """A mutation that edits the parsed config and writes it back."""
    def mutate(folder: Path) -> None:
        config = _config(folder)
        change(config)
        (folder / CONFIG).write_text(json.dumps(config))
    return mutate


def _text(change):
    """A mutation of the config's text."""
    def mutate(folder: Path) -> None:
        (folder / CONFIG).write_text(change((folder / CONFIG).read_text()))
    return mutate


def _raw(path: str, data: bytes | None = None, change=None):
    """A mutation that writes raw bytes (or changes the existing bytes) of one file."""
    def mutate(folder: Path) -> None:
        old = (folder / path).read_bytes()
        (folder / path).write_bytes(data if change is None else change(old))
    return mutate


def _tensors(change, rehash: bool = False):
    """A mutation of the tensors; with ``rehash`` the config's tensor section is rewritten
    to describe the new tensors, as a tamperer who knows the format would."""
    def mutate(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        new = change(tensors)
        tensors = tensors if new is None else new
        save_file(tensors, str(folder / WEIGHTS))
        if rehash:
            config = _config(folder)
            config["tensors"] = {k: r.to_json()
                                 for k, r in checkpoint.tensor_records(tensors).items()}
            (folder / CONFIG).write_text(json.dumps(config))
    return mutate


def _replace_with(path: str, make):
    """Replace one file by what ``make(target_path)`` creates there (fifo, link, dir)."""
    def mutate(folder: Path) -> None:
        (folder / path).unlink()
        make(folder / path)
    return mutate


def _set_entry(name: str, value: float):
    def change(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[5] = value
    return change


def _without(name: str):
    def change(tensors):
        del tensors[name]
    return change


def _swap(a: str, b: str):
    def change(tensors):
        tensors[a], tensors[b] = tensors[b], tensors[a]
    return change


def _flip_bytes(count: int):
    def change(data: bytes) -> bytes:
        start = 8 + struct.unpack("<Q", data[:8])[0]
        out = bytearray(data)
        gen = torch.Generator().manual_seed(count)
        for k in torch.randperm(len(data) - start, generator=gen)[:count].tolist():
            out[start + k] ^= 0x01
        return bytes(out)
    return change


def _header_dtype(data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"F32"', b'"I32"', 1)
    return data[:8] + header + data[8 + n:]


def _record(key: str, value):
    def change(config):
        config["layers"][Q0][key] = value
    return change


def _drop(key: str):
    return lambda config: config["layers"][Q0].pop(key)


def _branch(key: str, value):
    def change(config):
        config["layers"][Q0]["branches"][0][key] = value
    return change


def _drop_branch_key(key: str):
    return lambda config: config["layers"][Q0]["branches"][0].pop(key)


def _as_version_2(config):
    """The config as format 2 wrote it: one circuit per layer, options program-wide."""
    as_format(config, 2)


def _as_dtype(dtype: torch.dtype):
    return lambda tensors: {k: v.to(dtype) for k, v in tensors.items()}


def _with_include(config):
    config["program"] = 'include "/proc/self/environ"\n' + config["program"]


def _deep_model_class(folder: Path) -> None:
    text = (folder / CONFIG).read_text()
    nested = "[" * 900 + "]" * 900
    text = text.replace('"class": "LlamaForCausalLM"', f'"class": {nested}', 1)
    (folder / CONFIG).write_text(text)


def _json_deep(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def _big_config(folder: Path) -> None:
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(" " * (17 << 20) + text)


GATE, INIT = f"{Q0}.gates.1", f"{Q0}.init_gates.1"
F1 = "freeze_one"
Z = "zero_last"
CASES = [
    # (template, id, mutation, what the message must say)
    # the config's structure
    (F1, "layers_a_list", _edit(lambda c: c.update(layers=list(c["layers"].values()))),
     r"\$\.layers: expected an object, got an array"),
    (F1, "layer_record_a_string", _edit(lambda c: c["layers"].update({Q0: "x"})),
     r'\$\.layers\["model\.layers\.0\.self_attn\.q_proj"\]: expected an object, got a string'),
    *[(F1, f"record_lacks_{k}", _edit(_drop(k)), rf'q_proj"\]: key "{k}" is missing')
      for k in RECORD_KEYS],
    *[(F1, f"branch_lacks_{k}", _edit(_drop_branch_key(k)),
       rf'q_proj"\]\.branches\[0\]: key "{k}" is missing') for k in BRANCH_KEYS],
    (F1, "branches_empty", _edit(_record("branches", [])), r"a layer has at least one branch"),
    (F1, "branch_twice", _edit(lambda c: c["layers"][Q0]["branches"].append(
        c["layers"][Q0]["branches"][0])), r"appears twice in one layer"),
    (F1, "branch_scale_edited", _edit(_branch("scale", 2.0)),
     r"record and the stored program differ: circuit .attn.: the checkpoint has scale 2.0"),
    (F1, "branch_scale_a_string", _edit(_branch("scale", "2")), r"scale takes a number"),
    (F1, "version_2_record_edited", _edit(lambda c: (_as_version_2(c), c["layers"][Q0].update(
        frozen=1))), r'q_proj"\]\.branches\[0\]\.frozen: expected true or false'),
    (F1, "record_unknown_key", _edit(_record("lora", 1)), r'unknown key "lora"'),
    (F1, "model_a_string", _edit(lambda c: c.update(model="llama")),
     r"\$\.model: expected an object, got a string"),
    (F1, "model_lacks_dtype", _edit(lambda c: c["model"].pop("dtype")), r'key "dtype" is missing'),
    (F1, "model_class_900_deep", _deep_model_class, r"\$\.model\.class: expected a non-empty str"),
    (F1, "in_a_bool", _edit(_record("in", True)), r"\.in: expected an integer .* got a boolean"),
    (F1, "in_zero", _edit(_record("in", 0)), r"\.in: expected an integer from 1"),
    (F1, "in_a_float", _edit(_record("in", 64.0)), r"\.in: expected an integer .* got a number"),
    (F1, "out_a_string", _edit(_record("out", "64")), r"\.out: expected an integer .* a string"),
    (F1, "in_5000_digits", _text(lambda t: t.replace('"in": 64', '"in": ' + "9" * 5000, 1)),
     r"not valid JSON"),
    (F1, "kind_unknown", _edit(_record("kind", "conv2d")), r'\.kind: expected "linear" or'),
    (F1, "gates_a_string", _edit(_branch("gates", "4x4")), r"\.gates: expected an array"),
    (F1, "gates_empty", _edit(_branch("gates", [])), r"\.gates: a circuit has at least one"),
    (F1, "gate_dim_zero", _edit(_branch("gates", [[0, 4, 4, 4]] * 3)), r"\.gates\[0\]\[0\]"),
    (F1, "gate_dim_a_bool", _edit(_branch("gates", [[True, 4, 4, 4]] * 3)), r"\.gates\[0\]\[0\]"),
    (F1, "frozen_an_int", _edit(_branch("frozen", 1)), r"\.frozen: expected true or false"),
    (F1, "state_merged", _edit(_record("state", "merged")), r'\.state: expected "unfolded" or'),
    (Z, "state_folded_without_frozen_gates", _edit(_record("state", "folded")),
     r'state is "folded" but the layer has no frozen'),
    (F1, "top_level_an_array", _raw(CONFIG, b"[]"), r"\$: expected an object, got an array"),
    (F1, "format_other", _edit(lambda c: c.update(format="peft")), r"not a qcircuit adapter"),
    (F1, "format_version_missing", _edit(lambda c: c.pop("format_version")),
     r"no format_version"),
    (F1, "format_version_5", _edit(lambda c: c.update(format_version=5)), r"newer than this"),
    (F1, "format_version_a_bool", _edit(lambda c: c.update(format_version=True)),
     r"\$\.format_version: expected 4"),
    (F1, "format_version_a_string", _edit(lambda c: c.update(format_version="2")),
     r"\$\.format_version: expected 4"),
    (F1, "unknown_top_key", _edit(lambda c: c.update(extra=1)), r'unknown key "extra"'),
    (F1, "qcircuit_version_an_int", _edit(lambda c: c.update(qcircuit_version=1)),
     r"\$\.qcircuit_version: expected a non-empty string"),
    (F1, "program_not_text", _edit(lambda c: c.update(program=5)), r"\$\.program: expected a str"),
    (F1, "duplicate_key", _text(lambda t: t.replace('"format": ', '"format": "x", "format": ', 1)),
     r'duplicate key "format"'),
    # options against the program, and against the frozen flags and tensors
    (F1, "scale_edited", _edit(lambda c: c["options"].update(scale=2.0)),
     r"\$\.options\.scale is 2\.0 but the stored program says 1\.0"),
    (F1, "dropout_edited", _edit(lambda c: c["options"].update(dropout=0.5)),
     r"\$\.options\.dropout is 0\.5 but the stored program says 0\.0"),
    (F1, "init_edited_to_zero_last", _edit(lambda c: c["options"].update(init="zero_last")),
     r'\$\.options\.init is "zero_last" but the stored program says "freeze_one"'),
    (Z, "init_edited_to_freeze_one", _edit(lambda c: c["options"].update(init="freeze_one")),
     r'\$\.options\.init is "freeze_one" but the stored program says "zero_last"'),
    (F1, "branch_init_edited_to_zero_last", _edit(_branch("init", "zero_last")),
     r'frozen is true but its init is "zero_last"'),
    (Z, "branch_init_edited_to_freeze_one", _edit(_branch("init", "freeze_one")),
     r'frozen is false but its init is "freeze_one"'),
    (F1, "init_and_frozen_flags_edited", _edit(lambda c: [
        b.update(frozen=False, init="zero_last")
        for r in c["layers"].values() for b in r["branches"]]),
     r'\$\.tensors has unexpected|state is "folded" but the layer has no frozen'),
    (F1, "init_unknown", _edit(lambda c: c["options"].update(init="random")),
     r"\$\.options\.init: unknown init mode"),
    (F1, "scale_a_string", _edit(lambda c: c["options"].update(scale="1.0")),
     r"\$\.options\.scale: option scale takes a number"),
    (F1, "dropout_one", _edit(lambda c: c["options"].update(dropout=1.0)), r"dropout must be in"),
    (F1, "options_lack_scale", _edit(lambda c: c["options"].pop("scale")), r'"scale" is missing'),
    (F1, "scale_nan_literal", _text(lambda t: t.replace('"scale": 1.0', '"scale": NaN', 1)),
     r"NaN is not a JSON number"),
    (F1, "scale_1e999", _text(lambda t: t.replace('"scale": 1.0', '"scale": 1e999', 1)),
     r"number 1e999 is out of range"),
    # the stored program
    (F1, "program_includes_a_file", _edit(_with_include), r"include"),
    (F1, "record_names_an_unknown_circuit", _edit(_branch("circuit", "lora")),
     r'q_proj"\]\.branches\[0\]\.circuit is "lora", which the stored program does not'),
    (F1, "program_syntax_error", _edit(lambda c: c.update(program="circuit {")),
     r"adapter_config\.json \(program\):1"),
    (F1, "program_circuit_edited", _edit(lambda c: c.update(program=c["program"].replace(
        "qudits 4 4 4\n    all_pairs", "qudits 4 16\n    all_pairs", 1))),
     r"record and the stored program differ: circuit 'attn': the checkpoint has gate shapes"),
    # the tensors section of the config
    (F1, "tensors_section_missing", _edit(lambda c: c.pop("tensors")), r'"tensors" is missing'),
    (F1, "sha256_not_hex", _edit(lambda c: c["tensors"][GATE].update(sha256="z" * 64)),
     r"sha256: expected 64 lowercase hex"),
    (F1, "section_dtype_float16", _edit(lambda c: c["tensors"][GATE].update(dtype="float16")),
     r'\.dtype: expected "float32" or "float64"'),
    (F1, "section_shape_edited", _edit(lambda c: c["tensors"][GATE].update(shape=[16, 16])),
     r"shape is \[16, 16\] but the layer record says"),
    (F1, "section_lacks_a_tensor", _edit(lambda c: c["tensors"].pop(GATE)), r"\$\.tensors lacks"),
    # the config file itself
    (F1, "config_missing", lambda f: (f / CONFIG).unlink(), r"adapter_config\.json is missing"),
    (F1, "config_empty", _raw(CONFIG, b""), r"not valid JSON"),
    (F1, "config_not_utf8", _raw(CONFIG, change=lambda d: b"\xff\xfe" + d), r"not UTF-8"),
    (F1, "config_a_pickle", _raw(CONFIG, change=lambda d: pickle.dumps(json.loads(d))),
     r"looks like a pickle"),
    (F1, "config_100000_deep", _raw(CONFIG, _json_deep(100_000)), r"nested too deeply"),
    (F1, "config_17_MiB", _big_config, r"larger than 16 MiB"),
    (F1, "config_a_fifo", _replace_with(CONFIG, os.mkfifo), r"not a regular file"),
    (F1, "config_links_to_dev_zero", _replace_with(CONFIG, lambda p: p.symlink_to("/dev/zero")),
     r"not a regular file"),
    (F1, "config_a_directory", _replace_with(CONFIG, os.mkdir), r"not a regular file"),
    # the weights file
    (F1, "weights_missing", lambda f: (f / WEIGHTS).unlink(), r"safetensors is missing"),
    (F1, "weights_empty", _raw(WEIGHTS, b""), r"cannot read .*header too small"),
    (F1, "weights_garbage", _raw(WEIGHTS, b"\x00" * 4096), r"cannot read .*header"),
    (F1, "weights_header_length_2_63", _raw(WEIGHTS, change=lambda d: struct.pack("<Q", 2**63)
                                            + d[8:]), r"cannot read .*header too large"),
    (F1, "weights_truncated", _raw(WEIGHTS, change=lambda d: d[:-100]), r"cannot read"),
    (F1, "weights_a_fifo", _replace_with(WEIGHTS, os.mkfifo), r"not a regular file"),
    (F1, "weights_link_to_dev_zero", _replace_with(WEIGHTS, lambda p: p.symlink_to("/dev/zero")),
     r"not a regular file"),
    (F1, "header_dtype_F32_to_I32", _raw(WEIGHTS, change=_header_dtype), r"stored as I32"),
    *[(F1, f"stored_as_{str(d)[6:]}", _tensors(_as_dtype(d)), r"is stored as .* the config says "
       r"float32") for d in (torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool,
                             torch.uint8)],
    *[(F1, f"stored_as_{str(d)[6:]}_rehashed", _tensors(_as_dtype(d), rehash=True),
       r'\.dtype: expected "float32" or "float64"') for d in (torch.float16, torch.bfloat16,
                                                             torch.int32, torch.bool)],
    *[(F1, f"{label}_in_{which}_rehashed", _tensors(_set_entry(name, value), rehash=True), match)
      for which, name in (("gate", GATE), ("frozen_gate", INIT))
      for label, value, match in (("nan", float("nan"), r"non-finite entry \(nan"),
                                  ("inf", float("inf"), r"non-finite entry \(inf"),
                                  ("1e38", 1e38, r"magnitude 1e\+38, beyond the bound"))],
    (F1, "nan_in_gate", _tensors(_set_entry(GATE, float("nan"))), r"does not match its sha256"),
    (F1, "two_gates_swapped", _tensors(_swap(GATE, f"{Q0}.gates.2")), r"does not match its sha256"),
    (F1, "one_byte_flipped", _raw(WEIGHTS, change=_flip_bytes(1)), r"does not match its sha256"),
    (F1, "fifty_bytes_flipped", _raw(WEIGHTS, change=_flip_bytes(50)), r"sha256"),
    (F1, "tensor_missing_from_file", _tensors(_without(GATE)),
     r"differ from the config's: missing \['model"),
    (F1, "extra_tensor_in_file", _tensors(lambda t: t.update(stray=torch.zeros(1))),
     r"unexpected \['stray'\]"),
    (F1, "tensor_reshaped_rehashed", _tensors(lambda t: t.update({GATE: t[GATE].reshape(16, 16)}),
                                              rehash=True), r"but the layer record says"),
]


@pytest.mark.parametrize("template,mutate,match", [pytest.param(t, m, r, id=i)
                                                   for t, i, m, r in CASES])
def test_tampered_checkpoint_is_refused(templates, tmp_path, template, mutate, match,
                                        monkeypatch):
    monkeypatch.setenv("QC_TAMPER_SECRET", "do-not-echo-3141")
    folder = tmp_path / "ckpt"
    shutil.copytree(templates[template], folder)
    mutate(folder)
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    start = time.perf_counter()
    with pytest.raises(QCError, match=match) as info:
        load(model, folder)
    assert time.perf_counter() - start < TIME_BOUND
    assert "do-not-echo-3141" not in str(info.value)   # no file contents echoed
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_every_issue_case_is_covered():
    """The cases issue 17 lists as accepted wrong or crashed, by their ids here."""
    ids = {i for _, i, _, _ in CASES}
    listed = {"header_dtype_F32_to_I32", "stored_as_float16", "stored_as_bfloat16",
              "stored_as_int32", "stored_as_int64", "stored_as_bool", "stored_as_uint8",
              "nan_in_gate_rehashed", "inf_in_gate_rehashed", "1e38_in_gate_rehashed",
              "nan_in_frozen_gate_rehashed", "inf_in_frozen_gate_rehashed",
              "1e38_in_frozen_gate_rehashed", "two_gates_swapped", "one_byte_flipped",
              "fifty_bytes_flipped", "scale_edited", "dropout_edited", "init_edited_to_zero_last",
              "init_edited_to_freeze_one", "layers_a_list", "layer_record_a_string",
              "model_a_string", "config_not_utf8", "config_100000_deep", "config_a_pickle",
              *(f"record_lacks_{k}" for k in ("kind", "in", "out")),
              *(f"branch_lacks_{k}" for k in ("circuit", "qc", "gates"))}
    assert listed <= ids and len(ids) == len(CASES)


def test_templates_load(templates):
    """The untampered checkpoints load: the refusals above are about the tampering."""
    for folder in templates.values():
        load(_tiny_llama(), folder)


@pytest.mark.parametrize("which", [CONFIG, WEIGHTS])
def test_random_byte_edits_are_refused_or_harmless(templates, tmp_path, which):
    """300 seeded edits of 1-4 bytes (the config anywhere; the weights in the header and the
    first data): each is refused with a QCError, or reads back the template's exact
    program, options and tensors (an edit of whitespace or of an informative field)."""
    want_record, want = checkpoint.read(templates[F1])
    folder = tmp_path / "c"
    shutil.copytree(templates[F1], folder)
    data = (folder / which).read_bytes()
    span = len(data) if which == CONFIG else 8 + struct.unpack("<Q", data[:8])[0] + 256
    rng = random.Random(17)
    refused = 0
    for _ in range(300):
        edited = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            edited[rng.randrange(span)] = rng.choice(b'"1-,]9{0t \n' + bytes([rng.randrange(256)]))
        (folder / which).write_bytes(bytes(edited))
        start = time.perf_counter()
        try:
            record, tensors = checkpoint.read(folder)
        except QCError:
            refused += 1
        else:
            assert record.program == want_record.program
            assert record.layers == want_record.layers
            assert tensors.keys() == want.keys()
            assert all(torch.equal(tensors[k], want[k]) for k in want)
        assert time.perf_counter() - start < TIME_BOUND
    assert refused >= 240   # most single-byte edits break something that is checked
