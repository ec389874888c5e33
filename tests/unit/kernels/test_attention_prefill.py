import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; gpu_check.sh sets 0

import random

import pytest
import torch

from duet_kernels.attention_prefill import prefill_attention, prefill_attention_ref, prefill_attention_triton

from ._helpers import ATTN_TOL, cases, check_backend, dense_kv, naive_attention, paged_kv, poisoned, requires_cuda

GQA = [pytest.param(2, 2, id="gqa1"), pytest.param(6, 2, id="gqa3")]


def _batch(page, device):
    """(context_lens, cu_seqlens_q): no prefix across pages, prefix + new tokens, padded seq,
    one new token after a page-aligned prefix, and a random split."""
    ctx = [2 * page + 1, 2 * page, 0, 3 * page + 1, random.randint(2, 6 * page)]
    new = [2 * page + 1, 3, 0, 1, random.randint(1, ctx[-1])]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    return ctx, torch.tensor(ctx, dtype=torch.int32, device=device), torch.tensor(cu, dtype=torch.int32, device=device)


def test_ref_matches_naive_causal_softmax():
    page, Hq, Hkv, D = 4, 6, 2, 16
    ctx, lens, cu = _batch(page, "cpu")
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, page, torch.float32, "cpu")
    q = torch.randn(int(cu[-1]), Hq, D)
    out = prefill_attention_ref(q, k_cache, v_cache, tables, cu, lens, 0.3)
    for b, c in enumerate(ctx):
        s, e = int(cu[b]), int(cu[b + 1])
        if s == e:
            continue
        want = naive_attention(q[s:e], dense_kv(k_cache, tables[b], c), dense_kv(v_cache, tables[b], c), 0.3,
                               q_pos=torch.arange(c - (e - s), c))
        torch.testing.assert_close(out[s:e].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("device,dtype", cases())
def test_triton_matches_ref(device, dtype, Hq, Hkv):
    check_backend(device)
    page, D = 4, 32
    ctx, lens, cu = _batch(page, device)
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, page, dtype, device)
    n = int(cu[-1])
    q = torch.randn(n + 2, Hq, D, dtype=dtype, device=device)  # 2 padding rows past cu[-1]
    want = prefill_attention_ref(q, k_cache, v_cache, tables, cu, lens, D ** -0.5)
    # default tiles, then 16x16 tiles so queries span several tiles and keys several pages
    for block_m, block_n in [(None, None), (16, 16)]:
        out = poisoned(q.shape, dtype, device)
        got = prefill_attention_triton(q, k_cache, v_cache, tables, cu, lens, D ** -0.5, out=out,
                                       block_m=block_m, block_n=block_n)
        assert got is out
        torch.testing.assert_close(got[:n], want[:n], **ATTN_TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (32, 8, 128)])
def test_model_shapes_cuda(Hq, Hkv, D):
    """Model-like heads, block 16, a long prompt with a cached prefix, bf16, via the dispatcher."""
    check_backend("cuda")
    ctx = [700, 16, 1, 300]  # new tokens: 200, 16, 1, 300
    cu = torch.tensor([0, 200, 216, 217, 517], dtype=torch.int32, device="cuda")
    k_cache, v_cache, tables = paged_kv(ctx, Hkv, D, 16, torch.bfloat16, "cuda")
    q = torch.randn(517, Hq, D, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    got = prefill_attention(q, k_cache, v_cache, tables, cu, lens, D ** -0.5)
    want = prefill_attention_ref(q, k_cache, v_cache, tables, cu, lens, D ** -0.5)
    torch.testing.assert_close(got, want, **ATTN_TOL[torch.bfloat16])
