"""Circuit diagrams: a terminal drawing (``text_diagram``) and pictures (``svg``, ``draw``).

Both share one layout: gates go into columns, left to right; a gate takes the first
column after every earlier gate on the wires it spans (crossed wires included), so gates
that do not overlap vertically share a column and each wire keeps the circuit order.
A gate on non-adjacent qudits is drawn as one box per run of adjacent qudits, joined
by a vertical connector that crosses the wires in between (``┼``) without a box on them.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import QCError
from .ir import Circuit, Gate

ROWS = 3  # text rows per qudit: space for a box top, the wire, space for a box bottom
_UNKNOWN = "?"


# --- shared layout --------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where every gate goes and what every wire carries, as display strings."""

    num_qudits: int
    qudits: tuple[tuple[int, ...], ...]  # qudits of each gate
    columns: tuple[int, ...]  # column of each gate
    labels: tuple[tuple[str, ...], ...]  # per gate, per qudit: "16" or "16→43" or "?"
    in_dims: tuple[str, ...]
    out_dims: tuple[str, ...]

    @property
    def num_columns(self) -> int:
        return max(self.columns, default=-1) + 1

    def by_column(self) -> list[list[int]]:
        """Gate indices in each column, left to right."""
        per_column: list[list[int]] = [[] for _ in range(self.num_columns)]
        for k, col in enumerate(self.columns):
            per_column[col].append(k)
        return per_column

    def dims_before(self, column: int) -> tuple[str, ...]:
        """What each wire carries just before ``column``."""
        current = list(self.in_dims)
        for k, col in enumerate(self.columns):
            if col < column:
                for q, label in zip(self.qudits[k], self.labels[k]):
                    current[q] = label.split("→")[-1]
        return tuple(current)


def _dim_labels(gate: Gate) -> tuple[str, ...]:
    return tuple(str(i) if i == o else f"{i}→{o}" for i, o in zip(gate.in_dims, gate.out_dims))


def _auto_labels(circuit: Circuit) -> list[tuple[str, ...]]:
    """Labels of an auto circuit's gates: ``?`` until the layer is known, except dims a gate
    writes (``gate (0) -> 8``) and what the wires carry after them; the last gate on a qudit
    gives it the layer's (unknown) output dim."""
    current = [_UNKNOWN] * circuit.num_qudits
    last = {q: k for k, g in enumerate(circuit.gates) for q in g.qudits}
    labels = []
    for k, g in enumerate(circuit.gates):
        outs = [str(o) for o in g.out_dims] or [
            _UNKNOWN if last[q] == k else current[q] for q in g.qudits]
        labels.append(tuple(i if i == o else f"{i}→{o}"
                            for i, o in zip((current[q] for q in g.qudits), outs)))
        for q, o in zip(g.qudits, outs):
            current[q] = o
    return labels


def _layout(circuit: Circuit) -> _Layout:
    """Check the circuit can be drawn and place its gates in columns."""
    if not circuit.is_auto:
        circuit.check_complete()  # raises QCError for qudits whose dims are unknown
    n = circuit.num_qudits
    level = [-1] * n  # last column used on each wire
    columns = []
    for g in circuit.gates:
        lo, hi = min(g.qudits), max(g.qudits)
        col = 1 + max(level[lo:hi + 1])
        level[lo:hi + 1] = [col] * (hi + 1 - lo)
        columns.append(col)
    if circuit.is_auto:
        ins = outs = (_UNKNOWN,) * n
    else:
        ins = tuple(map(str, circuit.in_dims))
        outs = tuple(map(str, circuit.out_dims))
    return _Layout(n, tuple(g.qudits for g in circuit.gates), tuple(columns),
                   tuple(_auto_labels(circuit) if circuit.is_auto
                         else (_dim_labels(g) for g in circuit.gates)), ins, outs)


def _runs(qudits: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted qudits grouped into runs of adjacent ones: ``(0, 1, 3)`` -> ``[(0, 1), (3, 3)]``."""
    runs: list[tuple[int, int]] = []
    for q in sorted(qudits):
        if runs and runs[-1][1] == q - 1:
            runs[-1] = (runs[-1][0], q)
        else:
            runs.append((q, q))
    return runs


# --- text -----------------------------------------------------------------------------
def _center(text: str, width: int, fill: str = " ") -> str:
    """``text`` centred in ``width``; an odd leftover goes to the right (unlike str.center)."""
    left = (width - len(text)) // 2
    return fill * left + text + fill * (width - len(text) - left)


def _box_width(name: str, labels: tuple[str, ...]) -> int:
    return max(len(name), *map(len, labels)) + 4  # two edges, one space each side


def _draw_box(canvas: list[list[str]], x: int, name: str, qudits: tuple[int, ...],
              labels: tuple[str, ...]) -> None:
    """Draw one gate into a column canvas, its left edge at ``x``."""
    width = _box_width(name, labels)
    inner, mid = width - 2, x + width // 2
    label_of = dict(zip(qudits, labels))
    runs = _runs(qudits)
    for i, (lo, hi) in enumerate(runs):
        top, bottom = ROWS * lo, ROWS * hi + ROWS - 1
        for r in range(top, bottom + 1):
            if r == top:
                text = "┌" + (_center(name, inner, "─") if i == 0 else "─" * inner) + "┐"
            elif r == bottom:
                text = "└" + "─" * inner + "┘"
            elif r % ROWS == 1:
                text = "┤" + _center(label_of[r // ROWS], inner) + "├"
            else:
                text = "│" + " " * inner + "│"
            canvas[r][x:x + width] = text
        if i > 0:
            canvas[top][mid] = "┴"
        if i < len(runs) - 1:
            canvas[bottom][mid] = "┬"
            for r in range(bottom + 1, ROWS * runs[i + 1][0]):
                canvas[r][mid] = "┼" if r % ROWS == 1 else "│"


def _render_column(layout: _Layout, gates: list[int]) -> list[str]:
    """The rows of one column holding ``gates`` (indices), all of one width."""
    boxes = [(k, f"G{k}", layout.labels[k]) for k in gates]
    width = max(_box_width(name, labels) for _, name, labels in boxes)
    canvas = [list(("─" if r % ROWS == 1 else " ") * width) for r in range(ROWS * layout.num_qudits)]
    for k, name, labels in boxes:
        x = (width - _box_width(name, labels)) // 2
        _draw_box(canvas, x, name, layout.qudits[k], labels)
    return ["".join(row) for row in canvas]


def _wire_label(q: int, dim: str, width: int) -> str:
    return f"q{q} ({dim})".ljust(width)


def _label_width(layout: _Layout) -> int:
    """Width of the widest wire label, over every dim any wire carries."""
    dims = set(layout.in_dims) | {d for ls in layout.labels for label in ls for d in label.split("→")}
    return max(len(_wire_label(layout.num_qudits - 1, d, 0)) for d in dims)


def _label_block(dims: tuple[str, ...], width: int, right: bool) -> list[str]:
    """Wire labels as rows: on the left they are followed by a space, on the right preceded."""
    rows = []
    for r in range(ROWS * len(dims)):
        text = _wire_label(r // ROWS, dims[r // ROWS], width) if r % ROWS == 1 else " " * width
        rows.append(" " + text if right else text + " ")
    return rows


def _join(blocks: list[list[str]]) -> list[str]:
    """Place row blocks side by side, a one-character wire between consecutive blocks."""
    rows = []
    for r in range(len(blocks[0])):
        sep = "─" if r % ROWS == 1 else " "
        rows.append(blocks[0][r] + "".join(sep + b[r] for b in blocks[1:]))
    return rows


def text_diagram(circuit: Circuit, width: int = 100) -> str:
    """A box-drawing picture of ``circuit``: one wire per qudit labelled ``q{i} ({dim})``,
    a box ``G{k}`` per gate showing each qudit's dim (``16→43`` where it changes), wrapped
    into bands at most ``width`` characters wide; the last band ends with the output dims.
    Bands are separated by a blank line; every line of a band has the same width."""
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise QCError(f"diagram width must be a positive integer, got {width!r}")
    layout = _layout(circuit)
    n = layout.num_qudits
    if n == 0:
        raise QCError("cannot draw a circuit without qudits")
    per_column = layout.by_column()
    columns = [_render_column(layout, gates) for gates in per_column]

    label_width = _label_width(layout)
    left = label_width + 1  # labels and the space after them
    more, last = 2, 2 + label_width  # "─»" or "─ q0 (16)"
    widest = max((len(c[0]) for c in columns), default=0)
    needed = left + (widest + 1 if columns else 0) + max(more, last)
    if width < needed:
        raise QCError(f"diagram width {width} is too narrow: this circuit needs at least {needed}")

    bands: list[list[int]] = [[]]
    used = left
    for c, rows in enumerate(columns):
        if bands[-1] and used + 1 + len(rows[0]) + more > width:
            bands.append([])
            used = left
        bands[-1].append(c)
        used += 1 + len(rows[0])
    if used + last > width:  # the output labels do not fit after the last column: move it
        bands.append([bands[-1].pop()])

    text_bands = []
    for b, band in enumerate(bands):
        start = band[0] if band else 0
        blocks = [_label_block(layout.dims_before(start), label_width, right=False)]
        blocks += [columns[c] for c in band]
        rows = _join(blocks)
        if b < len(bands) - 1:
            tail = ["─»" if r % ROWS == 1 else "  " for r in range(ROWS * n)]
        else:
            right = _label_block(layout.out_dims, label_width, right=True)
            tail = [("─" if r % ROWS == 1 else " ") + right[r] for r in range(ROWS * n)]
        text_bands.append("\n".join(row + t for row, t in zip(rows, tail)))
    return "\n\n".join(text_bands)


# --- pictures (matplotlib, imported lazily) -------------------------------------------
_UNIT = 0.6  # inches per layout unit; wires are one unit apart
_BOX = 0.36  # a box reaches this far above its top wire and below its bottom wire
_CHAR = 0.6 * 9 / 72 / _UNIT  # width of one 9pt monospace character, in layout units
_FONT = {"family": "DejaVu Sans Mono", "size": 9}
_CHANGED = "#b03a2e"  # colour of dims that a gate changes
_FORMATS = {".svg": "svg", ".png": "png"}


def _figure(circuit: Circuit):
    """A matplotlib Figure of the circuit; each gate's (first) box has gid ``gate{k}``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    layout = _layout(circuit)
    n = layout.num_qudits
    if n == 0:
        raise QCError("cannot draw a circuit without qudits")
    per_column = layout.by_column()
    widths = [max(len(s) for k in ks for s in (f"G{k}",) + layout.labels[k]) * _CHAR + 0.35
              for ks in per_column]
    margin = _label_width(layout) * _CHAR + 0.25
    centers, x = [], margin + 0.3
    for w in widths:
        centers.append(x + w / 2)
        x += w + 0.25
    total = x + 0.05 + margin

    fig = Figure(figsize=(total * _UNIT, (n + 0.2) * _UNIT))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, total)
    ax.set_ylim(-(n - 1) - 0.6, 0.6)
    ax.axis("off")
    for q in range(n):
        ax.plot([margin, total - margin], [-q, -q], color="black", lw=1, zorder=1)
        ax.text(margin - 0.1, -q, f"q{q} ({layout.in_dims[q]})", ha="right", va="center", **_FONT)
        changed = layout.out_dims[q] != layout.in_dims[q]
        ax.text(total - margin + 0.1, -q, f"q{q} ({layout.out_dims[q]})", ha="left", va="center",
                color=_CHANGED if changed else "black", **_FONT)
    for k, qudits in enumerate(layout.qudits):
        col = layout.columns[k]
        cx, w = centers[col], widths[col]
        runs = _runs(qudits)
        for i, (lo, hi) in enumerate(runs):
            ax.add_patch(Rectangle((cx - w / 2, -hi - _BOX), w, hi - lo + 2 * _BOX,
                                   facecolor="#eaf2fb", edgecolor="#1f4e79", lw=1.2, zorder=3,
                                   gid=f"gate{k}" if i == 0 else f"gate{k}-part{i}"))
            if i < len(runs) - 1:
                ax.plot([cx, cx], [-hi - _BOX, -runs[i + 1][0] + _BOX], color="#1f4e79",
                        lw=1.2, zorder=2)
        ax.text(cx, -runs[0][0] + _BOX - 0.05, f"G{k}", ha="center", va="top",
                fontweight="bold", zorder=4, **_FONT)
        for q, label in zip(qudits, layout.labels[k]):
            ax.text(cx, -q - 0.1, label, ha="center", va="center", zorder=4,
                    color=_CHANGED if "→" in label else "black", **_FONT)
    return fig


def _save(fig, target, fmt: str) -> None:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "qcircuit"}):
        fig.savefig(target, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else None)


def svg(circuit: Circuit) -> str:
    """The circuit as an SVG document (notebooks show it through ``Circuit._repr_svg_``)."""
    buf = io.BytesIO()
    _save(_figure(circuit), buf, "svg")
    return buf.getvalue().decode("utf-8")


def draw(circuit: Circuit, path: str | os.PathLike) -> None:
    """Write the circuit picture to ``path``: SVG or PNG by its suffix, atomically."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise QCError(f"cannot draw to {str(path)!r}: unknown file type {path.suffix!r}",
                      expected=" or ".join(_FORMATS))
    fig = _figure(circuit)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _save(fig, f, fmt)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
