"""Real multi-process training (torchrun, 2 ranks, gloo, CPU) against one process on the
whole batch: DDP, FSDP2 (fully_shard), FSDP1 (use_orig_params) and accelerate, freeze_one
and zero_last.
Each launch runs ``tests/dist_worker.py``; see its docstring."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker
from test_adapter import rel_err

WORKER = Path(dist_worker.__file__)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process reference runs, keyed by (init, dtype)."""
    torch.manual_seed(0)
    runs = {(init, torch.float32): dist_worker.run("single", init, torch.float32)
            for init in dist_worker.INITS}
    runs["freeze_one", torch.float64] = dist_worker.run("single", "freeze_one", torch.float64)
    return runs


def _launch(mode: str, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(WORKER), mode, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp1", "accelerate"])
def test_wrapped_training_equals_one_process(mode, single, tmp_path):
    _launch(mode, tmp_path)
    dtypes = [torch.float32] + ([torch.float64] if mode == "ddp" else [])
    for init in dist_worker.INITS:
        for dtype in dtypes:
            if (init, dtype) not in single:
                continue
            want = single[init, dtype]
            tag = f"{init}-{str(dtype)[6:]}"
            losses = json.loads((tmp_path / f"losses-{tag}.json").read_text())
            result = load_file(str(tmp_path / f"result-{tag}.safetensors"))
            tol = TOL[dtype]
            assert rel_err(torch.tensor(losses, dtype=torch.float64),
                           torch.tensor(want["losses"], dtype=torch.float64)) < tol, tag
            assert losses[-1] < losses[0]
            keys = sorted(want["grads"])   # one vector: zero_last's first gates get 0
            got = torch.cat([result[f"grad.{k}"].flatten() for k in keys])
            assert rel_err(got, torch.cat([want["grads"][k].flatten() for k in keys])) < tol
        # the checkpoint rank 0 wrote after training reloads into the trained model
        got = dist_worker.reload_logits(tmp_path / f"adapter-{init}-float32", torch.float32)
        result = load_file(str(tmp_path / f"result-{init}-float32.safetensors"))
        assert rel_err(got, result["logits"]) < 1e-5
        assert rel_err(result["merged"], result["logits"]) < 1e-5   # merge() on the wrapper
