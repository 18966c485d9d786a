"""A circuit nearly as large as its layer (over 25 % of in·out weights) is warned about
once, naming the circuit, its parameters, the layer's in x out and the fraction: by
``qcompile`` on stderr, by ``attach`` and ``get_peft_model`` as a ``NearFullSizeWarning``."""
from __future__ import annotations

import warnings

import pytest

from qcircuit import Circuit
from qcircuit.ir import ApplyRule, Pattern, Program
from qcircuit.runtime import attach, bind
from qcircuit.runtime.cli import main
from qcircuit.runtime.oversize import NEAR_FULL, NearFullSizeWarning, near_full_size

AUTO = """
circuit attn {{
    qudits auto {n}
    all_pairs
}}
apply attn to query, value
"""


def qcompile(capsys, tmp_path, text, *argv):
    (tmp_path / "a.qc").write_text(text)
    code = main([str(tmp_path / "a.qc"), "-m", "all-minilm-l6-v2", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_qcompile_warns_once_for_one_gate_as_large_as_the_layer(capsys, tmp_path):
    """The trial's case: ``qudits auto 2`` on MiniLM's 384-wide query and value (12
    modules) is one 384x384 gate, 100 % of each layer."""
    code, out, err = qcompile(capsys, tmp_path, AUTO.format(n=2))
    assert code == 0 and out.startswith("model: all-minilm-l6-v2")
    assert err == ("qcompile: warning: circuit 'attn' (24 16, on query) has 147,456 parameters "
                   "per module, 100% of the layer's 384x384 = 147,456 weights: near full "
                   "fine-tuning (warned above 25%; more qudits make smaller gates)\n")


def test_qcompile_is_quiet_for_three_qudits(capsys, tmp_path):
    """``qudits auto 3`` (8·8·6, all pairs): 8,704 parameters, 6 % of the layer."""
    code, out, err = qcompile(capsys, tmp_path, AUTO.format(n=3))
    assert code == 0 and "8,704" in out and err == ""


def test_qcompile_out_warns_once_and_a_refusal_is_one_line(capsys, tmp_path):
    code, _, err = qcompile(capsys, tmp_path, AUTO.format(n=2), "--out", str(tmp_path / "c"))
    assert code == 0 and err.count("\n") == 1 and "near full fine-tuning" in err
    code, out, err = qcompile(capsys, tmp_path, AUTO.format(n=2), "--out",
                              str(tmp_path / "d"), "--max-bytes", "1000")
    assert (code, out) == (2, "") and err.startswith("qcompile: error: --out: the checkpoint")
    assert err.count("\n") == 1


def low_rank(rank: int, features: int = 64) -> Circuit:
    """A LoRA-like circuit: one qudit, features -> rank -> features, 2·rank·features."""
    return Circuit(features).gate((0,), out=(rank,)).gate((0,), out=(features,))


@pytest.mark.parametrize("rank, warned", [(8, False), (9, True)])
def test_the_threshold_is_a_quarter_of_the_layer(tiny_llama, rank, warned):
    """Rank d/8 on a d-wide layer is exactly 25 %: not warned; one rank more is."""
    program = Program(circuits={"lr": low_rank(rank)},
                      rules=(ApplyRule("lr", (Pattern("q_proj"),)),))
    messages = near_full_size(bind(tiny_llama, program))
    assert len(messages) == int(warned)
    if warned:
        assert (2 * rank * 64) / (64 * 64) > NEAR_FULL
        assert "1,152 parameters per module, 28% of the layer's 64x64 = 4,096" in messages[0]


def test_attach_warns_once_per_circuit(tiny_llama, make_llama):
    """``qudits 8 8`` (one 64x64 gate) on q_proj and v_proj of both layers: four modules,
    one circuit, one warning; a second circuit that is small says nothing."""
    text = ("circuit big { qudits 8 8\n all_pairs }\ncircuit small { qudits 4 4 4\n all_pairs }\n"
            "apply big to q_proj, v_proj\napply small to k_proj\n")
    with pytest.warns(NearFullSizeWarning) as caught:
        adapted = attach(tiny_llama, text)
    assert len(adapted.layers) == 6
    ours = [w for w in caught if w.category is NearFullSizeWarning]
    assert len(ours) == 1 and ours[0].filename == __file__   # points at the caller
    message = str(ours[0].message)
    assert message.startswith("circuit 'big' (8 8, on q_proj) has 4,096 parameters per "
                              "module, 100% of the layer's 64x64 = 4,096 weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearFullSizeWarning)
        attach(make_llama(), "circuit small { qudits 4 4 4\n all_pairs }\n"
               "apply small to q_proj, v_proj\n")   # 768 of 4,096: 19 %


def test_get_peft_model_warns_for_a_new_adapter_not_a_loaded_one(tmp_path):
    """The PEFT door says it too when a config makes a new adapter; loading a saved one
    (``PeftModel.from_pretrained``) does not repeat it."""
    pytest.importorskip("peft")
    import qcircuit.peft  # noqa: F401  (registers the method)
    from peft import PeftModel, get_peft_model
    from qcircuit.peft import QuanTAConfig
    from test_trained_modules import make_bert

    text = "circuit attn { qudits 4 8  all_pairs }\napply attn to query, value\n"
    with pytest.warns(NearFullSizeWarning) as caught:
        model = get_peft_model(make_bert(1), QuanTAConfig(program=text))
    ours = [w for w in caught if w.category is NearFullSizeWarning]
    assert len(ours) == 1 and "circuit 'attn' (4 8, on query) has 1,024 parameters" in \
        str(ours[0].message)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearFullSizeWarning)
        PeftModel.from_pretrained(make_bert(2), tmp_path)
