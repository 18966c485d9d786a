"""qcompile: the paper's figure, JSON, diagrams, checkpoints, and every user error (exit 2)."""
from __future__ import annotations

import errno
import json
import re
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qcircuit import parse_file
from qcircuit.runtime.cli import main
from qcircuit.runtime.report import names_text, percent_text

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "examples" / "llama2_qv.qc")
PAPER_UP = str(ROOT / "examples" / "llama2_qv_up.qc")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, text, name="a.qc"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the paper's figure ---------------------------------------------------------------------

def assert_loads_as_the_base_model(model, path, token_ids, layers: int) -> None:
    """An initialised checkpoint adapts ``layers`` layers and leaves the outputs as they
    were, up to the fold's float32 rounding (normwise)."""
    from qcircuit.runtime import load
    with torch.no_grad():
        before = model(token_ids).logits
        adapted = load(model, path)
        after = adapted(token_ids).logits
    assert len(adapted.layers) == layers
    assert torch.linalg.norm(after - before) <= 1e-5 * torch.linalg.norm(before)

def test_paper_figure_json(capsys):
    code, out, err = run(capsys, PAPER, "--model", "llama-2-7b", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["model"] == "llama-2-7b"
    assert report["total_params"] == 6_738_415_616
    assert report["trainable_params"] == 2_752_512
    assert round(report["trainable_percent"], 3) == 0.041
    assert [t["pattern"] for t in report["targets"]] == ["q_proj", "v_proj"]
    for t in report["targets"]:
        assert t["modules"] == 32 and len(t["module_names"]) == 32
        assert (t["in_features"], t["out_features"]) == (4096, 4096)
        assert t["in_dims"] == [16, 8, 8, 4]
        assert t["params"] == 43_008 and t["params_total"] == 32 * 43_008
        assert t["rank_bound"] == 4096 and t["full_rank"] and t["universal"]
        # one token through the six gates one by one: 2 * 4096 * (32+32+64+64+128+128)
        assert 0 < t["flops_per_token"] <= 2 * 4096 * 448
        assert t["flops_per_token_total"] == 32 * t["flops_per_token"]


def test_paper_figure_table(capsys):
    code, out, err = run(capsys, PAPER, "--model", "llama-2-7b")
    assert code == 0 and err == ""
    assert "trainable parameters: 2,752,512 of 6,738,415,616 (0.041 %)" in out
    assert "model.layers.{0-31}.self_attn.q_proj" in out
    assert "16 8 8 4" in out and "4,096 (full)" in out
    assert "options: init = freeze_one, scale = 1.0, dropout = 0.0" in out  # defaults shown


def test_non_square_targets_add_up(capsys):
    code, out, _ = run(capsys, PAPER_UP, "--model", "llama-2-7b", "--json")
    assert code == 0
    report = json.loads(out)
    up = report["targets"][2]
    assert (up["pattern"], up["in_features"], up["out_features"]) == ("up_proj", 4096, 11008)
    assert up["out_dims"] == [16, 16, 43]
    # gates (0,1) 256x256, (1,2) 256 -> 688, (0,2) 688x688
    assert up["params"] == 256 * 256 + 256 * 688 + 688 * 688
    assert report["trainable_params"] == 2_752_512 + 32 * up["params"]
    assert report["trainable_params"] == sum(t["params_total"] for t in report["targets"])
    assert up["rank_bound"] <= 4096


def test_auto_circuits_on_an_encoder(capsys):
    code, out, _ = run(capsys, str(ROOT / "examples" / "roberta_auto.qc"),
                       "--model", "roberta-base", "--json")
    assert code == 0
    report = json.loads(out)
    (row,) = report["targets"]
    assert row["modules"] == 36 and row["in_features"] == 768
    code, out, _ = run(capsys, str(ROOT / "examples" / "roberta_auto.qc"), "--model", "roberta-base")
    assert "roberta.encoder.layer.{0-11}.attention.self.{query,key,value}" in out
    assert len(row["in_dims"]) == 3 and math.prod(row["in_dims"]) == 768
    assert report["options"] == {"scale": 0.5, "dropout": 0.1, "init": "zero_last"}


# --- other options -------------------------------------------------------------------------
def test_list_models(capsys):
    from qcircuit.runtime import EMBEDDED_MODELS

    code, out, _ = run(capsys, "--list-models")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(EMBEDDED_MODELS)
    assert "LlamaForCausalLM" in out and "hidden 384" in out


def test_draw(capsys):
    diagram = parse_file(PAPER).circuits["attn"].diagram()
    code, out, _ = run(capsys, PAPER, "--model", "llama-2-7b", "--draw")
    assert code == 0 and diagram in out and out.count(diagram) == 1
    code, out, _ = run(capsys, PAPER, "--model", "llama-2-7b", "--draw", "--json")
    assert code == 0
    assert [t["diagram"] for t in json.loads(out)["targets"]] == [diagram, diagram]


def test_not_universal_warns(tmp_path, capsys):
    qc = write(tmp_path, "circuit split {\n qudits 64 64\n gate (0)\n gate (1)\n}\n"
                         "apply split to q_proj\n")
    code, out, err = run(capsys, qc, "--model", "llama-2-7b", "--json")
    assert code == 0 and json.loads(out)["targets"][0]["universal"] is False
    assert err.startswith("qcompile: warning: circuit 'split'") and "not universal" in err


def test_out_writes_a_checkpoint_that_loads(tmp_path, capsys, tiny_llama, token_ids):
    tiny_llama.save_pretrained(tmp_path / "model")
    qc = write(tmp_path, "circuit c {\n qudits 8 8\n all_pairs\n}\napply c to q_proj, v_proj\n")
    code, out, err = run(capsys, qc, "--model", str(tmp_path / "model"), "--out",
                         str(tmp_path / "ckpt"))
    assert code == 0, err
    assert "wrote an initialised adapter checkpoint" in out
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors"}
    assert_loads_as_the_base_model(tiny_llama, tmp_path / "ckpt", token_ids, layers=4)


def test_out_seed_makes_init_reproducible(tmp_path, capsys, tiny_llama):
    from safetensors.torch import load_file

    tiny_llama.save_pretrained(tmp_path / "model")
    qc = write(tmp_path, "circuit c {\n qudits 8 8\n all_pairs\n}\napply c to o_proj\n"
                         "option init = freeze_one\n")  # one gate: zero_last would be all zeros
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert run(capsys, qc, "-m", str(tmp_path / "model"), "--out", str(tmp_path / name),
                   "--seed", seed)[0] == 0
    a, b, c = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert a.keys() == b.keys() == c.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: qcompile") and "--list-models" in out


def test_out_on_a_meta_model(tmp_path, capsys):
    from safetensors import safe_open

    code, out, err = run(capsys, PAPER, "--model", "llama-2-7b", "--json", "--out",
                         str(tmp_path / "ckpt"))
    assert code == 0, err
    assert json.loads(out)["out"] == str(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "adapter_model.safetensors"), "pt") as f:
        trainable = [k for k in f.keys() if ".gates." in k]  # not the frozen ".init_gates."
        assert len(trainable) == 64 * 6
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in trainable) == 2_752_512


# --- user errors: one line on stderr, exit 2, no traceback -----------------------------------
def error_cases(tmp_path):
    ok = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\napply c to q_proj\n")
    bad = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairz\n}\n", "bad.qc")
    nofit = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\n"
                            "apply c to q_proj, up_proj\n", "nofit.qc")
    nomatch = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\n"
                              "apply c to query\n", "nomatch.qc")
    (tmp_path / "a_file").write_text("")
    return {
        "missing file": ([str(tmp_path / "nope.qc"), "-m", "llama-2-7b"], "nope.qc"),
        "bad qc": ([bad, "-m", "llama-2-7b"], "bad.qc:3:"),
        "unknown model": ([ok, "-m", "llama-9"], "unknown model 'llama-9'"),
        "circuit does not fit": ([nofit, "-m", "llama-2-7b"], "mlp.up_proj"),
        "pattern matches nothing": ([nomatch, "-m", "llama-2-7b"], "'query'"),
        "out is a file": ([ok, "-m", "llama-2-7b", "--out", str(tmp_path / "a_file")],
                          "not a directory"),
        "out under a file": ([ok, "-m", "llama-2-7b", "--out",
                              str(tmp_path / "a_file" / "ckpt")], "a_file"),
        "no model": ([ok], "no model given"),
        "no file": (["-m", "llama-2-7b"], "no .qc file"),
        "bad flag": ([ok, "--frobnicate"], "unrecognized arguments"),
    }


@pytest.mark.parametrize("case", ["missing file", "bad qc", "unknown model", "circuit does not fit",
                                  "pattern matches nothing", "out is a file", "out under a file",
                                  "no model", "no file", "bad flag"])
def test_user_errors_exit_2(tmp_path, capsys, case):
    argv, needle = error_cases(tmp_path)[case]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qcompile: error: ") and err.count("\n") == 1
    assert needle in err and "Traceback" not in err


def test_error_names_module_shape_and_circuit(tmp_path, capsys):
    argv, _ = error_cases(tmp_path)["circuit does not fit"]
    _, _, err = run(capsys, *argv)
    assert "nofit.qc:5:" in err  # the pattern's line in the .qc file
    assert "model.layers.0.mlp.up_proj" in err and "4096 -> 11008" in err
    assert "16 8 8 4" in err


def test_python_dash_m_in_a_subprocess():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "qcircuit.runtime.cli", PAPER, "--model",
                           "no-such-model"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("qcompile: error: unknown model 'no-such-model'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    from qcircuit.runtime import console

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "qcompile"]
    assert script.value == "qcircuit.runtime.console:main" and script.load() is console.main


def test_importing_the_entry_point_is_light():
    """What runs before qcompile can handle Ctrl-C imports neither torch nor transformers."""
    code = ("import sys; import qcircuit.runtime.console; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'lark', 'safetensors')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stdout + done.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_ctrl_c_while_qcompile_starts(delay):
    """Ctrl-C at start-up (while torch and transformers are imported, then while the model
    is built): exit 130 and one line, never a traceback."""
    script = shutil.which("qcompile", path=os.path.dirname(sys.executable))
    assert script is not None
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([script, PAPER, "-m", "llama-2-7b"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:   # it finished first: a whole report, nothing on stderr
        assert out.startswith("model: llama-2-7b") and err == ""
    else:
        assert (proc.returncode, out, err) == (130, "", "qcompile: interrupted\n")


def test_an_interrupt_a_library_turned_into_its_own_error_still_exits_130(monkeypatch, capsys):
    """transformers' lazy imports turn a KeyboardInterrupt into their own error ("Could not
    import module 'LlamaConfig'"): after a Ctrl-C, qcompile reports the interrupt, not that."""
    from qcircuit.runtime import cli, console

    def interrupted_inside_a_library(args):
        console._received.append(signal.SIGINT)   # the handler saw Ctrl-C ...
        raise RuntimeError("Could not import module 'LlamaConfig'")   # ... the library says this

    monkeypatch.setattr(cli, "run", interrupted_inside_a_library)
    try:
        assert cli.main([PAPER, "-m", "llama-2-7b"]) == 130
    finally:
        console._received.clear()
    assert capsys.readouterr().err == "qcompile: interrupted\n"
    monkeypatch.setattr(cli, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):   # without a Ctrl-C: not hidden
        cli.main([PAPER, "-m", "llama-2-7b"])


# --- report building ------------------------------------------------------------------------
def test_build_report_groups_by_pattern_and_shape(tiny_llama):
    from qcircuit.compiler import compile
    from qcircuit.ir import ApplyRule, Circuit, Pattern, Program
    from qcircuit.runtime import bind
    from qcircuit.runtime.report import build_report, to_json

    auto = Circuit.auto_dims(2).all_pairs()
    program = Program(circuits={"a": auto},
                      rules=(ApplyRule("a", (Pattern(r"(q|up)_proj$", regex=True),)),))
    targets = bind(tiny_llama, program)
    total = sum(p.numel() for p in tiny_llama.parameters())
    report = build_report("tiny", "LlamaForCausalLM", total, targets)
    assert [(r.in_features, r.out_features, len(r.modules)) for r in report.rows] == [
        (64, 64, 2), (64, 172, 2)]
    for row in report.rows:
        plan = compile(row.circuit)
        assert row.stats.params == plan.num_params == row.circuit.num_params
        assert row.stats.flops_per_token == plan.flops(1)
        assert row.stats.rank_bound == plan.rank_bound and row.full_rank
    expected = sum(t.circuit.num_params for t in targets)
    assert report.trainable_params == expected
    assert report.trainable_percent == pytest.approx(100 * expected / total)
    assert json.loads(json.dumps(to_json(report)))["trainable_params"] == expected


# --- formatting helpers --------------------------------------------------------------------
def test_names_text():
    names = tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(32))
    assert names_text(names) == "model.layers.{0-31}.self_attn.q_proj"
    assert names_text(names[::2]) == "model.layers.{" + ",".join(map(str, range(0, 32, 2))) + "}.self_attn.q_proj"
    assert names_text(("a.q", "b.v")) == "a.q, … (2 modules)"  # not every combination
    encoder = tuple(f"enc.layer.{i}.self.{p}" for i in range(12) for p in ("query", "value"))
    assert names_text(encoder) == "enc.layer.{0-11}.self.{query,value}"
    assert names_text(("h.10.c", "h.2.c", "h.3.c")) == "h.{2,3,10}.c"
    assert names_text(("x",)) == "x"


def test_percent_text():
    assert percent_text(100 * 2_752_512 / 6_738_415_616) == "0.041"
    assert percent_text(12.3456) == "12.346"
    assert percent_text(0.000123) == "0.00012"
    assert percent_text(0.0) == "0.000"


# --- a local model's config.json: refused in one line, before transformers sees it ----------
LLAMA_7B = json.loads((ROOT / "runtime" / "configs" / "llama-2-7b.json").read_text())
BAD_MODEL_CONFIGS = {
    "not UTF-8": (b'{"model_type": "llama", "x": "\xff"}', "not UTF-8"),
    "100,000 levels deep": (b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000
                            + b"}", "nested too deeply"),
    "hidden_size -4096": ({"hidden_size": -4096}, "hidden_size = -4096 is out of range"),
    "hidden_size 0": ({"hidden_size": 0}, "hidden_size = 0 is out of range"),
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads = 0 is out of range"),
    "architectures [5]": ({"architectures": [5]}, "architectures must be a list"),
    "unknown model_type": ({"model_type": "llama-9"}, "unknown model_type 'llama-9'"),
    "100,000 layers": ({"num_hidden_layers": 100_000}, "num_hidden_layers = 100000"),
    "transformers refuses it": ({"hidden_act": "no-such-activation"}, "cannot build a model"),
}


def model_dir(tmp_path, content) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    data = content if isinstance(content, bytes) else json.dumps({**LLAMA_7B, **content}).encode()
    (folder / "config.json").write_bytes(data)
    return str(folder)


@pytest.mark.parametrize("case", sorted(BAD_MODEL_CONFIGS))
def test_bad_model_config_exits_2(tmp_path, capsys, case):
    content, needle = BAD_MODEL_CONFIGS[case]
    folder = model_dir(tmp_path, content)
    code, out, err = run(capsys, PAPER, "-m", folder)
    assert code == 2 and out == ""
    assert err.startswith("qcompile: error: ") and err.count("\n") == 1
    assert needle in err and os.path.join(folder, "config.json") in err


# --- --seed and --out are checked before any work ---------------------------------------------
@pytest.mark.parametrize("seed, needle", [(str(2**70), "out of range"), ("-1", "out of range"),
                                          (str(2**64), "out of range"), ("one", "not an integer")])
def test_seed_out_of_range(tmp_path, capsys, seed, needle):
    code, out, err = run(capsys, PAPER, "-m", "llama-2-7b", "--out", str(tmp_path / "c"),
                         "--seed", seed)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("qcompile: error: argument --seed") and needle in err
    assert not (tmp_path / "c").exists()


def test_largest_seed_is_accepted(tmp_path, capsys):
    qc = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\napply c to q_proj\n")
    code, _, err = run(capsys, qc, "-m", "llama-2-7b", "--out", str(tmp_path / "c"),
                       "--seed", str(2**64 - 1))
    assert code == 0, err


@pytest.mark.parametrize("out", ["", "  "])
def test_empty_out_is_refused(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, PAPER, "-m", "llama-2-7b", "--out", out)
    assert code == 2 and stdout == ""
    assert err == "qcompile: error: --out needs a directory (expected --out DIR)\n"
    assert list(tmp_path.iterdir()) == []


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_never_silently_replaces_another_adapter(tmp_path, capsys):
    qc = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\napply c to q_proj\n")
    ckpt = tmp_path / "ckpt"
    assert run(capsys, qc, "-m", "llama-2-7b", "--out", str(ckpt), "--seed", "1")[0] == 0
    before = checkpoint_files(ckpt)
    code, out, err = run(capsys, qc, "-m", "llama-2-7b", "--out", str(ckpt), "--seed", "2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "already holds an adapter checkpoint" in err and "--force" in err
    assert checkpoint_files(ckpt) == before
    code, _, err = run(capsys, qc, "-m", "llama-2-7b", "--out", str(ckpt), "--seed", "2",
                       "--force")
    assert code == 0, err
    after = checkpoint_files(ckpt)
    assert after.keys() == before.keys() and after != before


@pytest.mark.parametrize("force", [False, True])
def test_out_refuses_a_non_empty_directory_without_a_checkpoint(tmp_path, capsys, force):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    code, out, err = run(capsys, PAPER, "-m", "llama-2-7b", "--out", str(tmp_path / "home"),
                         *(["--force"] if force else []))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "is not empty and holds no adapter checkpoint" in err
    assert checkpoint_files(tmp_path / "home") == {"notes.txt": b"mine"}


def test_out_into_an_empty_directory(tmp_path, capsys):
    qc = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\napply c to q_proj\n")
    (tmp_path / "empty").mkdir()
    assert run(capsys, qc, "-m", "llama-2-7b", "--out", str(tmp_path / "empty"))[0] == 0
    assert {p.name for p in (tmp_path / "empty").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}


# --- --out is bounded before any tensor is made ------------------------------------------------
DENSE_EVERYWHERE = ("circuit one {\n qudits auto 1\n gate (0)\n}\napply one to q_proj, k_proj, "
                    "v_proj, o_proj, gate_proj, up_proj, down_proj\n")


def test_out_over_the_byte_cap_is_refused_at_once(tmp_path, capsys, monkeypatch):
    import qcircuit.runtime.cli as cli

    qc = write(tmp_path, DENSE_EVERYWHERE)
    code, out, _ = run(capsys, qc, "-m", "llama-2-7b", "--json")  # warm: imports, first build
    params = json.loads(out)["trainable_params"]
    assert code == 0 and params == 32 * (4 * 4096**2 + 3 * 4096 * 11008)  # every weight, dense

    def no_attach(*args, **kwargs):
        raise AssertionError("attach() must not run over the cap")

    monkeypatch.setattr(cli, "attach", no_attach)
    start = time.perf_counter()
    code, out, err = run(capsys, qc, "-m", "llama-2-7b", "--out", str(tmp_path / "c"))
    elapsed = time.perf_counter() - start
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"over the cap of {2**30:,}" in err and "--max-bytes" in err
    assert not (tmp_path / "c").exists()
    assert elapsed < 5.0  # was 85 s and 7.4 GiB before failing
    assert f"would hold {4 * params:,} bytes" in err  # float32 gates; zero_last: no frozen copy


@pytest.mark.parametrize("init, copies", [("freeze_one", 2), ("zero_last", 1)])
def test_byte_cap_counts_exactly_what_is_written(tmp_path, capsys, tiny_llama, init, copies):
    from safetensors import safe_open

    tiny_llama.save_pretrained(tmp_path / "model")
    qc = write(tmp_path, "circuit c {\n qudits 8 8\n all_pairs\n}\napply c to q_proj, v_proj\n"
                         f"option init = {init}\n")
    size = copies * 4 * 4 * 64 * 64  # 4 layers, one (8, 8, 8, 8) gate each, float32
    argv = [qc, "-m", str(tmp_path / "model"), "--out", str(tmp_path / "c")]
    code, _, err = run(capsys, *argv, "--max-bytes", str(size - 1))
    assert code == 2 and f"would hold {size:,} bytes" in err and f"cap of {size - 1:,}" in err
    assert run(capsys, *argv, "--max-bytes", str(size))[0] == 0
    with safe_open(str(tmp_path / "c" / "adapter_model.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).nbytes for k in f.keys()) == size


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_max_bytes_must_be_positive(capsys, value):
    code, _, err = run(capsys, PAPER, "-m", "llama-2-7b", "--max-bytes", value)
    assert code == 2 and err.startswith("qcompile: error: argument --max-bytes")


# --- the machine says no: a full disk, no memory, Ctrl-C ---------------------------------------
def write_error_cases():
    from safetensors import SafetensorError

    return {
        "ENOSPC": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x"), os.strerror(errno.ENOSPC)),
        "EACCES": (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "x"),
                   os.strerror(errno.EACCES)),
        "safetensors": (SafetensorError("Error while serializing: I/O error: No space left on "
                                        "device (os error 28)"), "No space left on device"),
    }


@pytest.mark.parametrize("case", ["ENOSPC", "EACCES", "safetensors"])
def test_write_errors_exit_2(tmp_path, capsys, monkeypatch, case):
    from qcircuit.runtime.adapter import Adapted

    error, needle = write_error_cases()[case]

    def fail(self, path):
        raise error

    monkeypatch.setattr(Adapted, "save", fail)
    code, out, err = run(capsys, PAPER, "-m", "llama-2-7b", "--out", str(tmp_path / "c"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"qcompile: error: cannot write the checkpoint to {tmp_path / 'c'}: ")
    assert needle in err


@pytest.mark.parametrize("error, code, message", [
    (MemoryError(), 2, "qcompile: error: out of memory (try a smaller adapter or model)\n"),
    (torch.OutOfMemoryError("out of memory on the device"), 2,
     "qcompile: error: out of memory (try a smaller adapter or model)\n"),
    (KeyboardInterrupt(), 130, "qcompile: interrupted\n"),
])
def test_memory_error_and_ctrl_c(capsys, monkeypatch, error, code, message):
    import qcircuit.runtime.cli as cli

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "load_model", fail)
    assert run(capsys, PAPER, "-m", "llama-2-7b") == (code, "", message)


def test_an_internal_bug_keeps_its_traceback(capsys, monkeypatch):
    import qcircuit.runtime.cli as cli

    def bug(*args, **kwargs):
        raise AttributeError("a bug in qcircuit")

    monkeypatch.setattr(cli, "load_model", bug)
    with pytest.raises(AttributeError, match="a bug in qcircuit"):
        main([PAPER, "-m", "llama-2-7b"])


# --- the same as whole processes: exit status, one line, no traceback, nothing left behind -----
CHILD = """
import os, signal, sys, time
# Ctrl-C as at a terminal: a suite started in the background by a shell without job
# control inherits SIGINT ignored, and a child that kept that would never be interrupted
signal.signal(signal.SIGINT, signal.default_int_handler)
import qcircuit.runtime.cli as cli
def wait(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)
if sys.argv[1] == "run":
    cli.run = wait
else:  # stop inside the checkpoint writer, at its first rename or directory exchange
    import qcircuit.runtime.atomic_dir as atomic_dir
    os.replace = os.rename = atomic_dir._exchange = wait
sys.exit(cli.main(sys.argv[2:]))
"""


def signalled_child(argv: list[str], signum: int,
                    when_ready=lambda: None) -> subprocess.CompletedProcess:
    """Run CHILD with ``argv``; once it waits, call ``when_ready`` and send ``signum``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line == "ready\n", f"the child never got there: {proc.poll()}"
        when_ready()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGINT, 130, "qcompile: interrupted\n"), (signal.SIGTERM, 143, "qcompile: terminated\n")])
def test_signals_end_the_process_cleanly(signum, code, message):
    done = signalled_child(["run", PAPER, "-m", "llama-2-7b"], signum)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", message)


def test_sigterm_while_writing_leaves_the_old_checkpoint_and_no_temp_files(tmp_path, capsys):
    qc = write(tmp_path, "circuit c {\n qudits 16 8 8 4\n all_pairs\n}\napply c to q_proj\n")
    ckpt = tmp_path / "ckpt"
    assert run(capsys, qc, "-m", "llama-2-7b", "--out", str(ckpt), "--seed", "1")[0] == 0
    before, paths = checkpoint_files(ckpt), sorted(tmp_path.rglob("*"))
    mid_write = []
    done = signalled_child(["write", qc, "-m", "llama-2-7b", "--out", str(ckpt), "--seed", "2",
                            "--force"], signal.SIGTERM,
                           when_ready=lambda: mid_write.extend(sorted(tmp_path.rglob("*"))))
    assert (done.returncode, done.stdout, done.stderr) == (143, "", "qcompile: terminated\n")
    assert set(mid_write) > set(paths)  # stopped mid-write: new files existed somewhere
    assert sorted(tmp_path.rglob("*")) == paths and checkpoint_files(ckpt) == before


def test_a_bad_model_config_as_a_process(tmp_path):
    argv = [PAPER, "-m", model_dir(tmp_path, b'{"model_type": "\xff"}')]  # was a traceback
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "qcircuit.runtime.cli", *argv],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("qcompile: error: ") and proc.stderr.count("\n") == 1
    assert "not UTF-8" in proc.stderr


def test_explain_shows_each_circuits_routes_and_the_winner(capsys):
    code, out, err = run(capsys, PAPER_UP, "-m", "llama-2-7b", "--explain",
                         "--tokens", "16")
    assert code == 0 and err == ""
    for name in ("attn", "up"):
        block = out.split(f"circuit {name} at 16 tokens:\n")[1]
        assert "einsum" in block.split("chosen:")[0]   # the one expression is always a candidate
        assert re.search(r"chosen: \w+", block)
    code, out, _ = run(capsys, PAPER, "-m", "llama-2-7b", "--explain",
                       "--tokens", "16", "--json")
    assert code == 0 and "chosen:" in json.loads(out)["targets"][0]["explain"]


# --- sums of circuits: several rules on one layer (branches) ----------------------------------
# Built with the Python API; qcompile reads them through a stand-in for parse_file.


def lora(rank: int, features: int = 64):
    """Low rank as a circuit: one qudit, features -> rank -> features (rank bound ``rank``)."""
    from qcircuit.ir import Circuit

    return Circuit(features).gate((0,), out=(rank,)).gate((0,), out=(features,))


def hybrid(lora_on=("q_proj",), lora_rank=8, **lora_options):
    """``attn`` on q_proj and v_proj (program option init = freeze_one); ``lora`` (its own
    options) on ``lora_on``."""
    from qcircuit.ir import ApplyRule, Circuit, Pattern, Program

    return Program(
        circuits={"attn": Circuit(4, 4, 4).all_pairs(), "lora": lora(lora_rank)},
        rules=(ApplyRule("attn", (Pattern("q_proj"), Pattern("v_proj"))),
               ApplyRule("lora", tuple(Pattern(p.strip("/"), regex=p.startswith("/"))
                                       for p in lora_on), options=lora_options)),
        options={"init": "freeze_one"})


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama_config) -> str:
    """The tiny LLaMA as a directory with config.json only (qcompile builds it on meta)."""
    tiny_llama_config.architectures = ["LlamaForCausalLM"]
    tiny_llama_config.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def run_program(capsys, monkeypatch, program, *argv):
    """qcompile on ``program`` as though a .qc file held it."""
    import qcircuit.runtime.cli as cli

    monkeypatch.setattr(cli, "parse_file", lambda path: program)
    return run(capsys, "program.qc", *argv)


def cells(out: str, start: str) -> list[str]:
    """The cells of the one table line that starts with ``start``."""
    (line,) = [line for line in out.splitlines() if line.startswith(start)]
    return re.split(r"\s{2,}", line.strip())


ATTN_PARAMS, LORA8_PARAMS = 3 * 16 * 16, 64 * 8 + 8 * 64


def test_sum_table_shows_every_branch_and_the_layer_total(capsys, monkeypatch, tiny_dir):
    program = hybrid(scale=2.0, init="zero_last")
    code, out, err = run_program(capsys, monkeypatch, program, "-m", tiny_dir)
    assert code == 0 and err == ""
    head = cells(out, "pattern")
    assert head[-1] == "options"  # a rule has its own: the column is there
    assert cells(out, "q_proj") == ["q_proj", "attn", "2", "64 -> 64", "4 4 4", "768", "1,536",
                                    cells(out, "q_proj")[7], "64 (full)"]
    plus = cells(out, "+ q_proj")
    assert plus[:7] == ["+ q_proj", "lora", "2", "64 -> 64", "64", "1,024", "2,048"]
    assert plus[8:] == ["8", "init = zero_last, scale = 2.0"]
    total = cells(out, "= sum")
    per_module = ATTN_PARAMS + LORA8_PARAMS
    assert total[:5] == ["= sum", "2", "64 -> 64", f"{per_module:,}", f"{2 * per_module:,}"]
    assert total[-1] == "64 (full)"
    flops = [int(cells(out, s)[7 if s != "= sum" else 5].replace(",", ""))
             for s in ("q_proj", "+ q_proj", "= sum")]
    assert flops[2] == flops[0] + flops[1] > 0
    assert len(cells(out, "v_proj")) == 9  # one branch: no options cell, no sum row
    assert out.count("= sum") == 1
    assert "  q_proj (attn + lora): model.layers.{0-1}.self_attn.q_proj" in out
    assert "  v_proj: model.layers.{0-1}.self_attn.v_proj" in out
    trainable = 2 * 2 * ATTN_PARAMS + 2 * LORA8_PARAMS  # every branch on every layer counts
    assert f"trainable parameters: {trainable:,} of" in out
    code, out, _ = run_program(capsys, monkeypatch, hybrid(), "-m", tiny_dir)
    assert code == 0 and cells(out, "pattern")[-1] == "rank bound"  # no rule has its own


def dense_rank(*circuits) -> int:
    """The rank of the sum of the circuits' operators, random gates, float64."""
    from qcircuit.compiler import compile

    with torch.no_grad():
        total = sum(compile(c).module(dtype=torch.float64, seed=i).matrix()
                    for i, c in enumerate(circuits))
    return int(torch.linalg.matrix_rank(total))


@pytest.mark.parametrize("ranks, bound, full", [((8, 4), 12, False), ((40, 40), 64, True),
                                                ((8, 56), 64, True)])
def test_the_rank_bound_of_a_sum(capsys, monkeypatch, tiny_dir, ranks, bound, full):
    from qcircuit.ir import ApplyRule, Pattern, Program

    circuits = {f"r{r}_{i}": lora(r) for i, r in enumerate(ranks)}
    program = Program(circuits=circuits,
                      rules=tuple(ApplyRule(n, (Pattern("o_proj"),)) for n in circuits))
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--json")
    assert code == 0
    (layer,) = json.loads(out)["layers"]
    assert [b["rank_bound"] for b in layer["branches"]] == list(ranks)
    assert (layer["rank_bound"], layer["full_rank"]) == (bound, full)
    assert dense_rank(*circuits.values()) == bound  # the bound is reached: it is honest
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir)
    assert cells(out, "= sum")[-1] == (f"{bound} (full)" if full else f"{bound}")


def test_sum_json_carries_branches(capsys, monkeypatch, tiny_dir):
    code, out, _ = run_program(capsys, monkeypatch, hybrid(scale=2.0, init="zero_last"),
                               "-m", tiny_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["version"] == 2
    q, v = report["layers"]
    assert q["module_names"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert [b["circuit"] for b in q["branches"]] == ["attn", "lora"]
    attn, low = q["branches"]
    assert attn["options"] == {"init": "freeze_one", "scale": 1.0, "dropout": 0.0}
    assert attn["own_options"] == {}
    assert low["options"] == {"init": "zero_last", "scale": 2.0, "dropout": 0.0}
    assert low["own_options"] == {"init": "zero_last", "scale": 2.0}
    assert (attn["params"], low["params"]) == (ATTN_PARAMS, LORA8_PARAMS)
    assert (attn["rank_bound"], low["rank_bound"]) == (64, 8)
    assert q["params"] == ATTN_PARAMS + LORA8_PARAMS and q["params_total"] == 2 * q["params"]
    assert q["flops_per_token"] == attn["flops_per_token"] + low["flops_per_token"]
    assert (q["rank_bound"], q["full_rank"]) == (64, True)
    assert [b["circuit"] for b in v["branches"]] == ["attn"] and v["params"] == ATTN_PARAMS
    targets = report["targets"]  # one per branch, as in version 1
    assert [(t["pattern"], t["circuit"]) for t in targets] == [
        ("q_proj", "attn"), ("q_proj", "lora"), ("v_proj", "attn")]
    for layer in report["layers"]:
        for b in layer["branches"]:
            t = targets[b["target"]]
            assert (t["circuit"], t["params"], t["options"]) == (b["circuit"], b["params"],
                                                                  b["options"])
    assert report["trainable_params"] == sum(t["params_total"] for t in targets) == sum(
        layer["params_total"] for layer in report["layers"])
    assert report["flops_per_token"] == sum(t["flops_per_token_total"] for t in targets) == sum(
        layer["modules"] * layer["flops_per_token"] for layer in report["layers"])


def test_single_branch_json_keeps_the_version_1_keys(capsys):
    code, out, _ = run(capsys, PAPER, "--model", "llama-2-7b", "--json")
    report = json.loads(out)
    assert {"model", "model_class", "total_params", "trainable_params", "trainable_percent",
            "flops_per_token", "options", "targets"} < report.keys()
    for target, layer in zip(report["targets"], report["layers"], strict=True):
        (branch,) = layer["branches"]
        assert layer["module_names"] == target["module_names"]
        assert layer["rank_bound"] == branch["rank_bound"] == target["rank_bound"] == 4096
        assert layer["params_total"] == target["params_total"]


def test_layers_group_by_their_branches(capsys, monkeypatch, tiny_dir):
    # lora only on layer 0's q_proj: that layer is a sum, layer 1's q_proj is not
    program = hybrid(lora_on=(r"/layers\.0\..*q_proj$/",), lora_rank=4)
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--json")
    assert code == 0
    layers = json.loads(out)["layers"]
    assert [(x["module_names"], [b["circuit"] for b in x["branches"]]) for x in layers] == [
        (["model.layers.0.self_attn.q_proj"], ["attn", "lora"]),
        (["model.layers.1.self_attn.q_proj"], ["attn"]),
        ([f"model.layers.{i}.self_attn.v_proj" for i in range(2)], ["attn"])]
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir)
    assert cells(out, "+ /layers")[:3] == [r"+ /layers\.0\..*q_proj$/", "lora", "1"]
    assert [c[:3] for c in (cells(out, "= sum"),)] == [["= sum", "1", "64 -> 64"]]
    assert f"trainable parameters: {4 * ATTN_PARAMS + 2 * 64 * 4:,} of" in out


def test_sum_draw(capsys, monkeypatch, tiny_dir):
    program = hybrid(scale=2.0, init="zero_last")
    attn, low = (program.circuits[n].diagram() for n in ("attn", "lora"))
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--draw")
    assert code == 0
    heading = ("q_proj (attn + lora): the sum of 2 circuits on 2 modules, 64 -> 64 features, "
               f"{ATTN_PARAMS + LORA8_PARAMS:,} parameters, rank bound 64 (full)")
    block = out.split(heading + "\n\n")[1]
    first, second = block.split("\n\n+\n\n")
    assert first == f"circuit attn: 64 -> 64 features, {ATTN_PARAMS} parameters\n{attn}"
    assert second.startswith("circuit lora (init = zero_last, scale = 2.0): 64 -> 64 "
                             f"features, {LORA8_PARAMS:,} parameters\n{low}\n")
    assert out.count(attn) == 1 and out.count(low) == 1  # v_proj's attn is the one above
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--draw", "--json")
    assert [t["diagram"] for t in json.loads(out)["targets"]] == [attn, low, attn]


def test_sum_explain(capsys, monkeypatch, tiny_dir):
    program = hybrid()
    code, out, err = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--explain",
                                 "--tokens", "8")
    assert code == 0 and err == ""
    for i, name in enumerate(("attn", "lora"), 1):
        block = out.split(f"circuit {name} at 8 tokens, branch {i} of 2 on q_proj (attn + lora):\n")[1]
        assert re.search(r"chosen: \w+", block.split("\n\n")[0])
    assert out.count(" at 8 tokens") == 2  # v_proj's attn runs as the branch above
    code, out, _ = run_program(capsys, monkeypatch, program, "-m", tiny_dir, "--explain",
                               "--tokens", "8", "--json")
    assert all("chosen:" in t["explain"] for t in json.loads(out)["targets"])


@pytest.mark.parametrize("init", ["freeze_one", "zero_last"])
def test_sum_out_writes_a_checkpoint_that_loads(tmp_path, capsys, monkeypatch, tiny_llama,
                                                 token_ids, init):
    """Each branch's gates under its own key; a frozen copy only for a freeze_one branch;
    the byte cap counts exactly that; the checkpoint loads to the same model."""
    from safetensors import safe_open

    tiny_llama.save_pretrained(tmp_path / "model")
    program = hybrid(scale=2.0, init=init)
    frozen = {"attn": 2, "lora": 2 if init == "freeze_one" else 1}
    size = 4 * 2 * (frozen["attn"] * ATTN_PARAMS + frozen["lora"] * LORA8_PARAMS) \
        + 4 * 2 * 2 * ATTN_PARAMS  # float32; q_proj (attn + lora), then v_proj (attn)
    argv = ["-m", str(tmp_path / "model"), "--out", str(tmp_path / "ckpt")]
    code, out, err = run_program(capsys, monkeypatch, program, *argv, "--max-bytes",
                                 str(size - 1))
    assert code == 2 and f"would hold {size:,} bytes" in err
    code, out, err = run_program(capsys, monkeypatch, program, *argv, "--max-bytes", str(size))
    assert code == 0, err
    with safe_open(str(tmp_path / "ckpt" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert sum(f.get_tensor(k).nbytes for k in keys) == size
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.attn.gates.0", f"{q}.attn.init_gates.2", f"{q}.lora.gates.1"} <= keys
    assert (f"{q}.lora.init_gates.0" in keys) == (init == "freeze_one")
    assert "model.layers.0.self_attn.v_proj.gates.2" in keys  # a single branch keeps its keys
    assert_loads_as_the_base_model(tiny_llama, tmp_path / "ckpt", token_ids, layers=4)


def test_byte_cap_counts_each_branchs_init(tiny_llama):
    from qcircuit.runtime import bind
    from qcircuit.runtime.report import build_report, checkpoint_bytes

    program = hybrid(init="zero_last")
    report = build_report("tiny", "LlamaForCausalLM", 1, bind(tiny_llama, program),
                          {k: program.option(k) for k in ("init", "scale", "dropout")})
    assert [r.options["init"] for r in report.rows] == ["freeze_one", "zero_last", "freeze_one"]
    assert [dict(r.own_options) for r in report.rows] == [{}, {"init": "zero_last"}, {}]
    assert checkpoint_bytes(report, 4) == 4 * (2 * 2 * 2 * ATTN_PARAMS + 2 * LORA8_PARAMS)


HYBRID_QC = """circuit attn {
    qudits 16 8 8 4
    all_pairs
}
circuit lora {
    qudits 4096
    gate (0) 4096 -> 8
    gate (0) 8 -> 4096
}
apply attn to q_proj, v_proj
apply lora to q_proj
"""


def test_the_issues_hybrid_from_a_qc_file(tmp_path, capsys):
    """QuanTA + LoRA r=8 on LLaMA-2-7B's q_proj, written as two apply rules."""
    code, out, err = run(capsys, write(tmp_path, HYBRID_QC), "-m", "llama-2-7b")
    assert code == 0 and err == ""
    assert cells(out, "+ q_proj")[:7] + cells(out, "+ q_proj")[8:] == [
        "+ q_proj", "lora", "32", "4096 -> 4096", "4096", "65,536", "2,097,152", "8"]
    lora_params = 2 * 4096 * 8
    assert cells(out, "= sum")[3:5] == [f"{43_008 + lora_params:,}",
                                        f"{32 * (43_008 + lora_params):,}"]
    assert cells(out, "= sum")[-1] == "4,096 (full)"
    assert "options" not in cells(out, "pattern")  # no rule has options of its own
    assert f"trainable parameters: {2_752_512 + 32 * lora_params:,} of" in out
