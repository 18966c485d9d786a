"""Random ``.qc`` inputs: programs drawn from the grammar (``qcircuit/qc.lark``), then mutated.

``Generator(seed).case()`` returns ``str`` or ``bytes`` (byte flips) of at most ``max_bytes``.
Programs mix valid and near-valid choices at every rule (dims 0, 2**20 + 1, 20 digits; repeat
counts past the caps; unsafe regexes; out-of-range options, also in a rule's ``with``; ``train`` with no, bad or
repeated patterns;
``low_rank`` alone, on several qudits or mixed with gates; includes of FIFOs, devices, kernel
files, cycles and a 2**20-path diamond) so the parser's meaning checks are reached, not only
its syntax errors. Mutations: truncation, deletion, duplicated spans, inserted tokens and
unicode, huge numbers, deep nesting, long lines, CRLF or CR line ends, flipped bytes.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

NAMES = ["c", "attn", "up", "x", "circuit", "gate", "to", "all_pairs", "_", "é", "c" * 300]
DIMS = ["1", "2", "3", "4", "8", "16", "43", "0", "-1", "1048576", "1048577",
        "99999999999999999999", "4x4", "16x43"]
COUNTS = ["1", "2", "3", "0", "-2", "64", "65", "4096", "4097", "10000", "1" + "0" * 30]
PATHS = ["q_proj", "v_proj", "self_attn.q_proj", "layers.0.mlp.up_proj", "x.y", "a" * 200]
REGEXES = [r"layers\.[0-3]\.self_attn\.(q|v)_proj$", r"q_proj$", r".*\.v_proj", r"a\/b",
           "(a+)+$", "(a|a)*b", "(x+x+)+y", "(a*)*", "(a|aa)+", ".*.*.*.*Z", r"\1(a)",
           "(?=x)", "(?x)a", "(ab", "[", "a{2,3}", "(a?){25}", "x" * 300, "(" * 60, r"\d+\.\d+"]
OPTIONS = [("init", ["freeze_one", "zero_last", "ones", "3"]),
           ("scale", ["1", "0.5", "-2", "0", "1e308", "1e999", "1e-7", "10000", "10001", "nan"]),
           ("dropout", ["0", "0.1", "0.999", "1", "-0.1", "1e-320"]),
           ("lr", ["3"])]
INCLUDES = ["ok.qc", "opts.qc", "cycle_a.qc", "diamond0.qc", "missing.qc", "fifo.qc", "dir.qc",
            "big.qc", "env.qc", "zero.qc", "notes.txt", "/dev/zero", "/proc/self/environ",
            "bad_utf8.qc", "../" * 40 + "etc/passwd"]
TOKENS = ["circuit", "qudits", "auto", "gate", "all_pairs", "repeat", "apply", "to", "option",
          "include", "with", "low_rank", "train", "{", "}", "(", ")", ",", "->", "-", ">", "x", "=", "#", "/", "\\", '"',
          "\n", "\r", "\t", " ", "\x00", "é", "𝕏", "\u202e", "\ufeff", "16x16", "1e999"]


def make_include_dir(root: Path) -> Path:
    """The files that ``include`` statements in generated programs name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ok.qc").write_text("circuit inc { qudits 4 4 all_pairs }\napply inc to k_proj\n")
    (root / "opts.qc").write_text("option dropout = 0.1\n")
    (root / "cycle_a.qc").write_text('include "cycle_b.qc"\n')
    (root / "cycle_b.qc").write_text('include "cycle_a.qc"\n')
    for k in range(20):  # 2**20 paths from diamond0.qc to diamond20.qc
        (root / f"diamond{k}.qc").write_text(f'include "diamond{k + 1}.qc"\n' * 2)
    (root / "diamond20.qc").write_text("apply inc to o_proj\n")
    (root / "notes.txt").write_text("SECRET=do-not-echo\n")
    (root / "bad_utf8.qc").write_bytes(b"circuit c { qudits 2 \xff gate (0) }")
    (root / "dir.qc").mkdir(exist_ok=True)
    with open(root / "big.qc", "wb") as f:  # sparse: over the size cap, no disk used
        f.truncate(5 * 2**20)
    for name, target in (("env.qc", "/proc/self/environ"), ("zero.qc", "/dev/zero")):
        if not (root / name).is_symlink():
            os.symlink(target, root / name)
    if hasattr(os, "mkfifo") and not (root / "fifo.qc").exists():
        os.mkfifo(root / "fifo.qc")
    return root


class Generator:
    """Seeded: the same seed gives the same cases."""

    def __init__(self, seed: int, max_bytes: int = 100_000):
        self.rng = random.Random(seed)
        self.max_bytes = max_bytes

    # --- programs from the grammar ---------------------------------------------------------
    def pick(self, items):
        return self.rng.choice(items)

    def space(self) -> str:
        return self.pick([" ", " ", "\n", "\n    ", "\t", "  # note\n", "\r\n"])

    def program(self) -> str:
        items = [self.item() for _ in range(self.rng.randint(0, 5))]
        return self.space().join(items) + "\n"

    def item(self) -> str:
        kind = self.rng.random()
        if kind < 0.5:
            return self.circuit()
        if kind < 0.75:
            patterns = [self.pattern() for _ in range(self.rng.randint(1, 3))]
            text = f"apply {self.pick(NAMES[:4])} to {', '.join(patterns)}"
            if self.rng.random() < 0.4:  # per-rule options, a key sometimes twice
                pairs = [self.setting() for _ in range(self.rng.randint(0, 4))]
                text += f"{self.space()}with {', '.join(pairs)}"
            return text
        if kind < 0.82:
            patterns = [self.pattern() for _ in range(self.rng.randint(0, 3))]
            return f"train {', '.join(patterns)}"   # none: a syntax error; twice: refused
        if kind < 0.92:
            return f"option {self.setting()}"
        return f'include "{self.pick(INCLUDES)}"'

    def setting(self) -> str:
        key, values = self.pick(OPTIONS)
        return f"{key} = {self.pick(values)}"

    def pattern(self) -> str:
        return self.pick(PATHS) if self.rng.random() < 0.5 else f"/{self.pick(REGEXES)}/"

    def circuit(self) -> str:
        if self.rng.random() < 0.1:  # low_rank alone, after a qudits line, or mixed (an error)
            head = self.pick(["", "qudits auto 1 ", "qudits auto 2 ", "qudits 64 -> 172 ",
                              "qudits 8 8 ", "gate (0) "])
            tail = self.pick(["", "", " gate (0)", " all_pairs", " low_rank 2"])
            return (f"circuit {self.pick(NAMES)} {{ {head}low_rank {self.pick(COUNTS + DIMS)}"
                    f"{tail} }}")
        n = self.rng.choice([1, 2, 2, 3, 4, 6])
        if self.rng.random() < 0.15:
            n_text = self.pick(["2", "3", "12", "64", "65", "0"])
            qudits, n = f"qudits auto {n_text}", int(n_text)
        else:
            ins = [self.pick(DIMS[:7]) if self.rng.random() < 0.9 else self.pick(DIMS)
                   for _ in range(n)]
            qudits = "qudits " + " ".join(ins)
            if self.rng.random() < 0.2:
                qudits += " -> " + " ".join(self.pick(DIMS[:7]) for _ in range(n))
        body = self.space().join(self.statement(n, 0) for _ in range(self.rng.randint(0, 4)))
        return f"circuit {self.pick(NAMES)} {{{self.space()}{qudits}{self.space()}{body} }}"

    def statement(self, n: int, depth: int) -> str:
        kind = self.rng.random()
        if kind < 0.6:
            arity = self.rng.randint(1, 3)
            qs = [str(self.rng.randint(0, max(n, 1))) for _ in range(arity)]
            text = f"gate ({', '.join(qs)})"
            roll = self.rng.random()
            if roll < 0.3:
                text += " " + "x".join(self.pick(DIMS[:7]) for _ in range(arity))
                if self.rng.random() < 0.5:
                    text += " -> " + "x".join(self.pick(DIMS[:7]) for _ in range(arity))
            elif roll < 0.4:  # output dims only (auto circuits take these)
                text += " -> " + "x".join(self.pick(DIMS[:7]) for _ in range(arity))
            return text
        if kind < 0.65:
            return f"low_rank {self.pick(DIMS[:7])}"
        if kind < 0.8 or depth >= 3:
            return "all_pairs"
        inner = " ".join(self.statement(n, depth + 1) for _ in range(self.rng.randint(0, 2)))
        return f"repeat {self.pick(COUNTS)} {{ {inner} }}"

    # --- mutations -------------------------------------------------------------------------
    def case(self) -> str | bytes:
        text = self.program()
        for _ in range(self.rng.randint(0, 3)):
            text = self.mutate(text)[:self.max_bytes]  # cut each time: mutations multiply
        text = text[:self.max_bytes]
        if len(text.encode("utf-8")) > self.max_bytes:
            text = text[:self.max_bytes // 4]
        if self.rng.random() < 0.08:
            return self.flip_bytes(text)
        return text

    def mutate(self, text: str) -> str:
        rng, size = self.rng, len(text)
        i = rng.randint(0, size)
        j = rng.randint(i, min(size, i + 60))
        op = rng.randrange(11)
        if op == 0:
            return text[:i]
        if op == 1:
            return text[:i] + text[j:]
        if op == 2:  # a duplicated span, sometimes many times (long inputs)
            times = rng.choice([1, 2, 10, 1000])
            return text[:j] + text[i:j] * times + text[j:]
        if op == 3:
            return text[:i] + self.pick(TOKENS) + text[i:]
        if op == 4:  # random code points (no lone surrogates: the text must be encodable)
            chars = "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF),
                                            rng.randint(0xE000, 0x10FFFF)]))
                            for _ in range(rng.randint(1, 6)))
            return text[:i] + chars + text[i:]
        if op == 5:  # a huge number
            return text[:i] + " " + "9" * rng.choice([20, 400, 20_000]) + " " + text[i:]
        if op == 6:  # deep nesting
            k = rng.choice([40, 1000, 5000])
            nest = "repeat 1 { " * k + "gate (0)" + " }" * k
            return text[:i] + rng.choice([nest, "{" * k, "(" * k, "circuit c { qudits 2 " + nest
                                          + " }"]) + text[i:]
        if op == 7:  # one long line
            return " ".join(text.split("\n")) * rng.choice([1, 20, 300])
        if op == 8:
            return text.replace("\n", rng.choice(["\r\n", "\r", "\n\n"]))
        if op == 9:  # a long token
            unit = rng.choice(["a", "q_proj.", ".a", "1", "1x", "/", "\\a", "#"])
            return text[:i] + unit * 50_000 + text[i:]
        return text[:i] + text[i:j][::-1] + text[j:]

    def flip_bytes(self, text: str) -> bytes:
        data = bytearray(text.encode("utf-8"))
        for _ in range(self.rng.randint(1, 8)):
            if data:
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        return bytes(data)
