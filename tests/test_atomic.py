"""Several writers and killed writers of one checkpoint directory (issue 22, case 6).

Two processes' first saves into the same new directory end with one complete checkpoint
and, for each process, success or a ``QCError`` (never a raw ``OSError``); temporary
directories left by a process killed with ``kill -9`` are removed by the next save of that
directory, and those of a live writer are not.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcircuit import QCError
from qcircuit.runtime import checkpoint
from qcircuit.runtime.atomic_dir import _prefix, replace_dir


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_writer_that_got_there_first(tmp_path, overwrite):
    """The other writer puts its directory at the target after our checks, before our
    swap: without overwrite ours is refused cleanly, with it ours replaces theirs."""
    target = tmp_path / "new"

    def fill(tmp: Path) -> None:
        (tmp / "a").write_text("mine")
        other = tmp_path / "other"
        other.mkdir()
        (other / "a").write_text("theirs")
        os.replace(other, target)   # the other process finishes first

    if overwrite:
        replace_dir(target, fill, owned=("a",), overwrite=True, what="a test")
        assert (target / "a").read_text() == "mine"
    else:
        with pytest.raises(QCError, match="already holds a test"):
            replace_dir(target, fill, owned=("a",), overwrite=False, what="a test")
        assert (target / "a").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


RACER = """
import os, sys, time
from qcircuit import QCError
from qcircuit.runtime import checkpoint
record, tensors = checkpoint.read(sys.argv[1])
go, rounds = sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
start = float(open(go).read())
for k in range(2 * rounds):   # the default save (overwrite) first, then overwrite=False
    while time.time() < start + 0.2 * k:   # both processes write at once, round by round
        pass
    try:
        checkpoint.write(f"{sys.argv[2]}/round{k}", record, tensors, overwrite=k < rounds)
        print("ok", flush=True)
    except QCError as e:
        print("refused", str(e).splitlines()[0][:80], flush=True)
    except Exception as e:
        print("OTHER", type(e).__name__, e, flush=True)
"""


def test_two_processes_first_save_into_the_same_new_directory(tmp_path, tiny_llama):
    from qcircuit.runtime import attach
    from test_adapter import llama_program

    attach(tiny_llama, llama_program(), seed=0).save(tmp_path / "src")
    (tmp_path / "out").mkdir()
    rounds, go = 10, tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", RACER, str(tmp_path / "src"), str(tmp_path / "out"),
            str(go), str(rounds)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
    go.write_text(str(time.time() + 0.2))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0].splitlines() for o in outs]
    assert all(len(x) == 2 * rounds for x in lines)
    assert not any(line.startswith("OTHER") for x in lines for line in x), lines
    for k in range(2 * rounds):
        outcomes = sorted(x[k].split()[0] for x in lines)
        assert outcomes == (["ok", "ok"] if k < rounds else ["ok", "refused"]), (k, outcomes)
        checkpoint.read(tmp_path / "out" / f"round{k}")   # one complete checkpoint
    assert leftovers(tmp_path / "out") == []


KILLED = """
import os, sys, time
from qcircuit.runtime import atomic_dir, checkpoint
record, tensors = checkpoint.read(sys.argv[1])
def stop(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)
checkpoint.save_file = stop   # killed while writing its temporary directory
checkpoint.write(sys.argv[2], record, tensors)
"""


def test_a_killed_writers_temporary_directory_goes_with_the_next_save(tmp_path, tiny_llama):
    from qcircuit.runtime import attach
    from test_adapter import llama_program

    adapted = attach(tiny_llama, llama_program(), seed=0)
    adapted.save(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "ckpt"),
                             str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".ckpt.tmp-")
    live = tmp_path / (_prefix(tmp_path / "ckpt", "tmp") + "busy")   # this process: alive
    live.mkdir()
    adapted.save(tmp_path / "ckpt")
    assert leftovers(tmp_path) == [live.name]
    checkpoint.read(tmp_path / "ckpt")
