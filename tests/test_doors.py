"""Every door as strict as the strictest (issue 22, cases 1 and 2).

Each case is one of the issue's reproductions: a checkpoint edited one way, tried through
the three doors that read one, qcircuit's ``load``, PEFT's ``PeftModel.from_pretrained``
and transformers' ``model.load_adapter``. Each door must raise exactly one ``QCError``
(never PEFT's, transformers', safetensors' or json's own exceptions) that says what is
wrong, and leave the model it was handed bit for bit as it was: every parameter's and
buffer's bytes, and its module types. The second half checks that a refused state change
(fold at load, merge, and PEFT's merge) changes no weight either.
"""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

import qcircuit.peft  # noqa: E402,F401  (registers the method)
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qcircuit import QCError, parse  # noqa: E402
from qcircuit.runtime import attach, checkpoint, load  # noqa: E402
from test_peft import PROGRAM as ZERO_LAST, logits, rel  # noqa: E402
from formats import as_format  # noqa: E402

# these tests exercise the frozen copy and the fold, which the paper's init keeps
PROGRAM = ZERO_LAST + "option init = freeze_one\n"

CONFIG, WEIGHTS = checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME
Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
DOORS = {
    "load": lambda model, folder: load(model, folder),
    "PeftModel.from_pretrained": lambda model, folder: PeftModel.from_pretrained(model, folder),
    "load_adapter": lambda model, folder: model.load_adapter(str(folder)),
}
TIME_BOUND = 5.0


def snapshot(model) -> tuple[list, dict[str, torch.Tensor]]:
    """Module types and the raw bytes of every parameter and buffer."""
    state = {k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()
             for k, v in model.state_dict().items()}
    return [type(m) for m in model.modules()], state


def assert_unchanged(model, before) -> None:
    types, state = snapshot(model)
    assert types == before[0], "the model's modules were replaced"
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], v) for k, v in before[1].items()), "a weight changed"


#: Cases where transformers' ``load_adapter`` looks for the config with ``os.path.isfile``
#: and, finding no regular file, refuses on its own (a ValueError: "adapter model file not
#: found") before PEFT or qcircuit is called; nothing is read and the model is untouched.
NOT_A_FILE = ("config_a_fifo", "config_links_to_dev_zero")


def refused_everywhere(make, folder: Path, match: str, absent: str | None = None,
                       case: str = "") -> None:
    """Every door raises one QCError matching ``match``, quickly, with the model intact."""
    for door, call in DOORS.items():
        model = make()
        before = snapshot(model)
        start = time.perf_counter()
        own = door == "load_adapter" and case in NOT_A_FILE
        expected, pattern = (ValueError, "adapter model file not found") if own else \
            (QCError, match)
        with pytest.raises(expected, match=pattern) as info:
            call(model, folder)
        assert time.perf_counter() - start < TIME_BOUND, door
        assert absent is None or absent not in str(info.value), door
        assert_unchanged(model, before)


# --- a checkpoint, and ways to edit it -------------------------------------------------------
@pytest.fixture
def saved(make_llama, tmp_path) -> Path:
    adapted = attach(make_llama(), parse(PROGRAM), seed=0)
    with torch.no_grad():
        for k, p in enumerate(adapted.trainable_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
    adapted.save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def retensor(folder: Path, change, rehash: bool = False) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))
    if rehash:
        edit(folder, lambda c: c.update(tensors={
            k: r.to_json() for k, r in checkpoint.tensor_records(tensors).items()}))


def as_version_2(config) -> None:
    as_format(config, 2)


def nan_and_swap(tensors) -> None:
    tensors[f"{Q0}.gates.0"][0, 0, 0, 0] = float("nan")
    tensors[f"{Q0}.gates.1"], tensors[f"{Q0}.gates.2"] = \
        tensors[f"{Q0}.gates.2"], tensors[f"{Q0}.gates.1"]


def scale_everywhere(config) -> None:
    config["options"]["scale"] = 2.0
    for rec in config["layers"].values():
        for branch in rec["branches"]:
            branch["scale"] = 2.0


CASES = {
    # case 1: the holes the PEFT doors had
    "tensors_null_nan_and_swapped_gates": (
        lambda f: (retensor(f, nan_and_swap), edit(f, lambda c: c.update(tensors=None))),
        r"\$\.tensors: expected an object, got null"),
    "format_version_1": (lambda f: edit(f, lambda c: c.update(format_version=1)),
                         r"\$\.format_version: expected 4, got an integer 1"),
    "format_version_5": (lambda f: edit(f, lambda c: c.update(format_version=5)),
                         r"format_version 5, newer than this qcircuit reads"),
    "format_version_a_string": (lambda f: edit(f, lambda c: c.update(format_version="3")),
                                r"\$\.format_version: expected 4, got a string"),
    "model_null": (lambda f: edit(f, lambda c: c.update(model=None)),
                   r"\$\.model: expected an object, got null"),
    "in_a_float": (lambda f: edit(f, lambda c: c["layers"][Q0].update({"in": 64.0})),
                   r"\.in: expected an integer from 1 to \d+, got a number 64\.0"),
    "bfloat16_records": (lambda f: retensor(f, lambda t: t.update(
        {k: v.bfloat16() for k, v in t.items()}), rehash=True),
        r'\.dtype: expected "float32" or "float64", got a string "bfloat16"'),
    "version_2_options_scale_edited": (
        lambda f: edit(f, lambda c: (as_version_2(c), c["options"].update(scale=2.0))),
        r"\$\.options\.scale is 2\.0 but the stored program says 1\.0"),
    "options_and_every_branch_scale_edited": (
        lambda f: edit(f, scale_everywhere),
        r"\$\.options\.scale is 2\.0 but the stored program says 1\.0"),
    "branch_scale_edited": (
        lambda f: edit(f, lambda c: c["layers"][V1]["branches"][0].update(scale=2.0)),
        r"the record and the stored program differ: circuit 'attn': the checkpoint has "
        r"scale 2\.0, the program gives 1\.0"),
    "program_a_system_file_path": (lambda f: edit(f, lambda c: c.update(program="/etc/passwd")),
                                   r"adapter_config\.json \(program\):1:1"),
    "program_an_include": (lambda f: edit(f, lambda c: c.update(
        program='include "/etc/passwd"\n' + c["program"])), r"include"),
    # the kinds of raw exception the PEFT doors let through
    "config_not_utf8": (lambda f: (f / CONFIG).write_bytes(b"\xff" + (f / CONFIG).read_bytes()),
                        r"not UTF-8 text at byte 0"),
    "config_malformed_json": (lambda f: (f / CONFIG).write_text('{"peft_type": "QUANTA", '),
                              r"not valid JSON"),
    "config_nested_100000_deep": (
        lambda f: (f / CONFIG).write_text('{"peft_type": "QUANTA", "x": ' + "[" * 100_000
                                          + "]" * 100_000 + "}"), r"nested too deeply"),
    "config_5000_digit_number": (lambda f: (f / CONFIG).write_text((f / CONFIG).read_text(
        ).replace('"in": 64', '"in": ' + "9" * 5000, 1)), r"not valid JSON: a number of 5000 "),
    "config_without_peft_type_or_layers": (
        lambda f: edit(f, lambda c: (c.pop("peft_type"), c.pop("layers"))),
        r'key "layers" is missing'),
    "config_400_MiB": (lambda f: _pad(f / CONFIG, 400 << 20), r"larger than 16 MiB"),
    "config_a_fifo": (lambda f: ((f / CONFIG).unlink(), os.mkfifo(f / CONFIG)),
                      r"not a regular file"),
    "config_links_to_dev_zero": (lambda f: ((f / CONFIG).unlink(),
                                            (f / CONFIG).symlink_to("/dev/zero")),
                                 r"not a regular file"),
    "weights_garbage": (lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 4096),
                        r"cannot read .*header"),
    "weights_header_length_2_63": (lambda f: (f / WEIGHTS).write_bytes(
        struct.pack("<Q", 2 ** 63) + (f / WEIGHTS).read_bytes()[8:]), r"cannot read"),
    "weights_a_fifo": (lambda f: ((f / WEIGHTS).unlink(), os.mkfifo(f / WEIGHTS)),
                       r"not a regular file"),
    "weights_a_directory": (lambda f: ((f / WEIGHTS).unlink(), (f / WEIGHTS).mkdir()),
                            r"not a regular file"),
    "weights_missing_but_a_bin": (lambda f: ((f / WEIGHTS).rename(f / "adapter_model.bin")),
                                  r"adapter_model\.safetensors is missing|\.bin \(a pickle\)"),
    "nan_gate_rehashed": (lambda f: retensor(f, lambda t: t[f"{Q0}.gates.0"].view(-1).__setitem__(
        3, float("nan")), rehash=True), r"non-finite entry"),
}


def _pad(path: Path, size: int) -> None:
    """``path`` grown to ``size`` bytes without using the disk (a sparse tail of spaces
    would be valid JSON whitespace; zeros are not, but nothing may read that far)."""
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("case", CASES)
def test_every_door_refuses_the_same_way_and_changes_nothing(saved, make_llama, case):
    mutate, match = CASES[case]
    mutate(saved)
    refused_everywhere(make_llama, saved, match, absent="root:", case=case)


def test_the_checkpoint_loads_through_every_door(saved, make_llama, token_ids):
    """The untampered template: the refusals above are about the edits."""
    want = logits(load(make_llama(), saved, fold=False), token_ids)
    for door, call in DOORS.items():
        model = make_llama()
        got = call(model, saved)
        assert rel(logits(model if door == "load_adapter" else got, token_ids), want) <= 1e-5


def test_a_config_without_peft_type_loads_through_every_door(saved, make_llama, token_ids):
    """Native ``load`` never needed ``peft_type``; the PEFT doors used to raise KeyError."""
    edit(saved, lambda c: c.pop("peft_type"))
    want = logits(load(make_llama(), saved, fold=False), token_ids)
    model = make_llama()
    model.load_adapter(str(saved))
    assert rel(logits(model, token_ids), want) <= 1e-6
    assert rel(logits(PeftModel.from_pretrained(make_llama(), saved), token_ids), want) <= 1e-6


def test_a_program_that_names_a_qc_file_is_text(saved, make_llama, tmp_path, monkeypatch):
    """A stored program that looks like a path is parsed as text, never read or copied."""
    (tmp_path / "other.qc").write_text(PROGRAM.replace("q_proj, v_proj", "k_proj"))
    monkeypatch.chdir(tmp_path)
    edit(saved, lambda c: c.update(program="other.qc"))
    refused_everywhere(make_llama, saved, r"\(program\):1:1", absent="k_proj")


# --- case 2: a refused state change writes nothing -------------------------------------------
def test_gates_within_the_entry_bound_whose_product_overflows(make_llama, tmp_path):
    """Every entry at the bound ``MAX_GATE_ABS`` (1e6), six gates: the frozen circuit of the
    last layer maps unit inputs to ~1e43. ``load`` used to fold the layers before it, then
    refuse and "roll back" inexactly; now the file is refused before anything is built."""
    program = PROGRAM.replace("all_pairs", "repeat 2 { all_pairs }")
    attach(make_llama(), parse(program), seed=0).save(tmp_path / "c")
    retensor(tmp_path / "c", lambda t: [t[k].fill_(1e6) for k in t
                                        if k.startswith(f"{V1}.init_gates.")], rehash=True)
    refused_everywhere(make_llama, tmp_path / "c",
                       r"frozen initial gates of circuit 'attn' on model\.layers\.1\.self_attn\."
                       r"v_proj map unit-size inputs to entries of .*: a forward would overflow")



def test_a_fold_refused_in_a_later_layer_leaves_every_weight(make_llama, tmp_path, token_ids):
    """float16 base: the frozen circuit of layer 1's v_proj fits float32 (the gates) but
    not float16, so folding it (``W0 − T_θ0`` in float16) overflows after the layers before
    it were planned: ``load`` refuses and the model is bit for bit the one it was handed.
    The PEFT doors never fold: they load it, and agree with ``load(fold=False)``."""
    adapted = attach(make_llama(), parse(PROGRAM), seed=0, fold=False)
    layer = adapted.layers[V1]
    with torch.no_grad():
        for g, g0 in zip(layer.adapter.gates, layer.frozen.gates):
            g.mul_(200.0)
            g0.copy_(g)   # T_θ = T_θ0: the update is zero, T_θ0 alone is ~1e6
    adapted.save(tmp_path / "c")
    model = make_llama().half()
    before = snapshot(model)
    with pytest.raises(QCError, match=r"v_proj: moving to folded would make the base weight "
                                      r"non-finite or overflow torch\.float16"):
        load(model, tmp_path / "c")
    assert_unchanged(model, before)
    native = load(make_llama().half(), tmp_path / "c", fold=False)
    peft_model = PeftModel.from_pretrained(make_llama().half(), tmp_path / "c")
    assert torch.equal(logits(peft_model, token_ids), logits(native, token_ids))


def _overflowing(adapted, name: str) -> None:
    """Gates on ``name`` whose merged update overflows float32 (finite float64)."""
    with torch.no_grad():
        for g in adapted.layers[name].adapter.gates:
            g.fill_(1e20)


@pytest.mark.parametrize("state", ["unfolded", "folded"])
def test_a_merge_refused_in_a_later_layer_changes_no_weight(make_llama, state):
    """The issue's case: earlier layers used to be merged, then "rolled back" by the
    inverse move, off by 0.0625 after the refusal."""
    model = make_llama()
    adapted = attach(model, parse(PROGRAM), seed=0, fold=state == "folded")
    _overflowing(adapted, V1)   # the last layer planned
    before = snapshot(model)
    with pytest.raises(QCError, match=r"v_proj: moving to merged would make the base weight "
                                      r"non-finite or overflow torch\.float32"):
        adapted.merge()
    assert_unchanged(model, before)
    assert set(adapted.states.values()) == {adapted.layers[Q0].state}
    with pytest.raises(QCError, match="overflow"):
        adapted.merge_and_unload()
    assert_unchanged(model, before)


def test_peft_merge_refused_in_a_later_layer_changes_no_weight(make_llama):
    from peft import get_peft_model

    from qcircuit.peft import QuanTAConfig
    model = get_peft_model(make_llama(), QuanTAConfig(program=PROGRAM, seed=5))
    layer = qcircuit.peft.model.adapted_layers(model, "default")[V1][1]
    with torch.no_grad():
        for g in layer.adapter.gates:
            g.fill_(1e20)
    before = snapshot(model)
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(QCError, match="overflow torch.float32"):
            call()
        assert_unchanged(model, before)
