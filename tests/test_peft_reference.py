"""Importing adapters from the QuanTA reference implementation (``runtime/reference.py``).

Checkpoints are built here in the reference's key scheme (``base_model.model.M.quanta_weights.
{i} {j}`` for every pair of ``combinations(range(-1, -d-1, -1), 2)``, shape ``(d_j, d_i, d_j,
d_i)``, plus the frozen ``quanta_weights2`` and the folded base weight), written as ``.bin``
and ``.safetensors``, imported, and compared with an independent float64 dense reference of
``W0 + T(θ) − T(θ0)``.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from qcircuit import QCError
from qcircuit.runtime import load
from qcircuit.runtime.reference import import_reference

DIMS = (4, 2, 8)  # 64 features: three qudits, three gates
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")


def pairs(d: int):
    return list(itertools.combinations(range(-1, -d - 1, -1), 2))


def dense64(dims, gates) -> torch.Tensor:
    """T as an (out, in) float64 matrix: apply the reference's gates one by one to the basis."""
    d, n = len(dims), torch.Size(dims).numel()
    x = torch.eye(n, dtype=torch.float64).reshape(n, *dims)
    for (i, j), g in zip(pairs(d), gates):
        a, b = 1 + d + j, 1 + d + i  # axes of qudits d+j, d+i (after the batch axis)
        x = x.movedim((a, b), (-2, -1))
        x = torch.einsum("...pq,rspq->...rs", x, g.double())
        x = x.movedim((-2, -1), (a, b))
    return x.reshape(n, n).T  # column k is T e_k


def reference_state(model, dims=DIMS, seed=0, modules=MODULES):
    """A whole-model state dict as the reference's Trainer writes it, and the dense
    ``W0 + T(θ) − T(θ0)`` of each adapted module."""
    g = torch.Generator().manual_seed(seed)
    state = {f"base_model.model.{k}": v.clone() for k, v in model.state_dict().items()}
    expected = {}
    d = len(dims)
    for m in modules:
        shapes = [(dims[d + j], dims[d + i]) * 2 for i, j in pairs(d)]
        theta0 = [torch.randn(s, generator=g) / 3 for s in shapes]
        theta = [t + 0.2 * torch.randn(t.shape, generator=g) for t in theta0]
        for (i, j), t, t0 in zip(pairs(d), theta, theta0):
            state[f"base_model.model.{m}.quanta_weights.{i} {j}"] = t
            state[f"base_model.model.{m}.quanta_weights2.{i} {j}"] = t0
        w0 = model.get_submodule(m).weight.detach().double()
        n = torch.Size(dims).numel()  # the fork pads T when n < features

        def padded(t):
            return torch.nn.functional.pad(t, (0, w0.shape[1] - n, 0, w0.shape[0] - n))
        state[f"base_model.model.{m}.weight"] = (w0 - padded(dense64(dims, theta0))).float()
        state[f"base_model.model.{m}.merged.merged"] = torch.tensor(False)
        state[f"base_model.model.{m}.frozen_merged.merged"] = torch.tensor(True)
        expected[m] = w0 + padded(dense64(dims, theta) - dense64(dims, theta0))
    return state, expected


@pytest.fixture
def make_llama(tiny_llama_config):
    from transformers import LlamaForCausalLM

    def make(meta: bool = False):
        if meta:
            with torch.device("meta"):
                return LlamaForCausalLM(tiny_llama_config).eval()
        torch.manual_seed(1)
        return LlamaForCausalLM(tiny_llama_config).eval()
    return make


def write(state, path):
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_dense_reference_follows_the_gate_convention():
    """dense64 itself: one gate on qudits (0, 1) of two is the gate's (out, in) matrix."""
    g = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    assert torch.equal(dense64((2, 3), [g]), g.reshape(6, 6))


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_import_matches_the_dense_reference(make_llama, tmp_path, suffix):
    state, expected = reference_state(make_llama())
    write(state, tmp_path / f"pytorch_model{suffix}")
    adapted = import_reference(make_llama(), tmp_path / f"pytorch_model{suffix}")
    assert set(adapted.layers) == set(MODULES)
    for name, layer in adapted.layers.items():
        assert layer.circuit.in_dims == DIMS and len(layer.circuit.gates) == 3
        with torch.no_grad():  # W0 (whatever the state) plus the delta
            merged = layer.base_layer.weight.double() - layer.offset64() + layer.delta64()
        err = float((merged - expected[name]).norm() / expected[name].norm())
        assert err <= 1e-6, name  # float32 gates and W0; the arithmetic is float64
    adapted.merge()
    for name, layer in adapted.layers.items():
        err = float((layer.base_layer.weight.double() - expected[name]).norm()
                    / expected[name].norm())
        assert err <= 2 * torch.finfo(torch.float32).eps, name  # one rounding to float32


def test_import_on_the_meta_device_then_load(make_llama, tmp_path, token_ids):
    state, expected = reference_state(make_llama())
    write(state, tmp_path / "model.safetensors")
    adapted = import_reference(make_llama(meta=True), tmp_path)  # a checkpoint-* directory
    adapted.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["layers"]) == set(MODULES)
    real = load(make_llama(), tmp_path / "out", fold=False)
    real.merge()
    for name in MODULES:
        w = real.model.get_submodule(name).base_layer.weight.double()
        assert float((w - expected[name]).norm() / expected[name].norm()) <= 1e-6


def test_sharded_checkpoint_directory(make_llama, tmp_path):
    state, _ = reference_state(make_llama())
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half],
              "pytorch_model-00002-of-00002.bin": keys[half:]}
    for file, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / file)
    index = {"weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    adapted = import_reference(make_llama(), tmp_path)
    assert set(adapted.layers) == set(MODULES)


def _broken(make_llama, tmp_path, edit):
    state, _ = reference_state(make_llama())
    edit(state)
    write(state, tmp_path / "model.safetensors")
    return lambda: import_reference(make_llama(), tmp_path / "model.safetensors")


def _key(m, i, j, frozen=""):
    return f"base_model.model.{m}.quanta_weights{frozen}.{i} {j}"


@pytest.mark.parametrize("edit, message", [
    (lambda s: [s.pop(_key(m, i, j, "2")) for m in MODULES for i, j in pairs(3)],
     "frozen initial gates"),
    (lambda s: s.pop(_key(MODULES[0], -1, -3)), "not every pair"),
    (lambda s: s.__setitem__(_key(MODULES[0], -1, -2), torch.zeros(2, 8, 3, 8)),
     "only square gates"),
    (lambda s: [s.__setitem__(_key(MODULES[0], -1, -2, f), torch.zeros(3, 8, 3, 8))
                for f in ("", "2")], "inconsistent gate shapes"),
    (lambda s: s.__setitem__(_key(MODULES[0], -1, -2, "2"), torch.zeros(2, 2, 2, 2)),
     "frozen gate '-1 -2' has shape"),
    (lambda s: s.__setitem__(_key("model.layers.0.mlp.up_proj", -1, -2), torch.zeros(8, 8, 8, 8)),
     "only square layers"),
    (lambda s: s.__setitem__(_key("model.layers.0.self_attn.nope", -1, -2), torch.zeros(8, 8, 8, 8)),
     "not a linear layer"),
])
def test_refuses_what_it_cannot_represent(make_llama, tmp_path, edit, message):
    with pytest.raises(QCError, match=message):
        _broken(make_llama, tmp_path, edit)()


def test_refuses_padding(make_llama, tmp_path):
    model = make_llama()
    state, _ = reference_state(model, dims=(4, 2, 4))  # 32 features on a 64-feature layer
    write(state, tmp_path / "model.safetensors")
    with pytest.raises(QCError, match="padded checkpoints"):
        import_reference(make_llama(), tmp_path / "model.safetensors")


def test_refuses_files_without_gates_and_pickled_code(make_llama, tmp_path):
    torch.save({"base_model.model.lm_head.weight": torch.zeros(2)}, tmp_path / "a.bin")
    with pytest.raises(QCError, match="no QuanTA gates"):
        import_reference(make_llama(), tmp_path / "a.bin")
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "b.bin")  # a pickled module
    with pytest.raises(QCError, match="weights-only"):
        import_reference(make_llama(), tmp_path / "b.bin")
    with pytest.raises(QCError, match="no such checkpoint"):
        import_reference(make_llama(), tmp_path / "missing.bin")


def test_embedded_llama2_7b_on_the_meta_device(tmp_path):
    """The paper's layout (16·8·8·4 on q_proj/v_proj of LLaMA-2-7B) from the embedded config,
    with no base weights: the inferred circuit is qcircuit's all_pairs, the gates go through."""
    from safetensors.torch import load_file

    from qcircuit import Circuit
    from qcircuit.runtime import load_model

    model = load_model("llama-2-7b").model
    dims, modules = (16, 8, 8, 4), ("model.layers.0.self_attn.q_proj",
                                    "model.layers.31.self_attn.v_proj")
    g = torch.Generator().manual_seed(4)
    state = {}
    for m in modules:
        for i, j in pairs(4):
            shape = (dims[4 + j], dims[4 + i]) * 2
            state[_key(m, i, j)] = torch.randn(shape, generator=g)
            state[_key(m, i, j, "2")] = torch.randn(shape, generator=g)
    save_file(state, str(tmp_path / "model.safetensors"))
    adapted = import_reference(model, tmp_path)
    assert all(layer.circuit == Circuit(*dims).all_pairs() for layer in adapted.layers.values())
    adapted.save(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for m in modules:
        for k, (i, j) in enumerate(pairs(4)):
            assert torch.equal(saved[f"{m}.gates.{k}"], state[_key(m, i, j)])
            assert torch.equal(saved[f"{m}.init_gates.{k}"], state[_key(m, i, j, "2")])


def test_qcompile_import_reference(make_llama, tiny_llama_config, tmp_path, capsys):
    """The command: a checkpoint and a model directory holding only config.json in, a
    checkpoint that loads onto the real base model out; a second run needs --force."""
    from qcircuit.runtime.cli import main

    state, expected = reference_state(make_llama())
    write(state, tmp_path / "pytorch_model.bin")
    tiny_llama_config.architectures = ["LlamaForCausalLM"]   # the class the keys were saved from
    tiny_llama_config.save_pretrained(tmp_path / "model")   # shapes only, no weights
    argv = ["import-reference", str(tmp_path / "pytorch_model.bin"), "-m",
            str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote 2 adapted layers to {tmp_path / 'out'}\n"
    real = load(make_llama(), tmp_path / "out", fold=False)
    real.merge()
    for name in MODULES:
        w = real.model.get_submodule(name).base_layer.weight.double()
        assert float((w - expected[name]).norm() / expected[name].norm()) <= 1e-6
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert main(["import-reference", str(tmp_path / "missing.bin"), "-m", str(tmp_path / "model"),
                 "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error: ") and err.count("\n") == 1
