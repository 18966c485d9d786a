"""Small slips in what users read: ``qcompile --help`` lists its subcommand, articles
agree with the noun ("an Embedding"), a JSON null is shown once ("got null")."""
from __future__ import annotations

import json

import pytest

from qcircuit import QCError, parse
from qcircuit.errors import with_article
from qcircuit.runtime import attach, load
from qcircuit.runtime.checkpoint import CONFIG_NAME
from qcircuit.runtime.cli import main


def test_help_lists_import_reference(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "import-reference CHECKPOINT --model NAME_OR_DIR --out DIR" in out
    assert main(["import-reference", "--help"]) == 0
    assert "usage: qcompile import-reference" in capsys.readouterr().out


@pytest.mark.parametrize("noun, text", [("Embedding", "an Embedding"), ("Linear", "a Linear"),
                                        ("int", "an int"), ("float32", "a float32"),
                                        ("einsum", "an einsum"), ("", "a ")])
def test_with_article(noun, text):
    assert with_article(noun) == text


def test_a_pattern_on_an_embedding_says_an_embedding(capsys, tmp_path):
    (tmp_path / "a.qc").write_text("circuit c {\n qudits auto 3\n all_pairs\n}\n"
                                   "apply c to /word_embeddings$/\n")
    assert main([str(tmp_path / "a.qc"), "-m", "all-minilm-l6-v2"]) == 2
    err = capsys.readouterr().err
    assert "matches module 'embeddings.word_embeddings', an Embedding, not a linear" in err
    assert " a Embedding" not in err


def test_a_null_in_a_checkpoint_is_shown_once(make_llama, tmp_path):
    adapted = attach(make_llama(), parse("circuit c { qudits 4 4 4\n all_pairs }\n"
                                         "apply c to q_proj\n"))
    adapted.save(tmp_path / "c")
    config = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    config["tensors"] = None
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(QCError) as info:
        load(make_llama(), tmp_path / "c")
    assert str(info.value).endswith("$.tensors: expected an object, got null")
