"""Routes and their choice (compiler/routes.py, choice.py, tuning.py, wisdom.py): every route
exact and differentiable, the measured minimum wins (fake timer), wisdom empty / warm /
corrupted / read-only / shared by processes, bounded planning, caps, named routes."""
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
from qcircuit.compiler import Tuning, choice, compile, dispatch, routes, wisdom
from qcircuit.compiler import costmodel as cm
from qcircuit.compiler.tuning import switches

from reference import assert_close, circuit_operator

CIRCUIT = Circuit(3, 2, 4, 2).all_pairs()   # both forward routes and all three dense ones plan
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path):
    """A fresh cache directory."""
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def patient(monkeypatch):
    """A search budget no busy machine exhausts: these tests are about which route wins, not
    about the budget (``test_a_24_gate_circuit…`` checks that)."""
    monkeypatch.setattr(choice, "PLAN_BUDGET", 60.0)


def fake(times: dict[str, float], seen: list | None = None):
    """A timer that reports ``times`` and records which candidates it was asked to time."""
    def measure(thunks):
        if seen is not None:
            seen.append(sorted(thunks))
        return {n: times[n] for n in thunks}
    return measure


def shipped() -> cm.Machine:
    """A calibration that measures nothing: the decisions of these tests must not depend on
    what a real calibration measures on a busy machine."""
    return cm.SHIPPED


def decide(cache, kind, bucket, times, seen=None, *, plan=None, dtype=torch.float32, **kw):
    """The decision a fresh Tuning on ``cache`` makes with a fake timer."""
    tuning = Tuning(cache, timer=fake(times, seen), calibration=shipped, **kw)
    return tuning.decision(plan or compile(CIRCUIT), kind, bucket, CPU, dtype)


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
    names = [r.name for r in routes.routes_for(kind, "cpu") if r.name != "triton"]  # its own
    assert names == (["einsum", "schedule"] if kind == "forward"               # test file
                     else ["einsum", "schedule", "lightcone"])
    tuning = Tuning(None, measure=False)
    for name in names:
        d = tuning.named(plan, kind, name, 8 if kind == "forward" else None, CPU, torch.float64)
        assert d.route == name and d.how == "named"
        run = choice.build(plan, d)
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
    run = plan.executor(16, dtype=torch.float64, tuning=Tuning(None), route="einsum")
    for n in (16, 9, 1, 16):
        x = torch.randn(n, SMALL.in_features, dtype=torch.float64)
        assert_close(run(x, gates), x @ want.T)


@pytest.mark.parametrize("kind, times", [
    ("forward", {"einsum": 2.0, "schedule": 1.0}), ("forward", {"einsum": 1.0, "schedule": 2.0}),
    ("dense", {"einsum": 3.0, "schedule": 1.0, "lightcone": 2.0}),
    ("dense", {"einsum": 1.0, "schedule": 3.0, "lightcone": 2.0}),
    ("dense", {"einsum": 3.0, "schedule": 2.0, "lightcone": 1.0})])
def test_the_measured_minimum_wins_among_candidates_with_the_one_expression(
        cache, kind, times, monkeypatch):
    monkeypatch.setattr(choice, "PRUNE", float("inf"))  # time every candidate
    seen: list = []
    d = decide(cache, kind, 64 if kind == "forward" else None, times, seen)
    assert seen, d.explain()
    timed = seen[0]
    assert "einsum" in timed
    assert d.route == min(timed, key=times.__getitem__)
    measured = {c.route: c.measured for c in d.candidates}
    assert all(measured[n] == times[n] for n in timed)
    text = d.explain()
    assert f"chosen: {d.route} (measured)" in text and all(n in text for n in timed)


def test_pruning_never_drops_the_one_expression(cache, monkeypatch):
    monkeypatch.setattr(choice, "PRUNE", 0.0)  # everything but the one expression pruned
    d = decide(cache, "forward", 64, {"einsum": 1.0, "schedule": 0.5})
    assert d.route == "einsum" and d.how == "only"
    assert any("pruned" in c.note for c in d.candidates if c.route == "schedule")


def test_tune_off_is_the_model_choice_and_measures_nothing(cache):
    def never(thunks):
        raise AssertionError("measured")
    d = Tuning(cache, measure=False, timer=never).decision(compile(CIRCUIT), "forward", 64,
                                                           CPU, torch.float32)
    assert d.how == "model"
    predicted = {c.route: c.predicted for c in d.candidates if c.predicted is not None}
    assert d.route == min(predicted, key=predicted.__getitem__)


def test_wisdom_empty_then_warm_then_shared_by_a_fresh_process_view(cache):
    seen: list = []
    first = decide(cache, "forward", 16, {"einsum": 1.0, "schedule": 2.0}, seen)
    assert first.how == "measured" and first.route == "einsum" and len(seen) == 1
    entries = json.loads((cache / wisdom.FILE).read_text())["entries"]
    assert [e["route"] for e in entries.values()] == ["einsum"]
    # what another process sees: only the file
    again = decide(cache, "forward", 16, {"einsum": 9.0, "schedule": 1.0}, seen)
    assert again.how == "wisdom" and again.route == "einsum" and len(seen) == 1
    other = decide(cache, "forward", 16, {"einsum": 9.0, "schedule": 1.0}, seen,
                   dtype=torch.float64)  # another dtype: measured
    assert other.route == "schedule" and len(seen) == 2


def _fifo(path):
    os.mkfifo(path)


def _zero_link(path):
    os.symlink("/dev/zero", path)


@pytest.mark.parametrize("garbage", [
    "{not json", json.dumps({"version": 1, "entries": {"k": 5}}), "\xff\xfe", "[" * 100_000,
    json.dumps({"version": 1, "entries": "KEY"}), _fifo, _zero_link, " " * (9 << 20)])
def test_a_bad_wisdom_file_is_ignored_with_a_warning_and_replaced(cache, garbage):
    cache.mkdir(parents=True)
    path = cache / wisdom.FILE
    if callable(garbage):
        garbage(path)
    else:
        path.write_text(garbage)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="ignored|not usable"):
        d = decide(cache, "forward", 32, {"einsum": 2.0, "schedule": 1.0})
    assert time.monotonic() - start < 5.0
    assert d.route == "schedule" and d.how == "measured"
    assert json.loads(path.read_text())["version"] == wisdom.VERSION


@pytest.mark.parametrize("entry", [
    {"route": "schedule", "times": [1, 2]}, {"route": "schedule", "times": {"einsum": "fast"}},
    {"route": "schedule", "times": {"einsum": float("nan")}}, {"route": 7},
    {"route": "schedule", "extra": 1}, {"route": "x" * 100}])
def test_a_malformed_wisdom_entry_is_measured_again_never_raised_in_a_forward(cache, entry):
    """An entry of the right key but a bad shape (``"times": [1, 2]`` once raised
    ``AttributeError`` in every forward): ignored with one warning, measured again."""
    tuning = Tuning(cache, timer=fake({"einsum": 1.0, "schedule": 2.0}))
    plan = compile(CIRCUIT)
    key = tuning.disk_key(tuning.key(plan, "forward", 8, CPU, torch.float32))
    cache.mkdir(parents=True)
    (cache / wisdom.FILE).write_text(json.dumps({"version": 1, "entries": {key: entry}}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        m = plan.module(seed=0, tuning=tuning)
        y = m(torch.randn(8, CIRCUIT.in_features))
    assert y.shape == (8, CIRCUIT.in_features)
    assert tuning.decision(plan, "forward", 8, CPU, torch.float32).how == "measured"
    assert "einsum" in tuning.decision(plan, "forward", 8, CPU, torch.float32).explain()


def test_a_big_wisdom_file_is_read_once_per_change(cache, monkeypatch):
    from qcircuit.compiler import cachefiles
    reads = []
    real = cachefiles.read_bytes
    monkeypatch.setattr(cachefiles, "read_bytes", lambda *a, **k: reads.append(a) or real(*a, **k))
    tuning = Tuning(cache, timer=fake({"einsum": 1.0, "schedule": 2.0}))
    plan = compile(CIRCUIT)
    for bucket in (1, 2, 4, 8, 16):
        tuning.decision(plan, "forward", bucket, CPU, torch.float32)
    wisdom_reads = [a for a in reads if a[0].name == wisdom.FILE]
    assert len(wisdom_reads) <= 6   # once at the start, once after each write of its own


def test_read_only_wisdom_keeps_choices_in_memory(tmp_path):
    from qcircuit.compiler import cachefiles
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cachefiles.forget_warnings()
    tuning = Tuning(blocker / "cache", timer=fake({"einsum": 1.0, "schedule": 2.0}))
    with pytest.warns(RuntimeWarning, match="not writable"):
        d = tuning.decision(compile(CIRCUIT), "forward", 8, CPU, torch.float32)
    assert d.route == "einsum"
    tuning.timer = fake({"einsum": 9.0, "schedule": 1.0})
    tuning.forget()   # the store keeps what it measured in memory until forgotten
    assert tuning.wisdom.lookup(tuning.disk_key(tuning.key(compile(CIRCUIT), "forward", 8, CPU,
                                                           torch.float32))) is None
    if os.geteuid() != 0:  # a directory without write permission (root writes anyway)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cachefiles.forget_warnings()
        with pytest.warns(RuntimeWarning, match="not writable"):
            decide(ro, "forward", 8, {"einsum": 1.0, "schedule": 2.0})
        assert not list(ro.iterdir())


def test_export_and_import_wisdom_as_text(cache):
    d = decide(cache, "dense", None, {"einsum": 3.0, "schedule": 2.0, "lightcone": 1.0},
               dtype=torch.float64)
    assert d.route == "lightcone"
    text = Tuning(cache).wisdom.export_text()
    (cache / wisdom.FILE).unlink()
    assert Tuning(cache).wisdom.import_text(text) == 1
    again = decide(cache, "dense", None, {}, dtype=torch.float64)  # from the file import wrote
    assert again.route == "lightcone" and again.how == "wisdom"
    with pytest.warns(RuntimeWarning, match="not usable"):
        assert Tuning(cache).wisdom.import_text("[1, 2]") == 0


def test_processes_starting_at_once_measure_once(cache):
    """Two processes choose at once: one measures under the lock, the other waits and reads it."""
    script = (
        "import torch, sys\n"
        "from qcircuit import Circuit\n"
        "from qcircuit.compiler import compile, tuning\n"
        "d = compile(Circuit(3, 2, 4, 2).all_pairs()).decision(4)\n"
        "print(d.how, d.route)\n")
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
    done = subprocess.run([sys.executable, "-c", script.replace("decision(4)", "decision(8)")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[0] == "model"


def test_a_24_gate_circuit_on_7_qudits_plans_in_under_2_seconds(monkeypatch):
    monkeypatch.setattr(choice, "PLAN_BUDGET", 1.0)
    c = Circuit(*[4] * 7)
    for q in itertools.islice(itertools.cycle(itertools.combinations(range(7), 2)), 24):
        c = c.gate(q)
    plan = compile(c)
    tuning = Tuning(None, measure=False)
    # load (or build, once per machine) the CPU kernels the planner prices
    tuning.decision(compile(SMALL), "forward", 4, CPU, torch.float32)
    for kind, bucket in (("forward", 256), ("dense", None)):
        start = time.perf_counter()
        d = tuning.decision(plan, kind, bucket, CPU, torch.float32)
        assert time.perf_counter() - start < 2.0, d.explain()


def test_bigger_circuits_plan_only_the_one_expression_and_say_so_once():
    from qcircuit.compiler import cachefiles
    c = Circuit(*[2] * 8).all_pairs()   # 28 gates
    plan = compile(c)
    cachefiles.forget_warnings()
    tuning = Tuning(None)
    with pytest.warns(RuntimeWarning, match="28 gates"):
        d = tuning.decision(plan, "forward", 4, CPU, torch.float64)
    assert d.route == "einsum" and d.how == "only" and len(d.candidates) == 1
    m = plan.module(seed=0, dtype=torch.float64, tuning=tuning)
    x = torch.randn(3, c.in_features, dtype=torch.float64)
    assert_close(m(x), x @ circuit_operator(c, m.gates).T)
    twelve = compile(Circuit(*[2] * 12).all_pairs()).module(tuning=tuning)  # 66 gates, 4096
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="66 gates"):
        twelve(torch.randn(64, 4096)).sum().backward()  # the first forward plans: bounded
    assert time.perf_counter() - start < 10.0


def test_huge_circuits_are_refused_fast_with_the_cap():
    start = time.perf_counter()
    with pytest.raises(QCError, match="COMPILE_MAX_QUDITS"):
        compile(Circuit(*([2] * 12 + [1] * 52)).all_pairs())   # qudits auto 64 on 4096
    with pytest.raises(QCError, match="COMPILE_MAX_GATES"):
        compile(Circuit(2, 2, 2).all_pairs().repeat(400))
    assert time.perf_counter() - start < 5.0
    with pytest.raises(QCError, match="MODULE_MAX_PARAMS"):
        compile(Circuit(4096, 4096).gate((0, 1))).module()
    plan = compile(Circuit(1 << 16, 1 << 16).gate(0).gate(1))
    with pytest.raises(QCError, match="DENSE_MAX_NUMEL"):
        dispatch.dense(plan, [torch.zeros(1, 1)] * 2, Tuning(None))


def test_decisions_are_plain_values_and_explain_names_the_winner():
    plan = compile(CIRCUIT)
    a = Tuning(None, measure=False).decision(plan, "forward", 8, CPU, torch.float32)
    b = Tuning(None, measure=False).decision(compile(CIRCUIT), "forward", 8, CPU, torch.float32)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.route = "einsum"
    text = plan.explain(5, tuning=Tuning(None, measure=False))
    assert "bucket 8 tokens" in text and "chosen:" in text and "einsum" in text


def test_a_first_forward_under_inference_mode_measures_and_runs():
    m = compile(Circuit(3, 2, 4, 3).all_pairs()).module(seed=0, dtype=torch.float64,
                                                         tuning=Tuning(None))
    x = torch.randn(6, 72, dtype=torch.float64)
    with torch.inference_mode():
        y, t = m(x), m.matrix()
    assert_close(y, x @ circuit_operator(m.plan.circuit, m.gates).T)
    assert_close(t, circuit_operator(m.plan.circuit, m.gates))


def test_off_the_cpu_the_cpu_cost_model_neither_prunes_nor_decides(cache):
    """The cost model's constants are the CPU's: on another device every planned route is
    timed, and where none can be (too large, or tuning off) the device-neutral einsum runs."""
    plan = compile(Circuit(16, 8, 8, 4).all_pairs())
    switches()   # as a Tuning does first: the CPU kernels' build is not search time
    found, cands, alive = choice.search(plan, "forward", 16, "cuda", torch.float32,
                                        cm.SHIPPED)
    assert set(alive) == set(found) and {"einsum", "schedule"} <= set(alive)
    assert all(c.predicted is None for c in cands)
    cuda = torch.device("cuda")
    big = choice.decide(plan, "forward", 8192, cuda, torch.float32, machine=cm.SHIPPED, measure=True,
                        timer=fake({}), wisdom=wisdom.WisdomStore(None), key="k")
    assert (big.route, big.how) == ("einsum", "default")
    untuned = choice.decide(plan, "forward", 16, cuda, torch.float32, machine=cm.SHIPPED,
                            measure=False, timer=fake({}), wisdom=wisdom.WisdomStore(None),
                            key="k")
    assert (untuned.route, untuned.how) == ("einsum", "default")
    on_cpu = Tuning(cache).decision(plan, "forward", 8192, CPU, torch.float32)
    assert on_cpu.how == "model"


# ----------------------------------------------------------------------------- named routes
def test_a_module_runs_the_route_it_was_given():
    plan = compile(CIRCUIT)
    tuning = Tuning(None, timer=fake({"einsum": 1.0, "schedule": 2.0}))
    gates = gates_for(CIRCUIT)
    x = torch.randn(5, CIRCUIT.in_features, dtype=torch.float64)
    for name in ("einsum", "schedule"):
        m = plan.module(dtype=torch.float64, tuning=tuning, route=name)
        with torch.no_grad():
            for p, g in zip(m.gates, gates):
                p.copy_(g)
        assert_close(m(x), x @ circuit_operator(CIRCUIT, gates).T)
        assert f"route={name}" in repr(m)
    named = [d for d in tuning.decisions() if d.how == "named"]
    assert sorted(d.route for d in named) == ["einsum", "schedule"]
    assert not [d for d in tuning.decisions() if d.how == "measured"]   # nothing chosen


def test_a_route_that_cannot_run_is_refused_with_a_qcerror():
    plan = compile(CIRCUIT)
    with pytest.raises(QCError, match="no forward route 'warp'.*expected"):
        plan.module(route="warp")
    with pytest.raises(QCError, match="no forward route 'lightcone'"):
        plan.module(route="lightcone")           # a dense-only route
    too_many = compile(Circuit(*[2] * 8).all_pairs())
    with pytest.raises(QCError, match="no dense route 'lightcone' on meta"):
        Tuning(None).named(too_many, "dense", "lightcone", None, torch.device("meta"),
                           torch.float32)


def test_a_new_route_is_one_registration():
    plan = compile(SMALL)
    calls = []

    def build(lowered, steps):
        calls.append(steps)
        return lambda x2d, gates: x2d @ circuit_operator(SMALL, gates).T.to(x2d.dtype)

    route = routes.Route("dense-product", "forward", lambda d: d == "cpu",
                         search=lambda *a: "one matmul", predict=lambda *a: None, build=build,
                         offered_on=lambda d: False)
    routes.register(route)
    try:
        with pytest.raises(QCError, match="already registered"):
            routes.register(route)
        assert "dense-product" not in [r.name for r in routes.routes_for("forward", "cpu",
                                                                         offered=True)]
        m = plan.module(dtype=torch.float64, route="dense-product", tuning=Tuning(None))
        x = torch.randn(4, SMALL.in_features, dtype=torch.float64)
        assert_close(m(x), x @ circuit_operator(SMALL, m.gates).T)
        assert calls == ["one matmul"]
    finally:
        routes._registry.pop(("forward", "dense-product"))
