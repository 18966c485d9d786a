"""The C permute kernel (compiler/kernels.py): the same bits as the ATen copy for every
pattern and element size, a schedule that uses it still exact with gradients, a cached build,
and a clean fallback when it cannot be built or does not apply."""
from __future__ import annotations

import ctypes
import itertools
import os
import shutil

import pytest
import torch

from qcircuit import Circuit
from qcircuit.compiler import kernels, schedule_exec
from qcircuit.compiler.schedule import build_schedule
from qcircuit.compiler.schedule_exec import Workspace, run_schedule
from reference import circuit_operator

HAVE_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_bits(shape, dtype, gen) -> torch.Tensor:
    """Random raw bit patterns viewed as ``dtype`` (NaN payloads, infinities, denormals)."""
    isz = torch.empty((), dtype=dtype).element_size()
    lo = -2 ** (8 * isz - 1)
    return torch.randint(lo, -lo - 1, shape, dtype=INTS[isz], generator=gen).view(dtype)


@pytest.fixture
def counted(monkeypatch):
    """The real kernel, with a count of its calls."""
    kernel = kernels._library()
    calls = []

    def spy(*args):
        calls.append(args)
        return kernel(*args) if kernel is not None else -1
    monkeypatch.setattr(kernels, "_library", lambda: spy)
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    return calls


def test_kernel_is_built_where_a_c_compiler_is():
    assert (kernels._library() is not None) == HAVE_COMPILER


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8])
def test_kernel_copies_every_pattern_bit_exactly(dtype, counted):
    """Every permutation keeping the outer axis of shapes whose inner axes are multiples of 4
    (the register-transpose path for 4-byte elements), of odd sizes (the gather path) and
    with kept innermost runs (moved as wide elements), on raw bit patterns."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 8, 4), (2, 8, 4, 16), (5, 3, 5, 2), (2, 4, 6, 2, 4), (1, 4, 8), (7, 1, 12, 4)]
    checked = 0
    for shape in shapes:
        for inner in itertools.permutations(range(1, len(shape))):
            perm = (0, *inner)
            src = random_bits(shape, dtype, gen)
            dst = torch.empty([shape[a] for a in perm], dtype=dtype)
            with torch.no_grad():
                kernels.permute_into(dst, src, perm)
            isz = src.element_size()
            assert torch.equal(dst.view(INTS[isz]), src.view(INTS[isz]).permute(perm)), (shape, perm)
            checked += kernels.in_slabs(shape, perm)
    assert len(counted) == checked > 30  # every copy within slabs went through the kernel


def test_kernel_splits_rows_over_threads_exactly(counted):
    src = torch.randn(4096, 8, 4, 2)  # above PARALLEL_NUMEL: the threaded loop
    dst = torch.empty(4096, 2, 8, 4)
    with torch.no_grad():
        kernels.permute_into(dst, src, (0, 3, 1, 2))
    assert torch.equal(dst, src.permute(0, 3, 1, 2)) and counted[-1][-1] == torch.get_num_threads()


def test_copies_the_kernel_does_not_take_stay_on_aten(counted, monkeypatch):
    src, dst = torch.randn(4, 3, 2), torch.empty(2, 4, 3)
    with torch.no_grad():
        kernels.permute_into(dst, src, (2, 0, 1))  # the outer axis moves
    assert torch.equal(dst, src.permute(2, 0, 1)) and not counted
    src, dst = torch.randn(4, 3, 2, requires_grad=True), torch.empty(4, 2, 3)
    kernels.permute_into(dst, src, (0, 2, 1))  # under autograd: a recorded copy
    assert dst.requires_grad and not counted
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    with torch.no_grad():
        kernels.permute_into(dst, src, (0, 2, 1))
        kernels.permute_into(torch.empty(0, 2, 3), torch.empty(0, 3, 2), (0, 2, 1))
    assert torch.equal(dst, src.permute(0, 2, 1)) and not counted
    assert not kernels.in_slabs((5, 4, 3), (0, 1, 2)) and kernels.in_slabs((5, 4, 3), (0, 2, 1))


def test_schedule_with_the_kernel_matches_reference_with_gradients(counted, monkeypatch):
    # the permutes as separate steps (fused with their gates, see test_fused.py)
    monkeypatch.setattr(schedule_exec, "fuse_gathers", lambda bound, x: bound)
    c = Circuit(4, 3, 2).gate((0, 2)).gate((1, 0), out=(2, 5)).gate((2, 1))
    sched = build_schedule(c, 6, fuse=False)
    assert any(s.kind == "permute" for s in sched.steps)
    gen = torch.Generator().manual_seed(0)
    gates = [torch.randn(g.shape, generator=gen, dtype=torch.float64, requires_grad=True)
             for g in c.gates]
    x = torch.randn(6, c.in_features, generator=gen, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, c.out_features, generator=gen, dtype=torch.float64)

    def step():
        y = run_schedule(sched, x, gates, Workspace())
        return [y.detach(), *torch.autograd.grad(y, [x, *gates], gy)]
    got = step()
    assert counted  # forward and backward permutes ran through the kernel
    want = x.detach() @ circuit_operator(c, gates).T
    assert (got[0] - want).abs().max() < 1e-12
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    for a, b in zip(got, step()):  # copies are exact: output and every gradient, bit for bit
        assert torch.equal(a, b)
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    assert torch.autograd.gradcheck(lambda x, *g: run_schedule(sched, x, g), (x, *gates))


@pytest.mark.skipif(not HAVE_COMPILER, reason="building needs a C compiler")
def test_build_falls_back_to_plainer_flags_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "FLAGS", (("-O3", "-fno-such-flag-at-all"), ("-O2",)))
    compiler = os.environ.get("CC") or "cc"
    built = kernels._build(compiler, tmp_path)
    stamp = built.stat().st_mtime_ns
    # no temporary left behind (the lock file that serialises builds stays)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, "build.lock"])
    assert kernels._build(compiler, tmp_path) == built and built.stat().st_mtime_ns == stamp  # reused
    assert ctypes.CDLL(str(built)).qc_permute  # the plain build loads and exports the kernel


def test_failed_build_falls_back_to_aten_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "enabled", lambda: True)  # about the build, not the switch
    monkeypatch.setenv("CC", shutil.which("false") or "false")  # a "compiler" that always fails
    kernels._library.cache_clear()
    kernels.shared_library.cache_clear()
    try:
        src, dst = torch.randn(3, 4, 5), torch.empty(3, 5, 4)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="ATen copy"):
            kernels.permute_into(dst, src, (0, 2, 1))
        assert torch.equal(dst, src.permute(0, 2, 1))
        with torch.no_grad():  # decided once: no second attempt, no second warning
            kernels.permute_into(dst, src + 1, (0, 2, 1))
        assert torch.equal(dst, (src + 1).permute(0, 2, 1))
        assert not [p for p in tmp_path.iterdir() if p.name != "build.lock"]
    finally:
        kernels._library.cache_clear()
        kernels.shared_library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_aten_copy_moves_kept_runs_as_wide_elements_bit_exactly(dtype, monkeypatch):
    """A permute whose innermost axis stays innermost (8 or 16 bytes) moves each run as one
    int64/complex128 element: every bit pattern, NaN payloads included, arrives unchanged."""
    monkeypatch.setattr(kernels, "enabled", lambda: False)
    cases = [((3, 5, 2, 8, 4), (0, 3, 2, 1, 4)), ((6, 4, 1, 2), (1, 0, 2, 3)),
             ((2, 3, 5, 2), (2, 1, 0, 3)), ((4, 6, 3), (1, 0, 2)), ((5, 7), (1, 0))]
    isz = torch.empty((), dtype=dtype).element_size()
    widened = 0
    gen = torch.Generator().manual_seed(1)
    for shape, perm in cases:
        src = random_bits(shape, dtype, gen)
        dst = torch.empty([shape[a] for a in perm], dtype=dtype)
        widened += kernels._wide_copy_plan(shape, perm, isz) is not None
        with torch.no_grad():
            kernels.permute_into(dst, src, perm)
        assert torch.equal(dst.view(INTS[isz]), src.view(INTS[isz]).permute(perm))
    assert widened == {4: 3, 2: 1, 8: 2}[isz]


def test_coalesce_merges_axes_that_move_together():
    assert kernels.coalesce((7, 16, 8, 8, 4), (0, 1, 3, 2, 4)) == ((112, 8, 8, 4), (0, 2, 1, 3))
    assert kernels.coalesce((7, 1, 8, 4), (1, 3, 0, 2)) == ((56, 4), (1, 0))
    assert kernels.coalesce((2, 3, 4), (0, 1, 2)) == ((24,), (0,))
    assert kernels.coalesce((1, 1), (1, 0)) == ((), ())


# ----------------------------------------------------------------------------- hostile cache
@pytest.fixture
def fresh_library():
    """Build and load the library again in this test; the process's copy again after."""
    kernels._library.cache_clear()
    kernels.shared_library.cache_clear()
    yield
    kernels._library.cache_clear()
    kernels.shared_library.cache_clear()


@pytest.mark.skipif(not HAVE_COMPILER, reason="building needs a C compiler")
def test_a_library_without_the_kernel_falls_back_with_one_warning(tmp_path, monkeypatch,
                                                                  fresh_library):
    """A library in the cache that lacks ``qc_permute`` (a stale or foreign file) once
    raised ``AttributeError`` in every forward; now: the ATen copy, one warning."""
    from qcircuit.compiler import cachefiles
    src = tmp_path / "empty.c"
    src.write_text("int qc_unrelated;\n")
    lib = tmp_path / "permute-foreign.so"
    compiler = os.environ.get("CC") or "cc"
    assert os.system(f"{compiler} -shared -fPIC -o {lib} {src}") == 0
    monkeypatch.setattr(kernels, "_build", lambda compiler, directory: lib)
    monkeypatch.setattr(kernels, "enabled", lambda: True)
    cachefiles.forget_warnings()
    src_t, dst = torch.randn(3, 4, 5), torch.empty(3, 5, 4)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="lacks qc_permute"):
        kernels.permute_into(dst, src_t, (0, 2, 1))
    assert torch.equal(dst, src_t.permute(0, 2, 1))


@pytest.mark.skipif(not HAVE_COMPILER, reason="building needs a C compiler")
@pytest.mark.parametrize("squatter", ["fifo", "zero-link"])
def test_a_non_file_at_the_library_name_is_built_over(tmp_path, squatter):
    """A FIFO (dlopen would block on it) or a link to ``/dev/zero`` where the build should
    be: not loaded, replaced by a fresh build."""
    compiler = os.environ.get("CC") or "cc"
    (tmp_path / "first").mkdir()
    name = kernels._build(compiler, tmp_path / "first").name
    other = tmp_path / "second"
    other.mkdir()
    if squatter == "fifo":
        os.mkfifo(other / name)
    else:
        os.symlink("/dev/zero", other / name)
    built = kernels._build(compiler, other)
    assert built == other / name and built.is_file() and not built.is_symlink()
    assert ctypes.CDLL(str(built)).qc_permute


@pytest.mark.skipif(not HAVE_COMPILER, reason="building needs a C compiler")
def test_an_unwritable_cache_leaves_no_temporary_directory(tmp_path, monkeypatch, fresh_library):
    import tempfile
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("QCIRCUIT_CACHE_DIR", str(blocker / "cache"))   # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert kernels.shared_library() is not None        # built in a scratch folder, loaded
    assert list(scratch.iterdir()) == []                # and the folder is gone
    src, dst = torch.randn(3, 4, 5), torch.empty(3, 5, 4)
    with torch.no_grad():
        kernels.permute_into(dst, src, (0, 2, 1))
    assert torch.equal(dst, src.permute(0, 2, 1))
