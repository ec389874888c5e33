import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import random

import pytest
import torch

from duet_kernels.attention_decode import paged_decode_attention, paged_decode_attention_ref, paged_decode_attention_triton

from ._helpers import ATTN_TOL, cases, check_backend, dense_kv, naive_attention, paged_kv, poisoned, requires_cuda

GQA = [pytest.param(2, 2, id="gqa1"), pytest.param(6, 2, id="gqa3")]


def _ctx_lens(page):
    # on a page boundary, one past it, a padded slot, a single token, and a random one
    return [2 * page, 2 * page + 1, 0, 1, random.randint(1, 5 * page)]


def test_ref_matches_naive_softmax():
    page, Hq, Hkv, D = 4, 6, 2, 16
    ctx = _ctx_lens(page)
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, page, torch.float32, "cpu")
    q = torch.randn(len(ctx), Hq, D)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(ctx, dtype=torch.int32), 0.25)
    for b, c in enumerate(ctx):
        if c == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        want = naive_attention(q[b:b + 1], dense_kv(k_cache, tables[b], c), dense_kv(v_cache, tables[b], c), 0.25)
        torch.testing.assert_close(out[b].double(), want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref(device, dtype, Hq, Hkv):
    check_backend(device)
    page, D = 4, 32
    ctx = _ctx_lens(page)
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, page, dtype, device)
    q = torch.randn(len(ctx), Hq, D, dtype=dtype, device=device)
    lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, D ** -0.5)
    # default split choice, then forced splits over 16-token tiles: one split looping over
    # every tile, 3 splits (some empty), more splits than the longest context has tiles
    for splits, block_n in [(None, None), (1, 16), (3, 16), (64, 16)]:
        out = poisoned(q.shape, dtype, device)
        got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, D ** -0.5, out=out,
                                            num_splits=splits, block_n=block_n)
        assert got is out
        torch.testing.assert_close(got, want, **ATTN_TOL[dtype])
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # padded slot


@pytest.mark.parametrize("device,dtype", cases(cpu=(torch.float32,), cuda=(torch.bfloat16,)))
def test_dispatch_on_layer_view_of_whole_cache(device, dtype):
    """The engine passes cache[l, 0] / cache[l, 1] views of one [L, 2, N, bs, Hkv, D] tensor."""
    check_backend(device)
    page, Hq, Hkv, D = 4, 4, 2, 16
    ctx = [5, 12]
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, page, dtype, device)
    whole = torch.randn(3, 2, *k_cache.shape, dtype=dtype, device=device)
    whole[1, 0], whole[1, 1] = k_cache, v_cache
    q = torch.randn(2, Hq, D, dtype=dtype, device=device)
    lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    got = paged_decode_attention(q, whole[1, 0], whole[1, 1], tables, lens, 0.3)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.3)
    torch.testing.assert_close(got, want, **ATTN_TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (32, 8, 128)])
def test_model_shapes_cuda(Hq, Hkv, D):
    """SmolLM2- and Llama-8B-like heads, block 16, long ragged contexts, bf16."""
    check_backend("cuda")
    ctx = [1, 16, 17, 0, 1000, 4096, 333]
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, 16, torch.bfloat16, "cuda")
    q = torch.randn(len(ctx), Hq, D, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, D ** -0.5, out=poisoned(q.shape, q.dtype, "cuda"))
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, D ** -0.5)
    torch.testing.assert_close(got, want, **ATTN_TOL[torch.bfloat16])
