"""The ``train`` statement: modules trained whole beside the circuits (issue 24).

Text, builder and printer agree: ``train classifier, /score$/`` parses to the same
``Program`` as ``Program().train("classifier", "/score$/")``, prints back to text that
parses to it, and every mistake is one located ``QCError``.
"""
from __future__ import annotations

import pytest

from qcircuit import Circuit, Pattern, Program, QCError, parse

HEAD = "circuit a { qudits 4 4 all_pairs }\napply a to query, value\n"


def test_train_parses_prints_and_round_trips():
    text = HEAD + "train classifier, /score$/\ntrain pooler.dense\noption init = zero_last\n"
    program = parse(text)
    assert program.trained == (Pattern("classifier"), Pattern("score$", regex=True),
                               Pattern("pooler.dense"))
    printed = program.to_qc()
    assert "train classifier, /score$/, pooler.dense\n" in printed
    assert parse(printed) == program
    assert parse(printed).to_qc() == printed


def test_builder_gives_the_program_the_text_gives():
    built = (Program().define("a", Circuit(4, 4).all_pairs()).apply("a", "query", "value")
             .train("classifier", "/score$/"))
    assert built == parse(HEAD + "train classifier, /score$/\n")
    assert built != parse(HEAD + "train classifier\n")
    assert built.train("pooler").trained[-1] == Pattern("pooler")
    assert built.trained == (Pattern("classifier"), Pattern("score$", regex=True))


def test_a_program_without_train_is_unchanged():
    program = parse(HEAD)
    assert program.trained == ()
    assert "train" not in program.to_qc()


@pytest.mark.parametrize("text,where,message", [
    ("train\n", (1, 6), "unexpected end of file"),
    ("train classifier,\n", (1, 18), "unexpected end of file"),
    ("train classifier, classifier\n", (1, 19), "'classifier' is already trained"),
    ("train classifier\ntrain classifier\n", (2, 7), "already trained \\(first at x.qc:1:7\\)"),
    ("train /(a+)+$/\n", (1, 12), "nested repetition"),
    ("train 3\n", (1, 7), "unexpected '3'"),
    ("train classifier with scale = 2\n", (1, 18), "unexpected 'with'"),
])
def test_mistakes_are_located(text, where, message):
    with pytest.raises(QCError, match=message) as info:
        parse(text, file="x.qc")
    assert (info.value.line, info.value.column) == where


def test_builder_refuses_what_the_parser_refuses():
    program = Program().define("a", Circuit(4, 4).all_pairs()).apply("a", "query")
    for bad in [(), ("classifier", "classifier"), ("/(a+)+$/",), (3,), ("",)]:
        with pytest.raises(QCError):
            program.train(*bad)


def test_train_is_a_keyword_only_where_a_statement_starts():
    program = parse("circuit train { qudits 4 4 all_pairs }\napply train to train\n"
                    "train train\n")
    assert program.rules[0].patterns == (Pattern("train"),)
    assert program.trained == (Pattern("train"),)
    assert parse(program.to_qc()) == program


def test_an_include_adds_its_train_patterns(tmp_path):
    (tmp_path / "head.qc").write_text("train classifier\n")
    (tmp_path / "main.qc").write_text(HEAD + 'include "head.qc"\ntrain pooler\n')
    from qcircuit import parse_file
    assert parse_file(tmp_path / "main.qc").trained == (Pattern("classifier"), Pattern("pooler"))
