"""Every fenced code block of README.md and docs/**/*.md runs here: the docs cannot drift.

Each block is one test, ``FILE:LINE`` (the line of its opening fence). What a block does
depends on its tag; a block with no tag or another tag fails, so every block is classified.

- ``python``: run in order, one namespace per file (later blocks use earlier names), in a
  fresh temporary directory per file holding copies of ``examples/`` and ``benchmarks/``,
  with ``torch.set_num_threads(2)`` and the network blocked. What it prints is its output.
- ``qc``: written to ``adapter.qc`` in that directory and parsed (includes resolved there);
  circuits with concrete dims are compiled. A first line ``# examples/NAME.qc`` means the
  program must equal that file's (comments may differ). A program with ``apply`` rules must
  name a model to be checked against (``model`` below): ``qcompile adapter.qc --model NAME``
  must then succeed, and its report is the block's output.
- ``bash``, ``sh``, ``console``: each command (``\\`` continuations joined, ``&&`` and ``;``
  chains split; in ``console`` the lines starting ``$ ``, the lines after one being its
  expected output) must exit 0 within 60 s: ``qcompile …`` runs in-process, anything else as
  a process with this Python's ``bin`` first on ``PATH``, in the file's directory. Set-up
  commands are not run and the test prints why (``SETUP`` below): virtual environments,
  ``pip install``, ``git clone``, ``cd``, multi-process launches, the test suite itself.
  The last command's standard output is the block's output.
- ``text``: not run, unless marked ``output``.

Markers are HTML comments (invisible on GitHub) on the lines right before a fence, blank
lines allowed; several may stack. A marker anywhere else, or a malformed one, fails.

    <!-- docs-test: skip (reason) -->   never run; the reason is the skip message
    <!-- docs-test: slow (reason) -->   run only with QCIRCUIT_SLOW_DOCS=1 (and no 60 s cap):
                                        for blocks that need real weights or take over 60 s
    <!-- docs-test: output -->          a text block that must equal the output of the block
                                        before it (trailing spaces and blank lines at either
                                        end ignored; a line ``...`` matches any lines)
    <!-- docs-test: model NAME -->      a qc block checked by ``qcompile --model NAME``
                                        (an embedded config: ``qcompile --list-models``)
    <!-- docs-test: error -->           a qc block that must be refused; the QCError's text
                                        (with ``model``: qcompile's stderr) is its output
    <!-- docs-test: given NAME, … -->   names and files the test provides to the block
                                        (``GIVEN``: base_dir, out_dir, model, base,
                                        fresh_model, fresh_base: a tiny random LLaMA,
                                        hidden 64, and ``adapter.qc``: a program for it)
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("QCIRCUIT_SLOW_DOCS") == "1"
SECONDS = 60          # longer than this and a block must be marked slow
TAGS = {"python", "qc", "bash", "sh", "console", "text"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
TINY_PROGRAM = "circuit attn { qudits 4 4 4  all_pairs }\napply attn to q_proj, v_proj\n"
# commands a reader runs once to set up, never run here: (first words, why)
SETUP = [
    (("python", "-m", "venv"), "creates a virtual environment: the test runs in one"),
    ((".",), "activates a virtual environment: the test runs in one"),
    (("source",), "activates a virtual environment: the test runs in one"),
    (("pip", "install"), "installs packages: the test's environment has them"),
    (("python", "-m", "pip", "install"), "installs packages: the test's environment has them"),
    (("git", "clone"), "clones the repository: the test runs in a checkout"),
    (("cd",), "changes directory: each file's blocks run in their own"),
    (("torchrun",), "launches several processes: tests/test_distributed.py runs these workers"),
    (("python", "-m", "torch.distributed.run"),
     "launches several processes: tests/test_distributed.py runs these workers"),
    (("pytest",), "runs the test suite, which this test is part of"),
    (("python", "-m", "pytest"), "runs the test suite, which this test is part of"),
]


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its tag and text, and the markers before it."""

    file: str
    line: int
    tag: str
    text: str
    markers: dict = field(default_factory=dict)     # keyword -> argument ("" if none)
    problems: tuple = ()                            # malformed markers, as messages

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def read_marker(body: str) -> tuple[str, str, str | None]:
    """``skip (why)`` -> (keyword, argument, problem or None)."""
    keyword, _, arg = body.partition(" ")
    arg = arg.strip()
    if keyword in ("skip", "slow"):
        reason = re.fullmatch(r"\((.*\S.*)\)", arg)
        return keyword, reason and reason.group(1), None if reason else \
            f"'{keyword}' needs a reason in parentheses: <!-- docs-test: {keyword} (why) -->"
    if keyword in ("output", "error"):
        return keyword, "", None if not arg else f"'{keyword}' takes no argument, got {arg!r}"
    if keyword in ("model", "given"):
        return keyword, arg, None if arg else f"'{keyword}' needs an argument"
    return keyword, arg, f"unknown marker {keyword!r} (skip, slow, output, model, error, given)"


def blocks_of(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and the markers attached to no block."""
    name = str(path.relative_to(ROOT))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, stray, pending = [], [], []          # pending: (line, keyword, arg, problem)
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            found = MARKER.fullmatch(lines[i].strip())
            if found:
                pending.append((i + 1, *read_marker(found.group(1))))
            elif "docs-test" in lines[i]:
                stray.append(f"{name}:{i + 1}: malformed marker (<!-- docs-test: WORD ... -->)")
            elif lines[i].strip():
                stray += [f"{name}:{n}: marker not right before a code block" for n, *_ in pending]
                pending = []
            i += 1
            continue
        indent, fence, tag = opening.groups()
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not re.fullmatch(rf"\s*{fence[0]}{{{len(fence)},}}\s*", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        markers = {keyword: arg for _, keyword, arg, _ in pending}
        problems = tuple(f"line {n}: {p}" for n, _, _, p in pending if p)
        if len(markers) < len(pending):
            problems += ("a marker is given twice",)
        text = "\n".join(body) + "\n" if body else ""
        blocks.append(Block(name, start, tag, text, markers, problems))
        pending, i = [], i + 1
    stray += [f"{name}:{n}: marker not right before a code block" for n, *_ in pending]
    return blocks, stray


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


BLOCKS = {str(path.relative_to(ROOT)): blocks_of(path)[0] for path in doc_files()}
# a text block not marked is shown, not run: no test
RUN = [b for blocks in BLOCKS.values() for b in blocks
       if b.tag != "text" or b.markers or b.problems]


# --- output -------------------------------------------------------------------------------

def normalised(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def assert_output(expected: str, actual: str, where: str) -> None:
    """``actual`` equals ``expected`` after ``normalised``; a line ``...`` matches any lines."""
    pattern = "".join(r"(?:.*\n)*?" if line == "..." else re.escape(line) + r"\n"
                      for line in normalised(expected))
    got = "".join(line + "\n" for line in normalised(actual))
    assert re.fullmatch(pattern, got), f"{where}: the output differs.\nexpected:\n{expected}\ngot:\n{actual}"


# --- running ------------------------------------------------------------------------------

@contextlib.contextmanager
def isolated(cwd: Path, env: dict | None = None):
    """In ``cwd``, two torch threads, no network, ``env`` set; all restored after."""
    real_connect, threads, before = socket.socket.connect, torch.get_num_threads(), os.getcwd()
    saved = {k: os.environ.get(k) for k in env or {}}

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"docs test: no network ({address!r})")
        return real_connect(sock, address)
    socket.socket.connect = connect
    torch.set_num_threads(2)
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        torch.set_num_threads(threads)
        socket.socket.connect = real_connect


def qcompile(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    """``qcompile ARGV`` in-process: (exit status, stdout, stderr)."""
    from qcircuit.runtime.cli import main
    out, err = io.StringIO(), io.StringIO()
    with isolated(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def shell_commands(block: Block) -> list[tuple[list[str], str | None]]:
    """(words, expected output or None) of each command in a shell block."""
    lines, expected = [], []           # logical command lines; expected output per line
    pending = ""
    for raw in block.text.splitlines():
        if block.tag == "console" and not pending and not raw.startswith("$ "):
            if expected:
                expected[-1].append(raw)
            continue
        text = pending + (raw[2:] if block.tag == "console" and not pending else raw)
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.strip() and not text.strip().startswith("#"):
            lines.append(text)
            expected.append([] if block.tag == "console" else None)
    commands = []
    for text, shown in zip(lines, expected):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, parts = list(lexer), [[]]
        for word in words:
            parts.append([]) if word in ("&&", ";") else parts[-1].append(word)
        parts = [p for p in parts if p]
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            commands.append((part, "\n".join(shown) if last and shown is not None else None))
    return commands


def setup_reason(words: list[str]) -> str | None:
    plain = ["python" if w in ("python3", sys.executable) else w for w in words]
    for prefix, reason in SETUP:
        if tuple(plain[:len(prefix)]) == prefix:
            return reason
    return None


def run_command(words: list[str], cwd: Path, limit: float) -> tuple[int, str, str]:
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    operators = [w for w in words if w and set(w) <= set("|&<>()")]
    if operators:
        pytest.fail(f"shell operator {operators[0]!r} is not supported: write plain commands")
    if words[0] == "qcompile":
        return qcompile(words[1:], cwd, env)
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    try:
        done = subprocess.run(words, cwd=cwd, env=full, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{shlex.join(words)} ran over {limit:.0f} s: mark the block "
                    "<!-- docs-test: slow (reason) -->")
    return done.returncode, done.stdout, done.stderr


class Session:
    """One Markdown file's run: its directory, namespace and each block's outcome, in order."""

    def __init__(self, blocks: list[Block], directory: Path):
        self.blocks, self.cwd, self.namespace = blocks, directory, {"__name__": "__docs__"}
        for folder in ("examples", "benchmarks"):
            shutil.copytree(ROOT / folder, directory / folder)
        self.outcomes: list = []          # per block: ("ok", output or None) or ("skip"/"fail", why)

    def outcome(self, index: int, request) -> tuple[str, object]:
        while len(self.outcomes) <= index:
            block = self.blocks[len(self.outcomes)]
            try:
                self.outcomes.append(("ok", self.run(block, request)))
            except pytest.skip.Exception as skip:
                self.outcomes.append(("skip", skip.msg))
            except BaseException as error:  # noqa: BLE001 - reported by the block's test
                self.outcomes.append(("fail", error))
        return self.outcomes[index]

    def previous(self) -> tuple[str, object]:
        return self.outcomes[-1] if self.outcomes else ("fail", "no block before it")

    def run(self, block: Block, request):
        if block.problems:
            pytest.fail("; ".join(block.problems))
        if "skip" in block.markers:
            pytest.skip(f"skip: {block.markers['skip']}")
        if "slow" in block.markers and not SLOW:
            pytest.skip(f"slow: {block.markers['slow']} (QCIRCUIT_SLOW_DOCS=1 runs it)")
        if block.tag not in TAGS:
            pytest.fail(f"tag {block.tag or '(none)'!r}: give the block one of {sorted(TAGS)} "
                        "(text is shown, not run)")
        if block.tag == "text" and "output" not in block.markers:
            pytest.fail("a text block takes no marker but output (or skip)")
        for keyword, tags in (("output", {"text"}), ("model", {"qc"}), ("error", {"qc"}),
                              ("given", TAGS - {"text"})):
            if keyword in block.markers and block.tag not in tags:
                pytest.fail(f"marker {keyword!r} is for {'/'.join(sorted(tags))} blocks, "
                            f"not {block.tag}")
        self.give(block, request)
        start = time.perf_counter()
        output = getattr(self, "run_" + ("shell" if block.tag in ("bash", "sh", "console")
                                         else block.tag))(block)
        took = time.perf_counter() - start
        if took > SECONDS and "slow" not in block.markers:
            pytest.fail(f"took {took:.0f} s: mark it <!-- docs-test: slow (reason) -->")
        return output

    def give(self, block: Block, request) -> None:
        for name in filter(None, re.split(r"[,\s]+", block.markers.get("given", ""))):
            if name == "adapter.qc":
                (self.cwd / name).write_text(TINY_PROGRAM)
            elif name in ("model", "base", "fresh_model", "fresh_base"):
                self.namespace[name] = request.getfixturevalue("make_llama")()
            elif name == "base_dir":
                request.getfixturevalue("make_llama")().save_pretrained(self.cwd / "base_model")
                self.namespace[name] = str(self.cwd / "base_model")
            elif name == "out_dir":
                self.namespace[name] = str(self.cwd / "out")
            else:
                pytest.fail(f"given {name!r}: the test provides adapter.qc, model, base, "
                            "fresh_model, fresh_base, base_dir and out_dir")

    def run_python(self, block: Block) -> str:
        code = compile("\n" * block.line + block.text, block.file, "exec")  # the file's lines
        out = io.StringIO()
        try:
            with isolated(self.cwd), contextlib.redirect_stdout(out):
                exec(code, self.namespace)
        finally:
            print(out.getvalue(), end="")
        return out.getvalue()

    def run_qc(self, block: Block) -> str | None:
        from qcircuit import QCError, parse_file
        from qcircuit.compiler import compile as compile_circuit
        (self.cwd / "adapter.qc").write_text(block.text)
        model = block.markers.get("model")
        argv = ["adapter.qc", "--model", model] if model else None
        if "error" in block.markers:
            if argv:
                code, _, err = qcompile(argv, self.cwd)
                assert code == 2, f"qcompile accepted the block (exit {code})"
                return err
            with isolated(self.cwd), pytest.raises(QCError) as refused:
                parse_file("adapter.qc")
            return str(refused.value)
        with isolated(self.cwd):
            program = parse_file("adapter.qc")
            for circuit in program.circuits.values():
                if circuit.auto is None:
                    assert compile_circuit(circuit).num_params == circuit.num_params
        named = re.match(r"#\s*(examples/[\w.-]+\.qc)\b", block.text)
        if named and program != parse_file(ROOT / named.group(1)):
            pytest.fail(f"the block's program is not {named.group(1)}'s: it prints as\n"
                        f"{program.to_qc()}\nand the file's as\n"
                        f"{parse_file(ROOT / named.group(1)).to_qc()}")
        if argv:
            code, out, err = qcompile(argv, self.cwd)
            assert code == 0, f"qcompile {shlex.join(argv)} exited {code}: {err}"
            return out
        if program.rules:
            pytest.fail("a program with apply rules names the model that checks it: "
                        "<!-- docs-test: model NAME --> (qcompile --list-models)")
        return None

    def run_shell(self, block: Block) -> str | None:
        output, ran, limit = None, False, 24 * 3600 if SLOW else SECONDS
        for words, expected in shell_commands(block):
            reason = setup_reason(words)
            if reason:
                print(f"not run: {shlex.join(words)}: {reason}")
                continue
            code, output, err = run_command(list(words), self.cwd, limit)
            ran = True
            assert code == 0, f"{shlex.join(words)} exited {code}:\n{err}"
            if expected is not None and expected.strip():
                assert_output(expected, output, shlex.join(words))
        if not ran:
            by_reason: dict[str, list[str]] = {}
            for words, _ in shell_commands(block):
                by_reason.setdefault(setup_reason(words), []).append(shlex.join(words))
            pytest.skip("no command run: " + "; ".join(
                f"{shown[0]}{f' (and {len(shown) - 1} more)' if len(shown) > 1 else ''}: {why}"
                for why, shown in by_reason.items()))
        return output

    def run_text(self, block: Block) -> None:
        state, previous = self.previous()
        if state == "skip":
            pytest.skip(f"the block before it did not run ({previous})")
        if state == "fail":
            pytest.fail(f"the block before it failed: {previous}")
        if previous is None:
            pytest.fail("the block before it has no output to compare")
        assert_output(block.text, previous, block.id)


@pytest.fixture(scope="session")
def sessions(tmp_path_factory):
    made = {}

    def session(file: str) -> Session:
        if file not in made:
            blocks = [b for b in BLOCKS[file] if b in RUN]
            made[file] = Session(blocks, tmp_path_factory.mktemp(Path(file).stem))
        return made[file]
    return session


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block(block: Block, sessions, request):
    __tracebackhide__ = True
    session = sessions(block.file)
    state, result = session.outcome(session.blocks.index(block), request)
    if state == "skip":
        pytest.skip(result)
    if state == "fail":
        raise result


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markers_sit_before_blocks(path):
    assert blocks_of(path)[1] == []
