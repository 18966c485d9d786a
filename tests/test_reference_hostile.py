"""Hostile reference checkpoints for ``qcompile import-reference`` (issue 22, case 4).

Each case builds a small directory or file that used to hang the importer, read outside the
directory, run out of memory or end in a traceback, and checks that ``import_reference``
refuses it with one ``QCError`` saying why, in under ``TIME_BOUND`` seconds and without the
process's peak memory growing by ``MEMORY_BOUND`` (sparse files stand for huge ones, so
nothing here uses the disk or memory it declares).
"""
from __future__ import annotations

import json
import os
import resource
import struct
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qcircuit import QCError
from qcircuit.runtime.reference import import_reference
from test_peft_reference import MODULES, pairs, reference_state

TIME_BOUND = 5.0
MEMORY_BOUND = 300 << 20
GATE = f"base_model.model.{MODULES[0]}.quanta_weights.-1 -2"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def safetensors_header(path: Path, tensors: dict[str, tuple[str, list[int]]],
                       data_bytes: int) -> None:
    """A safetensors file whose header declares ``tensors`` (name -> dtype, shape) laid out
    one after another, followed by ``data_bytes`` of (sparse) data."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F32": 4, "C64": 8, "I32": 4}[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data_bytes)


def valid_state(tiny_llama) -> dict[str, torch.Tensor]:
    state, _ = reference_state(tiny_llama)
    return {k: v for k, v in state.items() if "quanta_weights" in k}


def index_dir(root: Path, weight_map: object, name="pytorch_model.bin.index.json") -> Path:
    folder = root / "ckpt"
    folder.mkdir()
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# --- the cases: each makes (under tmp) what import_reference is handed ----------------------
def fifo_shard(tmp, model):
    folder = index_dir(tmp, {GATE: "shard.bin"})
    os.mkfifo(folder / "shard.bin")
    return folder


def shard_outside(tmp, model):
    (tmp / "outside").mkdir()
    torch.save(valid_state(model), tmp / "outside" / "x.bin")
    return index_dir(tmp, {GATE: "../outside/x.bin"})


def absolute_shard(tmp, model):
    torch.save(valid_state(model), tmp / "x.bin")
    return index_dir(tmp, {GATE: str(tmp / "x.bin")})


def shard_links_out(tmp, model):
    torch.save(valid_state(model), tmp / "x.bin")
    folder = index_dir(tmp, {GATE: "shard.bin"})
    (folder / "shard.bin").symlink_to(tmp / "x.bin")
    return folder


def shard_links_to_dev_zero(tmp, model):
    folder = index_dir(tmp, {GATE: "shard.safetensors"},
                       name="model.safetensors.index.json")
    (folder / "shard.safetensors").symlink_to("/dev/zero")
    return folder


def file_links_to_dev_zero(tmp, model):
    (tmp / "model.safetensors").symlink_to("/dev/zero")
    return tmp / "model.safetensors"


def single_file_a_fifo(tmp, model):
    (tmp / "ckpt").mkdir()
    os.mkfifo(tmp / "ckpt" / "model.safetensors")
    return tmp / "ckpt"


def index_not_utf8(tmp, model):
    folder = index_dir(tmp, {})
    (folder / "pytorch_model.bin.index.json").write_bytes(b'{"weight_map": {"\xff": 1}}')
    return folder


def index_malformed(tmp, model):
    folder = index_dir(tmp, {})
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {')
    return folder


def index_a_list(tmp, model):
    return index_dir(tmp, [GATE, "shard.bin"])


def index_value_none(tmp, model):
    return index_dir(tmp, {GATE: None})


def index_value_a_list(tmp, model):
    return index_dir(tmp, {GATE: ["a.bin"]})


def index_5000_digits(tmp, model):
    folder = index_dir(tmp, {})
    (folder / "pytorch_model.bin.index.json").write_text(
        '{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    return folder


def index_100_MiB(tmp, model):
    folder = index_dir(tmp, {})
    with open(folder / "pytorch_model.bin.index.json", "r+b") as f:
        f.truncate(100 << 20)
    return folder


def key_with_a_huge_offset(tmp, model):
    save_file({f"base_model.model.{MODULES[0]}.quanta_weights.-1 -100000": torch.zeros(1)},
              str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def key_with_5000_digits(tmp, model):
    save_file({f"base_model.model.{MODULES[0]}.quanta_weights.-1 -{'9' * 5000}": torch.zeros(1)},
              str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def safetensors_garbage(tmp, model):
    (tmp / "model.safetensors").write_bytes(b"\x07" * 4096)
    return tmp / "model.safetensors"


def safetensors_header_beyond_the_file(tmp, model):
    safetensors_header(tmp / "model.safetensors", {GATE: ("F32", [8, 8, 8, 8])}, 16)
    return tmp / "model.safetensors"


def gate_of_2_gib(tmp, model):
    safetensors_header(tmp / "model.safetensors", {GATE: ("F32", [512, 512, 512, 4])}, 2 << 30)
    return tmp / "model.safetensors"


def bin_declares_a_2_gib_tensor(tmp, model):
    """A torch.save archive whose pickle declares a 2 GiB storage and tensor over 64 bytes
    of data (the pickle written by hand: torch.save would need the 2 GiB)."""
    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s.encode())) + s.encode()

    def num(n: int) -> bytes:
        return b"J" + struct.pack("<i", n)
    pickle = (b"\x80\x02}" + text(GATE) + b"ctorch._utils\n_rebuild_tensor_v2\n((" +
              text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") +
              num(2 ** 29) + b"tQ" + num(0) + b"(" + b"".join(map(num, (512, 512, 512, 4))) +
              b"t(" + b"".join(map(num, (2 ** 20, 2 ** 11, 4, 1))) +
              b"t\x89ccollections\nOrderedDict\n)RtRs.")
    torch.save({GATE: torch.zeros(2, 2, 2, 2)}, tmp / "small.bin")
    with zipfile.ZipFile(tmp / "small.bin") as src, \
            zipfile.ZipFile(tmp / "pytorch_model.bin", "w") as out:
        for info in src.infolist():
            out.writestr(info, pickle if info.filename.endswith("data.pkl") else
                         src.read(info.filename))
    return tmp / "pytorch_model.bin"


def complex_gates(tmp, model):
    state = {k: v.to(torch.complex64) for k, v in valid_state(model).items()}
    save_file(state, str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def integer_gates(tmp, model):
    state = {k: v.to(torch.int32) for k, v in valid_state(model).items()}
    torch.save(state, tmp / "pytorch_model.bin")
    return tmp / "pytorch_model.bin"


def nan_gate(tmp, model):
    state = valid_state(model)
    state[GATE] = state[GATE].clone()
    state[GATE][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp / "model.safetensors"))
    return tmp / "model.safetensors"


def legacy_pickle(tmp, model):
    torch.save(valid_state(model), tmp / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return tmp / "pytorch_model.bin"


def bin_not_a_tensor(tmp, model):
    torch.save({GATE: [1.0, 2.0]}, tmp / "pytorch_model.bin")
    return tmp / "pytorch_model.bin"


def gate_in_two_shards(tmp, model):
    state = valid_state(model)
    folder = index_dir(tmp, {k: ("a.bin" if k == GATE else "b.bin") for k in state})
    torch.save({GATE: state[GATE]}, folder / "a.bin")
    torch.save(state, folder / "b.bin")
    return folder


CASES = {
    fifo_shard: r"not a regular file",
    shard_outside: r"not a file inside the directory",
    absolute_shard: r"not a file inside the directory",
    shard_links_out: r"leads outside the directory",
    shard_links_to_dev_zero: r"leads outside the directory",
    file_links_to_dev_zero: r"not a regular file",
    single_file_a_fifo: r"not a regular file",
    index_not_utf8: r"not UTF-8",
    index_malformed: r"not valid JSON",
    index_a_list: r"a \"weight_map\" object",
    index_value_none: r"expected a file name, got NoneType",
    index_value_a_list: r"expected a file name, got list",
    index_5000_digits: r"not valid JSON: a number of 5000 digits",
    index_100_MiB: r"larger than 64 MiB",
    key_with_a_huge_offset: r"qudit offsets i > j in -1 … -64, got -1 -100000",
    key_with_5000_digits: r"not a gate key of the form",
    safetensors_garbage: r"cannot read .* as safetensors",
    safetensors_header_beyond_the_file: r"cannot read .* as safetensors",
    gate_of_2_gib: r"has shape \[512, 512, 512, 4\]: a gate is 4-dimensional with at most",
    bin_declares_a_2_gib_tensor: r"cannot read .* as a weights-only torch checkpoint",
    complex_gates: r"is complex64: only real floating-point gates",
    integer_gates: r"is int32: only real floating-point gates",
    nan_gate: r"non-finite entry",
    legacy_pickle: r"not a zip archive",
    bin_not_a_tensor: r"holds a list, not a tensor",
    gate_in_two_shards: r"is in two shards",
}


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
def test_a_hostile_checkpoint_is_refused_quickly_and_in_bounded_memory(make, tmp_path,
                                                                       tiny_llama):
    target = make(tmp_path, tiny_llama)
    rss = peak_rss()
    start = time.perf_counter()
    with pytest.raises(QCError, match=CASES[make]):
        import_reference(tiny_llama, target)
    assert time.perf_counter() - start < TIME_BOUND
    assert peak_rss() - rss < MEMORY_BOUND


def test_the_command_says_it_in_one_line(tmp_path, tiny_llama, tiny_llama_config, capsys):
    from qcircuit.runtime.cli import main

    tiny_llama_config.architectures = ["LlamaForCausalLM"]
    tiny_llama_config.save_pretrained(tmp_path / "model")
    target = fifo_shard(tmp_path, tiny_llama)
    code = main(["import-reference", str(target), "-m", str(tmp_path / "model"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a regular file" in err
    assert not (tmp_path / "out").exists()


def test_a_shard_inside_the_directory_still_loads(tmp_path, tiny_llama):
    """The rules refuse escapes, not ordinary sharded checkpoints (links inside included)."""
    state = valid_state(tiny_llama)
    folder = index_dir(tmp_path, {k: "sub/shard.bin" for k in state})
    (folder / "sub").mkdir()
    torch.save(state, folder / "sub" / "real.bin")
    (folder / "sub" / "shard.bin").symlink_to("real.bin")
    adapted = import_reference(tiny_llama, folder)
    assert set(adapted.layers) == set(MODULES) and len(pairs(3)) == 3
