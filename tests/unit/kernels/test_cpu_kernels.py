"""The C++ CPU kernels against their torch references, on fresh random inputs."""
from __future__ import annotations

import os

import pytest
import torch

from duet_kernels import cpu_kernels as K

if os.environ.get("DUET_REQUIRE_CPU_KERNELS") == "1" and not K.available():
    raise RuntimeError(f"DUET_REQUIRE_CPU_KERNELS=1 but the CPU kernels did not build: {K._failed}")
pytestmark = pytest.mark.skipif(not K.available(), reason="no C++ toolchain to build the CPU kernels")
DTYPES = [torch.float32, torch.bfloat16]


def cache(num_blocks, bs, H, D, dtype, store_layout):
    """A layer's K and V views: the worker's own cache [L, 2, N, bs, H, D], or the KV
    store's pool [N, L, 2, bs, H, D] (strided per layer)."""
    if store_layout:
        pool = torch.randn(num_blocks, 3, 2, bs, H, D).to(dtype)
        return pool[:, 1, 0], pool[:, 1, 1]
    local = torch.randn(3, 2, num_blocks, bs, H, D).to(dtype)
    return local[1, 0], local[1, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (4, 4, 64), (4, 1, 32), (16, 1, 64)])
@pytest.mark.parametrize("store_layout", [False, True])
def test_paged_decode_matches_reference(dtype, Hq, Hkv, D, store_layout):
    torch.manual_seed(Hq * 7 + D)
    bs, B = 16, 5
    kc, vc = cache(80, bs, Hkv, D, dtype, store_layout)
    lens = torch.tensor([1, 15, 16, 17, 200])            # inside, at and across block ends
    tables = torch.zeros(B, 13, dtype=torch.int64)
    perm = torch.randperm(80)
    for b, n in enumerate(lens.tolist()):
        nb = -(-n // bs)
        tables[b, :nb] = perm[b * 16: b * 16 + nb]
    q = torch.randn(B, Hq, D).to(dtype)
    got = K.paged_decode(q, kc, vc, tables, lens, D ** -0.5)
    want = K.paged_decode_ref(q, kc, vc, tables, lens, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_paged_decode_is_independent_of_the_batch():
    """A sequence's output is bit-identical alone and in a batch of others."""
    kc, vc = cache(64, 16, 3, 64, torch.bfloat16, False)
    q = torch.randn(4, 9, 64)
    tables = torch.arange(64).view(4, 16)
    lens = torch.tensor([250, 31, 7, 100])
    batch = K.paged_decode(q, kc, vc, tables, lens, 0.125)
    for b in range(4):
        alone = K.paged_decode(q[b:b + 1], kc, vc, tables[b:b + 1], lens[b:b + 1], 0.125)
        assert torch.equal(alone[0], batch[b])


def test_paged_decode_names_bad_inputs():
    kc, vc = cache(8, 16, 3, 64, torch.float32, False)
    q = torch.randn(1, 9, 64)
    with pytest.raises(RuntimeError, match="has 40 tokens; its block table holds at most 32"):
        K.paged_decode(q, kc, vc, torch.zeros(1, 2, dtype=torch.int64), torch.tensor([40]), 1.0)
    with pytest.raises(RuntimeError, match="multiple of the cache's kv heads"):
        K.paged_decode(torch.randn(1, 8, 64), kc, vc, torch.zeros(1, 2, dtype=torch.int64),
                       torch.tensor([4]), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_match_their_references(dtype):
    m = K.load()
    torch.manual_seed(3)
    x, r, w = torch.randn(7, 576).to(dtype), torch.randn(7, 576).to(dtype), torch.randn(576).to(dtype)
    exact = dtype == torch.bfloat16      # fp32 differs by an ulp inside the mean and exp
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5))
    assert check(m.rms_norm(x, w, 1e-5), K.rms_norm_ref(x, w, 1e-5))
    out, res = m.add_rms_norm(x, r, w, 1e-5)
    want_out, want_res = K.add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(res, want_res) and check(out, want_out)
    gate_up = torch.randn(7, 2 * 1536).mul(4).to(dtype)
    assert check(m.silu_mul(gate_up), K.silu_mul_ref(gate_up))
    qkv = torch.randn(7, 960).to(dtype)
    q = qkv[:, :576].view(7, 9, 64)                  # a strided view, rotated in place
    cos, sin = torch.randn(7, 64), torch.randn(7, 64)
    want = K.rope_ref(q.clone(), cos, sin)
    untouched = qkv[:, 576:].clone()
    m.rope_(q, cos, sin)
    assert check(q, want) and torch.equal(qkv[:, 576:], untouched)


def test_silu_exp_is_accurate_over_the_range():
    m = K.load()
    x = torch.linspace(-80, 80, 100_001)   # activations live far inside this
    gate_up = torch.stack([x, torch.ones_like(x)], 1).contiguous()
    got, want = m.silu_mul(gate_up), K.silu_mul_ref(gate_up)
    assert ((got - want).abs() / want.abs().clamp_min(1e-30)).max() < 1e-6
    g = gate_up.to(torch.bfloat16)
    assert torch.equal(m.silu_mul(g), K.silu_mul_ref(g))
