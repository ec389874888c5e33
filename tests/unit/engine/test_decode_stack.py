"""The fused decode stack (duet_kernels/cpu/decode_stack.cpp): every layer of a decode-only
step in one C++ call gives the layer-by-layer path's hidden states and K/V bit for bit."""
from __future__ import annotations

import pytest
import torch

from shared.config import EngineConfig
from shared.engine.attention import TorchPagedAttention, build_metadata
from shared.engine.engine import LLMEngine
from shared.engine.kv_cache import LocalKVCache
from shared.engine.sampling_params import SamplingParams
from shared.models.loader import load_model
from tests.conftest import assert_idle, save_tiny_model


def bf16_engine(path):
    return LLMEngine(load_model(path, "bfloat16"),
                     EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=64,
                                  block_size=16, max_num_batched_tokens=64), eos_token_ids=(2,))


@pytest.fixture(params=[False, True], ids=["no-bias", "qkv-bias"])
def tiny_engine(tmp_path, request):
    path, _ = save_tiny_model(tmp_path, seed=3, attention_bias=request.param,
                              head_dim=64, hidden_size=256, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=192, num_hidden_layers=3)
    if request.param:   # Qwen2's shape: q/k/v biases, none on o_proj
        from safetensors.torch import load_file, save_file
        f = path / "model.safetensors"
        save_file({k: v for k, v in load_file(f).items() if not k.endswith("o_proj.bias")}, f,
                  metadata={"format": "pt"})
    eng = bf16_engine(path)
    if eng.model.decode_stack() is None:
        pytest.skip("no fused decode stack here (needs AVX-512 BF16 or AVX2+FMA, and the C++ kernels)")
    assert (eng.model.layers[0].self_attn.qkv_proj.bias is not None) == request.param
    return eng


def forward(model, cache, ids, positions, ctx_lens, tables, fused: bool):
    model._stack = None if fused else False   # False: the layer-by-layer path
    meta = build_metadata([1] * len(ids), ctx_lens, tables, cache.block_size)
    attn = TorchPagedAttention(cache, meta, model.config.head_dim ** -0.5)
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.tensor(positions), attn)


def test_fused_decode_is_bit_identical_to_the_layer_loop(tiny_engine):
    model, cfg = tiny_engine.model, tiny_engine.model.config
    torch.manual_seed(0)
    caches = []
    for _ in range(2):
        c = LocalKVCache(cfg, 12, 16, torch.bfloat16)
        caches.append(c)
    caches[0].tensor.normal_()                    # earlier tokens' K/V, random
    caches[1].tensor.copy_(caches[0].tensor)
    ctx_lens = [1, 17, 40, 33]                    # 1: the first token of a sequence
    tables = [[5], [0, 7], [1, 2, 3], [9, 4, 11]]
    ids = [7, 100, 3, 42]
    positions = [n - 1 for n in ctx_lens]
    fused = forward(model, caches[0], ids, positions, ctx_lens, tables, fused=True)
    loop = forward(model, caches[1], ids, positions, ctx_lens, tables, fused=False)
    assert fused.dtype == torch.bfloat16 and fused.shape == (4, cfg.hidden_size)
    assert torch.equal(fused, loop)
    assert torch.equal(caches[0].tensor, caches[1].tensor)   # the new K/V written alike
    # and a sequence's result does not depend on the others beside it
    alone = forward(model, caches[1], ids[2:3], positions[2:3], ctx_lens[2:3], tables[2:3],
                    fused=True)
    assert torch.equal(alone[0], fused[2])


def test_fused_and_unfused_engines_generate_the_same_tokens(tiny_engine, monkeypatch):
    eng = tiny_engine
    prompts = [[1, 5, 9, 13], [1] + list(range(20, 60)), [1, 200, 3], [1, 2, 3, 4, 5, 6, 7, 8]]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    fused = eng.generate(prompts, sp)
    monkeypatch.setenv("DUET_FUSED_DECODE", "0")
    eng.model._stack = None
    assert eng.model.decode_stack() is None
    assert eng.generate(prompts, sp) == fused
    assert_idle(eng)


def test_the_stack_refuses_a_cache_of_another_shape(tiny_engine):
    model, cfg = tiny_engine.model, tiny_engine.model.config
    stack = model.decode_stack()
    x = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, cfg.head_dim)
    wrong = torch.zeros(4, 16, cfg.num_kv_heads + 1, cfg.head_dim, dtype=torch.bfloat16)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="layer 0's caches must be bf16"):
        stack.forward(x, None, cos, sin, [wrong] * 3, [wrong] * 3, one, one,
                      torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="3 layers, 2 caches"):
        stack.forward(x, None, cos, sin, [wrong] * 2, [wrong] * 2, one, one,
                      torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
    good = torch.zeros(4, 16, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"slot \(9, 0\) is outside the cache"):
        stack.forward(x, None, cos, sin, [good] * 3, [good] * 3, one + 9, one,
                      torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
