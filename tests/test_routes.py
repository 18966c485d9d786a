"""Routes and their choice (compiler/routes.py, compiler/wisdom.py): every route exact and
differentiable, the measured minimum wins (fake timer), wisdom empty / warm / corrupted /
read-only / shared by processes, bounded planning, caps."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qcircuit import Circuit, QCError
from qcircuit.compiler import compile, routes, wisdom

from reference import assert_close, circuit_operator

CIRCUIT = Circuit(3, 2, 4, 2).all_pairs()   # both forward routes and all three dense ones plan


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Wisdom in a fresh directory; nothing remembered in memory."""
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(tmp_path / "cache"))
    wisdom.forget()
    yield tmp_path / "cache"
    wisdom.forget()


def fake(times: dict[str, float], seen: list | None = None):
    """A timer that reports ``times`` and records which candidates it was asked to time."""
    def measure(thunks):
        if seen is not None:
            seen.append(sorted(thunks))
        return {n: times[n] for n in thunks}
    return measure


def gates_for(c: Circuit, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(g.shape, generator=gen, dtype=dtype) for g in c.gates]


SMALL = Circuit(2, 3, 2).gate((2, 0)).gate((0, 1), out=(3, 2)).gate((1, 2))


@pytest.mark.parametrize("kind", ["forward", "dense"])
@pytest.mark.parametrize("circuit", [CIRCUIT, SMALL])
def test_every_route_is_exact_and_differentiable(kind, circuit):
    plan = compile(circuit)
    gates = [g.requires_grad_() for g in gates_for(circuit)]
    want = circuit_operator(circuit, gates)
    check = circuit is SMALL  # gradcheck on the small one (it is slow on the other)
    names = [r.name for r in routes.routes_for(kind, "cpu")]
    assert names[0] == "einsum" and len(names) == (2 if kind == "forward" else 3)
    for name in names:
        rp = routes.forced(plan, kind, name, 8 if kind == "forward" else None, "cpu",
                           torch.float64)
        assert rp.route == name and rp.how == "forced"
        run = routes.build(plan, rp)
        if kind == "forward":
            x = torch.randn(5, circuit.in_features, dtype=torch.float64, requires_grad=True)
            assert_close(run(x, gates), x @ want.T)
            if check:
                assert torch.autograd.gradcheck(lambda x, *g: run(x, g), (x[:2], *gates))
        else:
            with torch.no_grad():
                assert_close(run(gates), want)
            if check and name != "lightcone":  # the light cone is forward only
                assert torch.autograd.gradcheck(lambda *g: run(g), tuple(gates))


def test_one_forward_executor_serves_every_token_count_of_its_bucket():
    """The einsum route builds its opt_einsum expression at the first call; later calls
    with other token counts of the bucket (and the same call again) stay exact."""
    plan = compile(SMALL)
    gates = gates_for(SMALL)
    want = circuit_operator(SMALL, gates)
    run = routes.build(plan, routes.forced(plan, "forward", "einsum", 16, "cpu", torch.float64))
    for n in (16, 9, 1, 16):
        x = torch.randn(n, SMALL.in_features, dtype=torch.float64)
        assert_close(run(x, gates), x @ want.T)


@pytest.mark.parametrize("kind, times", [
    ("forward", {"einsum": 2.0, "schedule": 1.0}), ("forward", {"einsum": 1.0, "schedule": 2.0}),
    ("dense", {"einsum": 3.0, "schedule": 1.0, "lightcone": 2.0}),
    ("dense", {"einsum": 1.0, "schedule": 3.0, "lightcone": 2.0}),
    ("dense", {"einsum": 3.0, "schedule": 2.0, "lightcone": 1.0})])
def test_the_measured_minimum_wins_among_candidates_with_the_one_expression(kind, times,
                                                                           monkeypatch):
    monkeypatch.setattr(routes, "PRUNE", float("inf"))  # time every candidate
    seen: list = []
    rp = routes.choose(compile(CIRCUIT), kind, 64, "cpu", torch.float32,
                       measure=fake(times, seen))
    assert seen, rp.explain()
    timed = seen[0]
    assert "einsum" in timed
    assert rp.route == min(timed, key=times.__getitem__)
    measured = {c.route: c.measured for c in rp.candidates}
    assert all(measured[n] == times[n] for n in timed)
    text = rp.explain()
    assert f"chosen: {rp.route} (measured)" in text and all(n in text for n in timed)


def test_pruning_never_drops_the_one_expression(monkeypatch):
    monkeypatch.setattr(routes, "PRUNE", 0.0)  # everything but the one expression pruned
    rp = routes.choose(compile(CIRCUIT), "forward", 64, "cpu", torch.float32,
                       measure=fake({"einsum": 1.0, "schedule": 0.5}))
    assert rp.route == "einsum" and rp.how == "only"
    assert any("pruned" in c.note for c in rp.candidates if c.route == "schedule")


def test_tune_off_is_the_model_choice_and_measures_nothing():
    def never(thunks):
        raise AssertionError("measured")
    plan = compile(CIRCUIT)
    rp = routes.choose(plan, "forward", 64, "cpu", torch.float32, tune=False, measure=never)
    assert rp.how == "model"
    predicted = {c.route: c.predicted for c in rp.candidates if c.predicted is not None}
    assert rp.route == min(predicted, key=predicted.__getitem__)


def test_wisdom_empty_then_warm_then_shared_by_a_fresh_process_view(cache):
    plan = compile(CIRCUIT)
    seen: list = []
    first = routes.choose(plan, "forward", 16, "cpu", torch.float32,
                          measure=fake({"einsum": 1.0, "schedule": 2.0}, seen))
    assert first.how == "measured" and first.route == "einsum" and len(seen) == 1
    entries = json.loads((cache / wisdom.FILE).read_text())["entries"]
    assert [e["route"] for e in entries.values()] == ["einsum"]
    wisdom.forget()  # what another process sees: only the file
    again = routes.choose(plan, "forward", 16, "cpu", torch.float32,
                          measure=fake({"einsum": 9.0, "schedule": 1.0}, seen))
    assert again.how == "wisdom" and again.route == "einsum" and len(seen) == 1
    other = routes.choose(plan, "forward", 16, "cpu", torch.float64,  # another dtype: measured
                          measure=fake({"einsum": 9.0, "schedule": 1.0}, seen))
    assert other.route == "schedule" and len(seen) == 2


def test_corrupted_wisdom_is_ignored_with_a_warning_and_replaced(cache):
    cache.mkdir(parents=True)
    for garbage in ("{not json", json.dumps({"version": 1, "entries": {"k": 5}}), "\xff\xfe"):
        (cache / wisdom.FILE).write_text(garbage)
        wisdom.forget()
        with pytest.warns(RuntimeWarning, match="corrupted|unreadable"):
            rp = routes.choose(compile(CIRCUIT), "forward", 32, "cpu", torch.float32,
                               measure=fake({"einsum": 2.0, "schedule": 1.0}))
        assert rp.route == "schedule" and rp.how == "measured"
        assert json.loads((cache / wisdom.FILE).read_text())["version"] == wisdom.VERSION


def test_read_only_wisdom_keeps_choices_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    with pytest.warns(RuntimeWarning, match="not writable"):
        rp = routes.choose(compile(CIRCUIT), "forward", 8, "cpu", torch.float32,
                           measure=fake({"einsum": 1.0, "schedule": 2.0}))
    assert rp.route == "einsum"
    again = routes.choose(compile(CIRCUIT), "forward", 8, "cpu", torch.float32,
                          measure=fake({"einsum": 9.0, "schedule": 1.0}))
    assert again.how == "wisdom" and again.route == "einsum"
    if os.geteuid() != 0:  # a directory without write permission (root writes anyway)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(ro))
        wisdom.forget()
        with pytest.warns(RuntimeWarning, match="not writable"):
            routes.choose(compile(CIRCUIT), "forward", 8, "cpu", torch.float32,
                          measure=fake({"einsum": 1.0, "schedule": 2.0}))
        assert not list(ro.iterdir())


def test_export_and_import_wisdom_as_text(cache):
    plan = compile(CIRCUIT)
    routes.choose(plan, "dense", None, "cpu", torch.float64,
                  measure=fake({"einsum": 3.0, "schedule": 2.0, "lightcone": 1.0}))
    text = wisdom.export_text()
    (cache / wisdom.FILE).unlink()
    wisdom.forget()
    assert wisdom.import_text(text) == 1
    wisdom.forget()  # from the file import wrote
    rp = routes.choose(plan, "dense", None, "cpu", torch.float64, measure=fake({}))
    assert rp.route == "lightcone" and rp.how == "wisdom"
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert wisdom.import_text("[1, 2]") == 0


def test_processes_starting_at_once_measure_once(cache):
    """Two processes choose at once: one measures under the lock, the other waits and reads it."""
    script = (
        "import torch, sys\n"
        "from qcircuit import Circuit\n"
        "from qcircuit.compiler import compile, routes\n"
        "rp = routes.choose(compile(Circuit(3, 2, 4, 2).all_pairs()), 'forward', 4, 'cpu',"
        " torch.float32)\n"
        "print(rp.how, rp.route)\n")
    # no C kernels: this is about the wisdom lock, not about building them in a fresh cache
    env = dict(os.environ, QCIRCUIT_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", QCIRCUIT_COMPILE="0")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(how for how, _ in outs) == ["measured", "wisdom"]
    assert len({route for _, route in outs}) == 1
    assert json.loads((cache / wisdom.FILE).read_text())["version"] == wisdom.VERSION
    env["QCIRCUIT_TUNE"] = "0"
    done = subprocess.run([sys.executable, "-c", script.replace("4, 'cpu'", "8, 'cpu'")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[0] == "model"


def test_a_24_gate_circuit_on_7_qudits_plans_in_under_2_seconds():
    c = Circuit(*[4] * 7)
    for q in itertools.islice(itertools.cycle(itertools.combinations(range(7), 2)), 24):
        c = c.gate(q)
    plan = compile(c)
    # once per process: load (or build, once per machine) the CPU kernels the planner prices
    routes.choose(compile(SMALL), "forward", 4, "cpu", torch.float32, tune=False)
    for kind, bucket in (("forward", 256), ("dense", None)):
        start = time.perf_counter()
        rp = routes.choose(plan, kind, bucket, "cpu", torch.float32, tune=False)
        assert time.perf_counter() - start < 2.0, rp.explain()


def test_bigger_circuits_plan_only_the_one_expression_and_say_so_once():
    c = Circuit(*[2] * 8).all_pairs()   # 28 gates
    plan = compile(c)
    with pytest.warns(RuntimeWarning, match="28 gates"):
        rp = routes.choose(plan, "forward", 4, "cpu", torch.float64)
    assert rp.route == "einsum" and rp.how == "only" and len(rp.candidates) == 1
    m = plan.module(seed=0, dtype=torch.float64)
    x = torch.randn(3, c.in_features, dtype=torch.float64)
    assert_close(m(x), x @ circuit_operator(c, m.gates).T)
    twelve = compile(Circuit(*[2] * 12).all_pairs()).module()  # 66 gates on 4096 features
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="66 gates"):
        twelve(torch.randn(64, 4096)).sum().backward()  # the first forward plans: bounded
    assert time.perf_counter() - start < 10.0


def test_huge_circuits_are_refused_fast_with_the_cap():
    start = time.perf_counter()
    with pytest.raises(QCError, match="MAX_QUDITS"):
        compile(Circuit(*([2] * 12 + [1] * 52)).all_pairs())   # qudits auto 64 on 4096
    with pytest.raises(QCError, match="MAX_GATES"):
        compile(Circuit(2, 2, 2).all_pairs().repeat(400))
    assert time.perf_counter() - start < 5.0
    with pytest.raises(QCError, match="MAX_MODULE_PARAMS"):
        compile(Circuit(4096, 4096).gate((0, 1))).module()
    plan = compile(Circuit(1 << 16, 1 << 16).gate(0).gate(1))
    with pytest.raises(QCError, match="MAX_DENSE_NUMEL"):
        routes.dense(plan, [torch.zeros(1, 1)] * 2)


def test_route_plans_are_plain_values_and_explain_names_the_winner():
    plan = compile(CIRCUIT)
    a = routes.choose(plan, "forward", 8, "cpu", torch.float32, tune=False)
    b = routes.choose(compile(CIRCUIT), "forward", 8, "cpu", torch.float32, tune=False)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.route = "einsum"
    text = plan.explain(5)
    assert "bucket 8 tokens" in text and "chosen:" in text and "einsum" in text


def test_a_first_forward_under_inference_mode_measures_and_runs():
    m = compile(Circuit(3, 2, 4, 3).all_pairs()).module(seed=0, dtype=torch.float64)
    x = torch.randn(6, 72, dtype=torch.float64)
    with torch.inference_mode():
        y, t = m(x), m.matrix()
    assert_close(y, x @ circuit_operator(m.plan.circuit, m.gates).T)
    assert_close(t, circuit_operator(m.plan.circuit, m.gates))


def test_off_the_cpu_the_cpu_cost_model_neither_prunes_nor_decides():
    """The cost model's constants are the CPU's: on another device every planned route is
    timed, and where none can be (too large, or tuning off) the device-neutral einsum runs."""
    plan = compile(Circuit(16, 8, 8, 4).all_pairs())
    routes._switches()   # as choose does: the CPU kernels' build is not search time
    found, _, alive = routes._search(plan, "forward", 16, "cuda", torch.float32)
    assert set(alive) == set(found) and {"einsum", "schedule"} <= set(alive)
    big = routes.choose(plan, "forward", 8192, "cuda", torch.float32, tune=True)
    assert (big.route, big.how) == ("einsum", "default")
    untuned = routes.choose(plan, "forward", 16, "cuda", torch.float32, tune=False)
    assert (untuned.route, untuned.how) == ("einsum", "default")
    on_cpu = routes.choose(plan, "forward", 8192, "cpu", torch.float32, tune=True)
    assert on_cpu.how == "model"
