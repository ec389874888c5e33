"""Shared pieces of the kernel tests: device/dtype cases, tolerances, paged-cache builders.

CPU cases run the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by each
test module before triton is imported). CUDA cases are marked `gpu` and run the compiled
kernels; tools/gpu_check.sh runs them with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os

import pytest
import torch

from duet_kernels._dispatch import interpret_mode

HAS_CUDA = torch.cuda.is_available()

_CPU_MARKS = [pytest.mark.skipif(not interpret_mode(), reason="CPU cases need TRITON_INTERPRET=1")]
# gpu_check.sh sets DUET_REQUIRE_GPU=1 so that a broken CUDA setup fails instead of skipping
requires_cuda = pytest.mark.skipif(not HAS_CUDA and os.environ.get("DUET_REQUIRE_GPU") != "1",
                                   reason="needs CUDA")
_GPU_MARKS = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.skipif(interpret_mode(), reason="compiled kernels: run with TRITON_INTERPRET=0"),
]
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cases(cpu=(torch.float32, torch.float16), cuda=(torch.float32, torch.float16, torch.bfloat16)):
    """pytest params (device, dtype): interpreter on CPU (no bf16 there), compiled on CUDA."""
    out = [pytest.param("cpu", dt, id=f"cpu-{_NAMES[dt]}", marks=_CPU_MARKS) for dt in cpu]
    out += [pytest.param("cuda", dt, id=f"cuda-{_NAMES[dt]}", marks=_GPU_MARKS) for dt in cuda]
    return out


# attention: kernels cast softmax probabilities to the input dtype before the PV product
ATTN_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
            torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
# elementwise kernels: fp32 math, one rounding; allow a couple of ulps
ELEM_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def check_backend(device: str) -> None:
    """Fail loudly, with the fix, when CPU cases cannot run in the interpreter.

    Triton fixes interpreter-or-compiler when it is imported (its own tl.max etc. are
    built then), so TRITON_INTERPRET=1 must be set before anything imports triton; in a
    full-suite run something else (e.g. transformers' modeling_llama) may import it first.
    """
    import triton.language as tl

    from duet_kernels.activation import _silu_and_mul_kernel
    interpreted = all(type(f).__name__ == "InterpretedFunction" for f in (tl.max, _silu_and_mul_kernel))
    if device == "cpu" and not interpreted:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; put "
                    "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py "
                    "or run tests/unit/kernels on its own")


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element the kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def paged_kv(ctx_lens, num_kv_heads, head_dim, page, dtype, device, spare_blocks=3):
    """Random paged caches plus a block table for sequences of the given context lengths.

    Pages are a random permutation of the pool (so neighbours in a sequence are not
    neighbours in memory); unused table entries are -1, which kernels must never read.
    Returns k_cache, v_cache [N, page, Hkv, D], block_tables [B, max_blocks] int32.
    """
    need = [-(-c // page) for c in ctx_lens]
    max_blocks = max(need + [1]) + 1
    n = sum(need) + spare_blocks
    k_cache = torch.randn(n, page, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(n, page, num_kv_heads, head_dim, dtype=dtype, device=device)
    perm = torch.randperm(n).tolist()
    tables = torch.full((len(ctx_lens), max_blocks), -1, dtype=torch.int32)
    for b, k in enumerate(need):
        tables[b, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    return k_cache, v_cache, tables.to(device)


def dense_kv(cache, table, ctx_len):
    """One sequence's K or V [ctx_len, Hkv, D] gathered from the paged cache, the slow obvious way."""
    page = cache.shape[1]
    return torch.stack([cache[int(table[t // page]), t % page] for t in range(ctx_len)]) if ctx_len else \
        cache.new_zeros(0, *cache.shape[2:])


def naive_attention(q, k, v, scale, q_pos=None):
    """float64 softmax attention for one sequence: q [n, Hq, D], k/v [ctx, Hkv, D].

    q_pos [n] absolute positions for a causal mask (key j visible iff j <= q_pos); None = all visible.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(Hq // Hkv, dim=1)
    v = v.double().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("nhd,thd->hnt", q.double(), k) * scale
    if q_pos is not None:
        s = s.masked_fill(torch.arange(k.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hnt,thd->nhd", s.softmax(-1), v)
