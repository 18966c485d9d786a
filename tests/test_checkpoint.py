"""Adapter checkpoints: round trips, what the files hold, refusals, atomic writes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import qcircuit
from qcircuit import QCError, parse
from qcircuit.runtime import atomic_dir, checkpoint, record
from qcircuit.runtime.adapter import attach, load
from test_adapter import gpt2_program, llama_program, perturb, rel_err
from formats import as_format  # noqa: E402


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
    adapted = attach(tiny_llama, llama_program(init="freeze_one", dropout=0.1), seed=0)
    adapted.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["qcircuit_version"] == qcircuit.__version__
    assert config["format_version"] == checkpoint.FORMAT_VERSION
    assert parse(config["program"]) == adapted.program
    assert config["options"] == {"init": "freeze_one", "scale": 1.0, "dropout": 0.1}
    assert config["model"]["model_type"] == "llama" and config["model"]["hidden_size"] == 64
    assert config["model"]["dtype"] == "float32"
    up = config["layers"]["model.layers.0.mlp.up_proj"]
    assert (up["in"], up["out"], up["kind"], up["state"]) == (64, 172, "linear", "unfolded")
    [branch] = up["branches"]
    assert (branch["circuit"], branch["frozen"], branch["init"]) == ("up", True, "freeze_one")
    assert (branch["scale"], branch["dropout"]) == (1.0, 0.1)
    assert branch["gates"] == [[4, 4, 4, 4], [1, 43, 4, 4]]
    tensors = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert tensors.keys() == checkpoint.read(tmp_path / "ckpt")[0].expected_tensors().keys()
    layer = adapted.layers["model.layers.0.mlp.up_proj"]
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.gates.1"], layer.adapter.gates[1])
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.init_gates.0"], layer.frozen.gates[0])
    assert len(tensors) == 2 * sum(len(t.circuit.gates) for t in adapted.targets)
    assert config["tensors"] == {k: r.to_json()
                                 for k, r in checkpoint.tensor_records(tensors).items()}
    entry = config["tensors"]["model.layers.0.mlp.up_proj.gates.1"]
    assert (entry["dtype"], entry["shape"]) == ("float32", [1, 43, 4, 4])
    assert entry["sha256"] == hashlib.sha256(tensors["model.layers.0.mlp.up_proj.gates.1"]
                                             .numpy().tobytes()).hexdigest()


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


def test_load_refuses_a_different_circuit(tmp_path, tiny_llama):
    base = _fresh(tiny_llama)
    attach(tiny_llama, llama_program(), seed=0).save(tmp_path / "c")
    config_path = tmp_path / "c" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    up = config["layers"]["model.layers.0.mlp.up_proj"]
    up["branches"][0]["qc"] = up["branches"][0]["qc"].replace("gate (0, 1)", "gate (1, 0)")
    config_path.write_text(json.dumps(config))
    with pytest.raises(QCError, match=r"up_proj\"\]: the record and the stored program differ: "
                                      r"circuit 'up' is defined differently"):
        load(base, tmp_path / "c")


def test_check_tensors_names_what_is_missing_extra_or_reshaped(tmp_path, tiny_llama):
    attach(tiny_llama, llama_program(), seed=0).save(tmp_path / "c")
    saved, tensors = checkpoint.read(tmp_path / "c")
    unhashed = dataclasses.replace(saved, tensors=None)
    for check, records in ((checkpoint.check_tensors, saved.tensors),
                           (checkpoint.check_unrecorded, unhashed)):
        check("c", records, tensors)
        wrong = dict(tensors)
        del wrong["model.layers.0.self_attn.q_proj.init_gates.1"]
        wrong["stray"] = torch.zeros(1)
        with pytest.raises(QCError, match=r"c: the tensors differ from the config's: missing "
                                          r"\['model.layers.0.self_attn.q_proj.init_gates.1'\], "
                                          r"unexpected \['stray'\]"):
            check("c", records, wrong)
        wrong = {**tensors, "model.layers.1.self_attn.v_proj.gates.2": torch.zeros(4, 4, 4, 3)}
        with pytest.raises(QCError, match=r"v_proj.gates.2 is float32 \[4, 4, 4, 3\]"):
            check("c", records, wrong)


def test_load_refuses_what_is_not_a_checkpoint(tmp_path, tiny_llama):
    with pytest.raises(QCError, match="adapter_config.json is missing"):
        load(tiny_llama, tmp_path)
    with pytest.raises(QCError, match="not an adapter checkpoint directory"):
        load(tiny_llama, tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(QCError, match="adapter_config.json: not valid JSON"):
        load(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"format": "other"}')
    with pytest.raises(QCError, match="not a qcircuit adapter config"):
        load(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        '{"format": "qcircuit-adapter", "program": "", "options": {}, "layers": {}}')
    with pytest.raises(QCError, match="no format_version: it was saved by qcircuit 0.1"):
        load(tiny_llama, tmp_path)


def test_symlinked_checkpoint_files_load(tmp_path, tiny_llama):
    """A cache that links a checkpoint's files to blobs elsewhere (as the HF hub does)."""
    base = _fresh(tiny_llama)
    adapted = attach(tiny_llama, llama_program(), seed=0)
    perturb(adapted)
    adapted.save(tmp_path / "c")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "linked").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.move(tmp_path / "c" / name, tmp_path / "blobs" / name)
        (tmp_path / "linked" / name).symlink_to(tmp_path / "blobs" / name)
    restored = load(base, tmp_path / "linked")
    for a, b in zip(adapted.trainable_parameters(), restored.trainable_parameters()):
        assert torch.equal(a, b)


def test_dtype_warning_for_a_model_of_another_dtype(tmp_path, tiny_llama):
    base, base64 = _fresh(tiny_llama), _fresh(tiny_llama).double()
    attach(tiny_llama, llama_program()).save(tmp_path / "c")
    saved, _ = checkpoint.read(tmp_path / "c")
    assert record.dtype_warning(saved, base) is None
    text = record.dtype_warning(saved, base.to(torch.bfloat16))
    assert "saved from a float32 model and is loaded into a bfloat16 model" in text
    assert "float32 gates are loaded as float32" in text
    restored = pytest.warns(UserWarning, match="loaded into a bfloat16 model")
    with restored:
        adapted = load(base, tmp_path / "c")
    assert {g.dtype for g in adapted.trainable_parameters()} == {torch.float32}
    text = record.dtype_warning(saved, base64)
    assert "float32 gates are loaded as float64" in text


def test_save_after_model_to_bfloat16_keeps_the_gates_exactly(tmp_path, make_llama):
    """``model.to(torch.bfloat16)`` makes the gates bfloat16 too: saving widens them to
    float32 (exact), and they load back as the float32 gates a bfloat16 model gets."""
    model = make_llama()
    adapted = attach(model, llama_program(), seed=0)
    perturb(adapted)
    model.to(torch.bfloat16)
    gates = [g.detach().clone() for g in adapted.trainable_parameters()]
    assert {g.dtype for g in gates} == {torch.bfloat16}
    adapted.save(tmp_path / "c")
    saved, _ = checkpoint.read(tmp_path / "c")
    assert {t.dtype for t in saved.tensors.values()} == {"float32"}
    assert saved.model["dtype"] == "bfloat16"
    restored = load(make_llama().to(torch.bfloat16), tmp_path / "c")
    for a, b in zip(gates, restored.trainable_parameters()):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)


def test_load_onto_an_adapted_model_is_refused(tmp_path, tiny_llama):
    adapted = attach(tiny_llama, llama_program())
    adapted.save(tmp_path / "c")
    with pytest.raises(QCError, match="already carries"):
        load(tiny_llama, tmp_path / "c")


# --- writing: all or nothing --------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _saved(tmp_path: Path, model) -> tuple:
    """An adapter saved at tmp_path/old, a changed copy of its gates, and the old bytes."""
    adapted = attach(model, llama_program(), seed=0)
    adapted.save(tmp_path / "old")
    perturb(adapted)
    return adapted, _files(tmp_path / "old")


def _broken(error: BaseException):
    def broken_save_file(*args, **kwargs):
        raise error
    return broken_save_file


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["oserror", "ctrl-c"])
def test_a_failed_write_leaves_nothing_and_the_old_checkpoint_intact(tmp_path, tiny_llama,
                                                                     monkeypatch, error):
    adapted, before = _saved(tmp_path, tiny_llama)
    monkeypatch.setattr(checkpoint, "save_file", _broken(error))
    with pytest.raises(type(error)):
        adapted.save(tmp_path / "new")
    with pytest.raises(type(error)):
        adapted.save(tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]   # no temp dir left
    assert _files(tmp_path / "old") == before


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, tiny_llama, monkeypatch):
    """Where the one-step exchange is missing, the swap is two renames; the second fails."""
    adapted, before = _saved(tmp_path, tiny_llama)
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:   # the old one is aside, the new one is not yet in place
            raise OSError("crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="crash between"):
        adapted.save(tmp_path / "old")
    assert calls[0][0] == "old" and calls[1][1] == "old" and calls[2][1] == "old"
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert _files(tmp_path / "old") == before
    adapted.save(tmp_path / "old")   # the two-rename swap itself works
    assert _files(tmp_path / "old")["adapter_model.safetensors"] != \
        before["adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_failed_exchange_leaves_the_old_checkpoint(tmp_path, tiny_llama, monkeypatch):
    adapted, before = _saved(tmp_path, tiny_llama)

    def exchange(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(atomic_dir, "_exchange", exchange)
    with pytest.raises(OSError, match="exchange failed"):
        adapted.save(tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert _files(tmp_path / "old") == before


def test_overwrite_replaces_the_whole_checkpoint(tmp_path, tiny_llama):
    adapted, before = _saved(tmp_path, tiny_llama)
    adapted.save(tmp_path / "old")
    after = _files(tmp_path / "old")
    assert after.keys() == before.keys() and after != before
    config, tensors = checkpoint.read(tmp_path / "old")   # new config with new weights
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.gates.0"],
                       adapted.trainable_parameters()[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_write_without_overwrite_refuses_an_existing_checkpoint(tmp_path, tiny_llama):
    adapted, before = _saved(tmp_path, tiny_llama)
    config, tensors = checkpoint.read(tmp_path / "old")
    with pytest.raises(QCError, match=r"already holds an adapter checkpoint: pass "
                                      r"overwrite=True \(qcompile --force\)"):
        checkpoint.write(tmp_path / "old", config, tensors, overwrite=False)
    assert _files(tmp_path / "old") == before
    checkpoint.write(tmp_path / "new", config, tensors, overwrite=False)
    (tmp_path / "empty").mkdir()
    checkpoint.write(tmp_path / "empty", config, tensors, overwrite=False)
    assert _files(tmp_path / "new") == _files(tmp_path / "empty") == before


def _run_dir(tmp_path: Path) -> Path:
    """A training run's output directory: checkpoint folders and a log beside them."""
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "optimizer.pt").write_bytes(b"opt")
    (run / "notes.txt").write_text("mine")
    return run


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_save_into_a_directory_with_other_files_keeps_them(tmp_path, tiny_llama, token_ids):
    """Issue 24: adapted.save(trainer.args.output_dir) works beside checkpoint-* folders;
    nothing else in the directory is touched, and a second save replaces only the adapter."""
    adapted, _ = _saved(tmp_path, tiny_llama)
    run = _run_dir(tmp_path)
    others = _tree(run)
    adapted.save(run)
    assert {k: v for k, v in _tree(run).items() if k in others} == others
    assert set(_tree(run)) - set(others) == {checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME}
    first = _tree(run)
    perturb(adapted, seed=8)
    adapted.save(run)
    assert _tree(run)[checkpoint.WEIGHTS_NAME] != first[checkpoint.WEIGHTS_NAME]
    assert {k: v for k, v in _tree(run).items() if k in others} == others
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint-5", "notes.txt", checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME])
    fresh = load(type(tiny_llama)(tiny_llama.config), run)   # a complete, verified pair
    assert fresh.program == adapted.program
    with pytest.raises(QCError, match="already holds an adapter checkpoint"):
        adapted.save(run, overwrite=False)


@pytest.mark.parametrize("when", [1, 2], ids=["first_rename", "second_rename"])
def test_a_failed_commit_in_a_shared_directory_puts_the_old_files_back(tmp_path, tiny_llama,
                                                                       monkeypatch, when):
    """An error at either rename (the weights, then the config) leaves the old pair and
    every other file as they were, and no temporary directory."""
    adapted, _ = _saved(tmp_path, tiny_llama)
    run = _run_dir(tmp_path)
    adapted.save(run)
    before = _tree(run)
    perturb(adapted, seed=9)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == when:
            raise KeyboardInterrupt   # as Ctrl-C or SIGTERM (raised) would, mid-commit
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        adapted.save(run)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[:2] == [checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME][:when]
    assert _tree(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint-5", "notes.txt", checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME])


def test_a_first_save_that_fails_in_a_shared_directory_leaves_nothing(tmp_path, tiny_llama,
                                                                      monkeypatch):
    adapted, _ = _saved(tmp_path, tiny_llama)
    run = _run_dir(tmp_path)
    before = _tree(run)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == checkpoint.CONFIG_NAME:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        adapted.save(run)
    assert _tree(run) == before


def test_write_refuses_what_read_would_refuse(tmp_path, tiny_llama):
    adapted, _ = _saved(tmp_path, tiny_llama)
    config, tensors = checkpoint.read(tmp_path / "old")
    name = "model.layers.0.self_attn.q_proj.gates.0"
    for bad, match in ((float("nan"), "non-finite entry"), (1e7, "beyond the bound")):
        broken = dict(tensors)
        broken[name] = tensors[name].clone()
        broken[name][0, 0, 0, 0] = bad
        with pytest.raises(QCError, match=match):
            checkpoint.write(tmp_path / "bad", config, broken)
    with pytest.raises(QCError, match=r'\.dtype: expected "float32" or "float64"'):
        checkpoint.write(tmp_path / "bad", config, {**tensors, name: tensors[name].half()})
    edited = dataclasses.replace(config, program=config.program.with_options(scale=3.0))
    with pytest.raises(QCError, match=r"the record and the stored program differ: circuit "
                                      r"'attn': the checkpoint has scale 1.0, the program gives 3.0"):
        checkpoint.write(tmp_path / "bad", edited, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_build_config_and_a_folded_state_round_trip(tmp_path, tiny_llama):
    """The API Adapted.save calls: records with a state, the tensor section, write, read."""
    adapted = attach(tiny_llama, llama_program(init="freeze_one"), seed=0)
    adapted.fold()
    tensors = {}
    for name, layer in adapted.layers.items():
        tensors.update(layer.tensors(name))
    states = {name: "folded" for name in adapted.layers}
    written = record.from_targets(adapted.program, adapted.model, adapted.targets, states)
    checkpoint.write(tmp_path / "c", written, tensors)
    got_record, got = checkpoint.read(tmp_path / "c")
    assert got_record == written.with_tensors(checkpoint.tensor_records(tensors))
    assert got_record.qcircuit_version == qcircuit.__version__
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)
    assert got_record.program == adapted.program
    assert {r.state for r in got_record.layers.values()} == {"folded"}
    assert record.from_json(got_record.to_json(), "again") == got_record


def test_sigterm_while_writing_cleans_up_and_reaches_the_old_handler(tmp_path, tiny_llama,
                                                                     monkeypatch):
    adapted, before = _saved(tmp_path, tiny_llama)
    real_save_file, received = checkpoint.save_file, []

    def save_then_sigterm(*args, **kwargs):
        real_save_file(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)   # the handler runs at the next bytecode

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(checkpoint, "save_file", save_then_sigterm)
        with pytest.raises(QCError, match="interrupted by SIGTERM; the target is unchanged"):
            adapted.save(tmp_path / "old")
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert _files(tmp_path / "old") == before


def _run_script(tmp_path: Path, body: str, *args: str, launcher=()) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, str(script), *args], env=env,
                          capture_output=True, text=True, timeout=180)


def test_sigterm_while_writing_ends_the_process_and_leaves_no_temp_dir(tmp_path, tiny_llama):
    _, before = _saved(tmp_path, tiny_llama)
    result = _run_script(tmp_path, """
        import os, signal, sys, time
        from qcircuit.runtime import atomic_dir, checkpoint
        config, tensors = checkpoint.read(sys.argv[1])
        real_save_file = checkpoint.save_file
        def save_then_sigterm(*args, **kwargs):
            real_save_file(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        checkpoint.save_file = save_then_sigterm
        tensors = {k: v + 0.5 for k, v in tensors.items()}
        checkpoint.write(sys.argv[1], config, tensors)
        print("not reached")
        """, str(tmp_path / "old"))
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert "not reached" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "script.py"]
    assert _files(tmp_path / "old") == before


def test_every_rank_saving_to_one_path_does_not_race(tmp_path, tiny_llama):
    """Two gloo processes each save 20 times to one path: rank 0 writes, rank 1 waits;
    a failure on rank 0 is an error on every rank."""
    _saved(tmp_path, tiny_llama)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "results").mkdir()
    result = _run_script(tmp_path, """
        import sys
        import torch.distributed as dist
        from qcircuit import QCError
        from qcircuit.runtime import atomic_dir, checkpoint
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        config, tensors = checkpoint.read(sys.argv[1])
        real_save_file, writes = checkpoint.save_file, []
        def counting_save_file(*args, **kwargs):
            writes.append(1)
            real_save_file(*args, **kwargs)
        checkpoint.save_file = counting_save_file
        for i in range(20):
            step = {k: v + 0.01 * i for k, v in tensors.items()}
            checkpoint.write(sys.argv[2], config, step)
        got_config, got = checkpoint.read(sys.argv[2])
        last = all((got[k] == tensors[k] + 0.19).all() for k in tensors)
        try:
            checkpoint.write(sys.argv[3], config, tensors)
            outcome = "no error"
        except QCError as e:
            outcome = str(e).splitlines()[0]
        with open(f"{sys.argv[4]}/rank{rank}.txt", "w") as f:
            f.write(f"writes {len(writes)} last {last} error: {outcome}")
        dist.destroy_process_group()
        """, str(tmp_path / "old"), str(tmp_path / "shared"), str(tmp_path / "a_file"),
        str(tmp_path / "results"),
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = ((tmp_path / "results" / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("writes 20 last True error: cannot save an adapter checkpoint to")
    assert "is a file" in rank0
    assert rank1 == (f"writes 0 last True error: rank 0 could not save the adapter to "
                     f"{tmp_path / 'a_file'} (its error says why)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "old", "results",
                                                          "script.py", "shared"]


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
    """Nothing unpickles, except the reference importer's one documented path: the fork's
    Trainer checkpoints are pickles, read tensors-only (weights_only=True)."""
    root = Path(__file__).resolve().parents[1] / "runtime"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        if path.name == "reference_files.py":
            assert "weights_only=True" in text
        else:
            assert "torch.load" not in text and "load_state_dict(" not in text, path


def test_load_refuses_a_bad_program_in_the_config(tmp_path, tiny_llama):
    base = _fresh(tiny_llama)
    attach(tiny_llama, llama_program()).save(tmp_path / "c")
    path = tmp_path / "c" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["options"]["init"] = "random"
    path.write_text(json.dumps(config))
    with pytest.raises(QCError, match=r"\$\.options\.init: unknown init mode 'random'"):
        load(base, tmp_path / "c")


def test_program_of_parses_with_includes_off_where_parse_can(tmp_path, tiny_llama, monkeypatch):
    attach(tiny_llama, llama_program()).save(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    seen = []

    def parse_with_switch(text, file=None, base_dir=None, includes=True):
        seen.append((file, includes))
        return parse(text, file=file)

    monkeypatch.setattr(record, "parse", parse_with_switch)
    assert record.from_json(config, "here").program == parse(config["program"])
    assert seen == [("here (program)", False)]


def test_save_from_another_thread(tmp_path, tiny_llama):
    """Signal handlers belong to the main thread: a save elsewhere leaves them alone."""
    import threading

    adapted, before = _saved(tmp_path, tiny_llama)
    handler = signal.getsignal(signal.SIGTERM)
    errors = []

    def save():
        try:
            adapted.save(tmp_path / "old")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=save)
    thread.start()
    thread.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is handler
    assert _files(tmp_path / "old") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_version_2_checkpoint_loads(tmp_path, tiny_llama, token_ids):
    """Format 2 stored one circuit per layer with program-wide options: it loads as a
    one-branch-per-layer adapter with the same tensors and outputs."""
    base = _fresh(tiny_llama)
    adapted = attach(tiny_llama, llama_program(), seed=0)
    perturb(adapted)
    adapted.save(tmp_path / "c")
    config_path = tmp_path / "c" / "adapter_config.json"
    config_path.write_text(json.dumps(as_format(json.loads(config_path.read_text()), 2)))
    loaded = load(base, tmp_path / "c")
    with torch.no_grad():
        want, got = adapted(token_ids).logits, loaded(token_ids).logits
    assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)
