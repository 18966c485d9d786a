"""Diagrams: golden text drawings, layout properties, SVG and PNG output."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qcircuit import Circuit, QCError
from qcircuit.diagram import ROWS, _layout, draw, svg, text_diagram

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("QC_UPDATE_GOLDEN") == "1"  # QC_UPDATE_GOLDEN=1 pytest ... rewrites them

CASES = {
    "paper_all_pairs": (Circuit(16, 8, 8, 4).all_pairs(), 100),
    "non_square": (Circuit(16, 16, 16).gate((0, 1)).gate((1, 2), out=(16, 43)).gate((0, 2)), 100),
    "arity3": (Circuit(4, 4, 4, 4).gate((0, 1, 3)).gate((2,)).gate((1, 2, 3), out=(2, 8, 4)), 100),
    "wrapped": (Circuit(2, 3, 4, 5, 6).all_pairs().repeat(2), 60),
    "wrapped_non_square": (Circuit(8, 8, 8).gate((0, 1)).gate((1, 2), out=(8, 32)).gate((0, 2))
                           .gate((0, 1)).gate((1, 2)).gate((0, 2)), 40),
    "auto": (Circuit(auto=3).all_pairs(), 100),
}


def bands(text: str) -> list[list[str]]:
    return [band.split("\n") for band in text.split("\n\n")]


def random_circuit(rng: random.Random) -> Circuit:
    n = rng.randint(1, 6)
    c = Circuit(*[rng.randint(1, 20) for _ in range(n)])
    for _ in range(rng.randint(0, 12)):
        qudits = tuple(rng.sample(range(n), rng.randint(1, min(3, n))))
        out = [rng.randint(1, 200) if rng.random() < 0.3 else None for _ in qudits]
        current = c.out_dims_partial()
        c = c.gate(qudits, out=[o or current[q] for q, o in zip(qudits, out)])
    return c


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    circuit, width = CASES[name]
    text = text_diagram(circuit, width=width)
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text + "\n", encoding="utf-8")
    assert text + "\n" == path.read_text(encoding="utf-8")
    assert circuit.diagram(width=width) == text


def test_goldens_wrap_where_expected():
    assert len(bands(text_diagram(*CASES["wrapped"]))) > 1
    assert len(bands(text_diagram(*CASES["paper_all_pairs"]))) == 1


def test_band_labels_show_current_dims():
    circuit, width = CASES["wrapped_non_square"]
    found = bands(text_diagram(circuit, width=width))
    assert len(found) >= 2
    first_wire2 = found[0][ROWS * 2 + 1]
    assert first_wire2.startswith("q2 (8) ")
    # after G1 changed q2 to 32, a later band starts with the new dim
    assert any(b[ROWS * 2 + 1].startswith("q2 (32)") for b in found[1:])
    assert found[-1][ROWS * 2 + 1].rstrip().endswith("q2 (32)")


def test_paper_config_layout():
    text = text_diagram(Circuit(16, 8, 8, 4).all_pairs())
    rows = text.split("\n")
    assert len(rows) == ROWS * 4
    for q, d in enumerate((16, 8, 8, 4)):
        assert rows[ROWS * q + 1].startswith(f"q{q} ({d})")
        assert rows[ROWS * q + 1].rstrip().endswith(f"q{q} ({d})")
    for k in range(6):
        assert text.count(f"G{k}─") == 1


def test_non_adjacent_gate_crosses_wire_without_box():
    text = text_diagram(Circuit(5, 6, 7).gate((0, 2)))
    wire1 = text.split("\n")[ROWS + 1]
    assert "┼" in wire1 and "┤" not in wire1 and "├" not in wire1
    wire0, wire2 = text.split("\n")[1], text.split("\n")[ROWS * 2 + 1]
    assert "┤ 5 " in wire0 and "┤ 7 " in wire2


def test_disjoint_gates_share_a_column():
    layout = _layout(Circuit(2, 2, 2, 2).gate((0, 1)).gate((2, 3)).gate((1, 2)))
    assert layout.columns == (0, 0, 1)
    # (0, 2) spans wire 1, so a gate on 1 cannot sit in its column
    assert _layout(Circuit(2, 2, 2).gate((0, 2)).gate((1,))).columns == (0, 1)


def test_random_layouts_respect_order_and_do_not_overlap():
    rng = random.Random(0)
    for _ in range(200):
        c = random_circuit(rng)
        layout = _layout(c)
        last = [-1] * c.num_qudits
        for g, col in zip(c.gates, layout.columns):
            for q in g.qudits:
                assert col > last[q]
                last[q] = col
        for col in set(layout.columns):
            spans = sorted((min(g.qudits), max(g.qudits))
                           for g, cc in zip(c.gates, layout.columns) if cc == col)
            assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("seed", range(40))
def test_random_diagrams_wrap_within_width(seed):
    rng = random.Random(seed)
    c = random_circuit(rng)
    width = rng.randint(45, 120)
    text = text_diagram(c, width=width)
    found = bands(text)
    boxes = [0] * c.num_qudits  # box edges seen on each wire, over all bands
    crossings = [0] * c.num_qudits
    for band in found:
        assert len(band) == ROWS * c.num_qudits
        assert len({len(line) for line in band}) == 1
        assert len(band[0]) <= width
        for q in range(c.num_qudits):
            assert band[ROWS * q + 1].startswith(f"q{q} (")
            boxes[q] += band[ROWS * q + 1].count("┤")
            crossings[q] += band[ROWS * q + 1].count("┼")
    for q in range(c.num_qudits):
        assert boxes[q] == sum(q in g.qudits for g in c.gates)
        assert crossings[q] == sum(min(g.qudits) < q < max(g.qudits) and q not in g.qudits
                                   for g in c.gates)
    for k in range(len(c.gates)):
        assert len(re.findall(rf"─G{k}─", text)) == 1
    assert all(unicodedata.east_asian_width(ch) not in "WF" for ch in text)


def test_last_band_has_output_labels():
    c = Circuit(3, 3).gate((0, 1), out=(9, 1))
    rows = text_diagram(c).split("\n")
    assert rows[1].rstrip().endswith("q0 (9)") and rows[ROWS + 1].rstrip().endswith("q1 (1)")
    assert "3→9" in rows[1] and "3→1" in rows[ROWS + 1]


def test_auto_circuit_draws_question_marks():
    text = text_diagram(Circuit(auto=2).gate((0, 1)))
    assert "q0 (?)" in text and "┤ ? " in text and re.search(r"\d", text.replace("q0", "").replace("q1", "").replace("G0", "")) is None


def test_low_rank_draws_its_written_rank():
    auto = text_diagram(Circuit.low_rank(8)).splitlines()
    assert "┤ ?→8 ├─┤ 8→? ├" in auto[1]
    bound = text_diagram(Circuit.low_rank(8).resolve(64, 172)).splitlines()
    assert "┤ 64→8 ├─┤ 8→172 ├" in bound[1] and bound[1].rstrip().endswith("q0 (172)")


def test_errors():
    incomplete = Circuit().gate((0, 2), "16x16")  # qudit 1 has no dims
    with pytest.raises(QCError, match="qudit 1"):
        text_diagram(incomplete)
    with pytest.raises(QCError):
        svg(incomplete)
    with pytest.raises(QCError, match="too narrow"):
        text_diagram(Circuit(16, 8, 8, 4).all_pairs(), width=20)
    for bad in (0, -5, 3.5, "80", True):
        with pytest.raises(QCError):
            text_diagram(Circuit(2, 2).gate((0, 1)), width=bad)
    with pytest.raises(QCError):
        text_diagram(Circuit())


def svg_gate_ids(text: str) -> list[str]:
    root = ET.fromstring(text.encode("utf-8"))
    return [el.get("id") for el in root.iter() if re.fullmatch(r"gate\d+", el.get("id") or "")]


def test_svg_has_one_element_per_gate():
    c = CASES["non_square"][0]
    text = svg(c)
    assert sorted(svg_gate_ids(text)) == [f"gate{k}" for k in range(len(c.gates))]
    assert "16→43" in text and "G2" in text
    assert c._repr_svg_() == text  # deterministic, and the notebook hook uses it
    paper = Circuit(16, 8, 8, 4).all_pairs()
    assert len(svg_gate_ids(svg(paper))) == 6


def test_draw_writes_png_and_svg(tmp_path):
    c = CASES["arity3"][0]
    png = tmp_path / "c.png"
    c.draw(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "c.SVG"
    draw(c, out)
    assert len(svg_gate_ids(out.read_text(encoding="utf-8"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.SVG", "c.png"]  # no temp files left


def test_draw_unknown_suffix(tmp_path):
    with pytest.raises(QCError, match="unknown file type"):
        Circuit(2, 2).gate((0, 1)).draw(str(tmp_path / "c.pdf"))
    with pytest.raises(QCError):
        draw(Circuit(2, 2).gate((0, 1)), tmp_path / "noext")
    assert list(tmp_path.iterdir()) == []


def test_import_and_text_diagram_do_not_load_matplotlib():
    code = ("import sys, qcircuit; qcircuit.Circuit(4, 4).gate((0, 1)).diagram(); "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
