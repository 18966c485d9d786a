"""Shared fixtures: tiny random-weight models (LLaMA with non-square MLP, GPT-2 with Conv1D), seeds.

Tiny LLaMA (hidden 64, 2 layers, 4 heads, vocab 128): q/k/v/o_proj 64 -> 64,
gate_proj/up_proj 64 -> 172 (= 4·43), down_proj 172 -> 64, lm_head 64 -> 128.
Tiny GPT-2 (n_embd 64, 2 layers, 4 heads, vocab 128), all Conv1D (weight is (in, out)):
attn.c_attn 64 -> 192, attn.c_proj 64 -> 64, mlp.c_fc 64 -> 256, mlp.c_proj 256 -> 64.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# route wisdom and the CPU kernel library go to a fresh folder, not the user's cache
if "QCIRCUIT_CACHE_DIR" not in os.environ:
    os.environ["QCIRCUIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="qc-tests-")
    atexit.register(shutil.rmtree, os.environ["QCIRCUIT_CACHE_DIR"], ignore_errors=True)

import pytest
import torch

# Triton kernels run in its interpreter where no GPU is (test_triton.py): the variable must
# be set before anything imports triton (torch.compile may); the measured route choice
# offers the triton route on CUDA only, so no other test runs the interpreted kernels
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Tiny test models carry circuits near their layers' size on purpose: the warning is
    checked in test_oversize.py (pytest.warns records whatever this filter says). Added
    here, after the environment above is set: naming the category imports qcircuit."""
    config.addinivalue_line("filterwarnings",
                            "ignore::qcircuit.runtime.oversize.NearFullSizeWarning")


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same torch seed."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                       max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """A fresh tiny LlamaForCausalLM, random weights, float32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(tiny_llama_config).eval()


@pytest.fixture
def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                      bos_token_id=0, eos_token_id=0)


@pytest.fixture
def tiny_gpt2(tiny_gpt2_config):
    """A fresh tiny GPT2LMHeadModel (Conv1D layers), random weights, float32, eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(2)
    return GPT2LMHeadModel(tiny_gpt2_config).eval()


@pytest.fixture
def token_ids():
    """A small batch of token ids valid for both tiny models: shape (2, 7)."""
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def make_llama(tiny_llama_config):
    """A factory of identical tiny LLaMAs (the same seeded weights on every call)."""
    from transformers import LlamaForCausalLM

    def make():
        torch.manual_seed(1)
        return LlamaForCausalLM(tiny_llama_config).eval()
    return make


def pytest_terminal_summary(terminalreporter):
    """Why each docs block did not run (tests/test_docs.py), printed even without ``-rs``."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "test_docs.py::" in r.nodeid]
    if skipped:
        terminalreporter.section("docs blocks not run")
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.line(f"{report.nodeid.partition('[')[2][:-1]}: {reason}")
