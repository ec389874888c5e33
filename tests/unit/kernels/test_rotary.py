import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import pytest
import torch

from duet_kernels.rotary import build_cos_sin_cache, rope_ref, rope_triton

from ._helpers import ELEM_TOL, cases, check_backend


def _inv_freq(head_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref_in_place(device, dtype):
    check_backend(device)
    T, Hq, Hkv, D = 5, 6, 2, 32
    cache = build_cos_sin_cache(D, 64, _inv_freq(D).to(device), attention_scaling=1.1)
    pos = torch.tensor([0, 1, 17, 63, 5], device=device)
    q, k = torch.randn(T, Hq, D, dtype=dtype, device=device), torch.randn(T, Hkv, D, dtype=dtype, device=device)
    q_ref, k_ref = rope_ref(pos, q.clone(), k.clone(), cache)
    q_out, k_out = rope_triton(pos, q, k, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(q, q_ref, **ELEM_TOL[dtype])
    torch.testing.assert_close(k, k_ref, **ELEM_TOL[dtype])


def test_ref_matches_hf_llama3_rope():
    hf = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    D, Hq, Hkv, T = 16, 4, 2, 7
    config = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                         max_position_embeddings=256,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32})
    emb = hf.LlamaRotaryEmbedding(config)
    pos = torch.tensor([0, 3, 31, 32, 100, 200, 255])
    q, k = torch.randn(T, Hq, D), torch.randn(T, Hkv, D)
    cos, sin = emb(q, pos[None])
    # HF works on [B, H, T, D]
    want_q, want_k = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = build_cos_sin_cache(D, 256, emb.inv_freq, emb.attention_scaling)
    got_q, got_k = rope_ref(pos, q, k, cache)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
