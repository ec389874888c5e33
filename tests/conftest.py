"""Shared fixtures: the real SmolLM2 checkpoint and tiny random Llama models."""
from __future__ import annotations

import os

# Triton picks interpreter-or-compiler once, at first import (transformers imports it):
# on CPU-only CI the kernel tests need the interpreter. The engine never calls Triton on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from shared.config import EngineConfig
from shared.engine.engine import LLMEngine


@pytest.fixture(scope="session")
def smollm2_dir():
    from shared.models.hub import prepare_model
    return prepare_model("smollm2", quiet=True)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    eng = LLMEngine.from_config(EngineConfig(model=str(smollm2_dir), dtype="float32",
                                             num_kv_blocks=512, max_num_batched_tokens=512))
    yield eng
    assert_idle(eng)


def assert_idle(engine: LLMEngine) -> None:
    """Every block back in the pool, nothing running or waiting."""
    c = engine.idle_counts()
    assert c["free_blocks"] == c["total_blocks"], c
    assert c["running"] == 0 and c["waiting"] == 0, c
    assert not engine.requests


def tiny_hf_config(**over):
    from transformers import LlamaConfig
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(over)
    return LlamaConfig(**base)


def save_tiny_model(tmp_path, seed=0, **over):
    """A random HF Llama saved as safetensors; returns (dir, the HF model)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**over)).eval()
    with torch.no_grad():  # HF inits tiny weights; widen them so tokens are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True, scope="session")
def _cpu_kernels():
    """Build the C++ CPU kernels once, up front, so the processes a test starts load them."""
    from duet_kernels import cpu_kernels
    cpu_kernels.load()
