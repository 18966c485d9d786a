#!/usr/bin/env bash
# qcircuit on a CUDA machine, in one bounded run: environment, install, tests/test_cuda.py
# (with the triton route natively) and tests/test_triton.py, the triton route's plans and
# kernel resources, benchmarks/adapter_speed.py --device cuda --quick (float32 and bfloat16
# rows, the triton route), benchmarks/train_step.py --device cuda. Run from anywhere in the
# repo:
#
#     bash benchmarks/device_check.sh
#
# The machine has no network: nothing is fetched. Its own python3 must hold a CUDA torch
# (whose wheel brings Triton: the triton route needs it; without it those checks skip and
# the rows are left out) and, for the model checks, transformers; a package it lacks
# (lark) travels as a wheel in .whl/ at the repo root and is installed from there into
# /tmp/qc-site. qcircuit itself is installed editable from this tree (no index, no build
# isolation), or else put on the path through a folder of links. Each step has its own time
# limit (about 10 minutes in all at worst, when every step times out) and a failing
# step does not stop the next one. What it writes goes to $OUT (default ./out): env.txt,
# install.txt, test_triton.txt, test_cuda.txt, triton_plan.txt, bench.txt, adapter_speed_cuda.txt,
# train_step.log, train_step_cuda.txt, wisdom_cuda.json.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

step "environment"
{
    timeout 45 "$PY" -c 'import sys, torch
print(sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 20, "MiB",
          "tf32 matmul", torch.backends.cuda.matmul.allow_tf32)'
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    timeout 30 "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|pytorch-triton|transformers|peft|opt.einsum|lark|networkx|safetensors|numpy|pytest|pytest-timeout|setuptools|accelerate) "
    echo "cc: $(command -v cc || echo none); cpus: $(nproc)"
} 2>&1 | tee "$OUT/env.txt"

step "install (no network)"
{
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/qc-site .whl/*.whl && export PYTHONPATH=/tmp/qc-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
        echo "editable install failed: qcircuit through links in /tmp/qc-src"
        rm -rf /tmp/qc-src && mkdir -p /tmp/qc-src/qcircuit
        ln -s "$PWD"/qcircuit/* /tmp/qc-src/qcircuit/
        ln -s "$PWD/compiler" /tmp/qc-src/qcircuit/compiler
        ln -s "$PWD/runtime" /tmp/qc-src/qcircuit/runtime
        ln -s "$PWD/peft_method" /tmp/qc-src/qcircuit/peft
        export PYTHONPATH=/tmp/qc-src${PYTHONPATH:+:$PYTHONPATH}
    fi
    # -P: the repo root (whose qcircuit/ lacks the compiler) is not put on sys.path
    (cd /tmp && timeout 30 "$PY" -P -c 'import qcircuit, qcircuit.compiler, lark, opt_einsum, networkx
print("qcircuit from", qcircuit.__file__)
try:
    import qcircuit.runtime
    print("runtime: importable")
except ImportError as e:
    print("runtime: NOT importable, the model checks skip:", e)')
} > "$OUT/install.txt" 2>&1
INSTALL_RC=$?
cat "$OUT/install.txt"   # the group ran in this shell: its PYTHONPATH exports hold

step "tests: the triton route first (test_triton.py, test_cuda.py -k triton), then the rest of test_cuda.py"
FLAGS=(-q -rfEs --durations=15 -p no:cacheprovider)
"$PY" -c 'import pytest_timeout' 2>/dev/null && FLAGS+=(--timeout=120)
QCIRCUIT_CACHE_DIR=/tmp/qc-cache-tests timeout -k 10 90 "$PY" -P -m pytest "${FLAGS[@]}" \
    tests/test_triton.py tests/test_cuda.py -k triton 2>&1 | tee "$OUT/test_triton.txt"
TRITON_RC=${PIPESTATUS[0]}
QCIRCUIT_CACHE_DIR=/tmp/qc-cache-tests timeout -k 10 150 "$PY" -P -m pytest "${FLAGS[@]}" \
    tests/test_cuda.py -k "not triton" 2>&1 | tee "$OUT/test_cuda.txt"
TEST_RC=${PIPESTATUS[0]}

step "the triton route's plans and compiled kernels (paper circuit)"
timeout -k 5 40 "$PY" -P - <<'PYEOF' 2>&1 | tee "$OUT/triton_plan.txt"
import torch
from qcircuit import Circuit
from qcircuit.compiler import compile, triton_route
plan = compile(Circuit(16, 8, 8, 4).all_pairs())
print("triton", __import__("triton").__version__, "offered:", triton_route.offered_on("cuda"))
for dtype in (torch.bfloat16, torch.float32):
    for bucket in (16, 512, 8192):
        try:
            print(bucket, triton_route.search(plan, bucket, dtype, float("inf")).describe())
        except Exception as exc:   # a refusal is a result too
            print(bucket, dtype, "refused:", exc)
from qcircuit.compiler import triton_kernels as k
for kern in (k.pass_forward, k.pass_backward):
    for cache in getattr(kern, "device_caches", {}).values():
        for compiled in cache[0].values():
            print(kern.__name__, "shared", compiled.metadata.shared, "regs", compiled.n_regs,
                  "spills", compiled.n_spills, "warps", compiled.metadata.num_warps)
PYEOF

step "benchmarks/adapter_speed.py --device cuda --quick"
QCIRCUIT_CACHE_DIR=/tmp/qc-cache-bench timeout -k 10 140 "$PY" -P benchmarks/adapter_speed.py \
    --device cuda --quick --output "$OUT/adapter_speed_cuda.txt" 2>&1 | tee "$OUT/bench.txt"
BENCH_RC=${PIPESTATUS[0]}
cp /tmp/qc-cache-bench/wisdom.json "$OUT/wisdom_cuda.json" 2>/dev/null

step "benchmarks/train_step.py --device cuda"
QCIRCUIT_CACHE_DIR=/tmp/qc-cache-bench timeout -k 10 100 "$PY" -P benchmarks/train_step.py \
    --device cuda --timeout 30 --output "$OUT/train_step_cuda.txt" 2>&1 | tee "$OUT/train_step.log"
TRAIN_RC=${PIPESTATUS[0]}

step "done: install rc $INSTALL_RC, triton tests rc $TRITON_RC, cuda tests rc $TEST_RC, bench rc $BENCH_RC, train rc $TRAIN_RC (124: timed out)"
