"""Paged decode attention: split-KV flash-decoding over a paged KV cache, GQA-grouped.

One query token per sequence. Stage 1 (`_decode_split_kernel`) gives each program one
(sequence, kv head, split): it loads that kv head's K/V pages once and serves all
Hq/Hkv query heads that share them, writing a normalised partial output plus its
log-sum-exp. Stage 2 (`_decode_reduce_kernel`) merges the splits. The split count
depends only on tensor shapes, never on context_lens values, so the launch is safe to
capture in a CUDA graph.

Splits take the context's BLOCK_N-token tiles interleaved (split s: tiles s, s + S,
s + 2S, ...), not as contiguous ranges. A graph sizes the split count for the longest
allowed context (the block table's width), so with contiguous ranges a short context
would land in the first one or two splits; interleaved, it spreads over min(S, tiles).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import dot_precision, next_pow2, num_sms, require_triton, tl, triton, use_triton

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_part_ptr, lse_ptr,
    scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    # Splits with no tile (incl. context_lens == 0) skip the loop and store lse=-inf.
    for t0 in range(split * BLOCK_N, ctx, num_splits * BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_mask = t < ctx
        # int64 so page * stride cannot overflow on large caches
        page = tl.load(bt_ptr + b * stride_btb + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        off = t % PAGE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        # issue the K and V loads together: decode is bound by how many bytes are in flight
        k = tl.load(k_ptr + (page * stride_kn + off * stride_kb + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (page * stride_vn + off * stride_vb + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))  # base-2 log-sum-exp
    tl.store(o_part_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], o,
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, lse_ptr, out_ptr, num_splits,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_mask, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # all splits empty (padded slot): weights become 0
    w = tl.exp2(lse - mx)
    o = tl.load(o_part_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q, k_cache, v_cache, block_tables, context_lens):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not match q head_dim {D}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} must be a multiple of num kv heads {Hkv}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the caches' {k_cache.dtype} / {v_cache.dtype}")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} "
                         f"must have batch {B}")


def _choose_splits(max_ctx: int, batch_heads: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, kv head). Shapes only (graph-safe): ~8 programs per SM so
    enough loads are in flight to saturate memory, at most _MAX_SPLITS, and no more than
    the longest context has tiles."""
    want = math.ceil(8 * num_sms(device) / max(batch_heads, 1))
    return max(1, min(_MAX_SPLITS, want, math.ceil(max(max_ctx, 1) / block_n)))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out=None,
                                  num_splits=None, block_n=None, num_warps=4, num_stages=2):
    """Triton path of `paged_decode_attention`; tuning knobs are for tests and benchmarks."""
    require_triton()
    _check(q, k_cache, v_cache, block_tables, context_lens)
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    block_n = block_n or (64 if D <= 128 else 32)
    max_ctx = block_tables.shape[1] * page
    splits = num_splits or _choose_splits(max_ctx, B * Hkv, block_n, q.device)
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    group = Hq // Hkv
    o_part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    d_pad = next_pow2(D, 16)  # tl.dot wants every dim >= 16
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse,
        scale * _LOG2E, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=next_pow2(group, 16), HEAD_DIM=D, D_PAD=d_pad,
        PAGE=page, BLOCK_N=block_n, DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_reduce_kernel[(B, Hq)](
        o_part, lse, out, splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, D_PAD=d_pad, S_PAD=next_pow2(splits),
        num_warps=4,
    )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out=None):
    """Torch reference (and the CPU path): gathers each sequence's pages, fp32 softmax attention."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    B, Hq, D = q.shape
    num_blocks, page, Hkv, _ = k_cache.shape
    max_ctx = int(context_lens.max()) if B else 0
    res = torch.zeros(B, Hq, D, device=q.device, dtype=torch.float32)
    if max_ctx > 0:
        nblk = -(-max_ctx // page)
        # unused table entries may hold anything (e.g. -1); clamp, they are masked below
        pages = block_tables[:, :nblk].long().clamp(0, num_blocks - 1)
        k = k_cache[pages].reshape(B, nblk * page, Hkv, D).transpose(1, 2).float()  # [B, Hkv, T, D]
        v = v_cache[pages].reshape(B, nblk * page, Hkv, D).transpose(1, 2).float()
        valid = torch.arange(nblk * page, device=q.device)[None, :] < context_lens[:, None].to(q.device)
        # the G query heads of a kv head play the role of a query length, so K/V are never repeated
        qg = q.float().reshape(B, Hkv, Hq // Hkv, D)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
        live = (context_lens > 0).to(q.device)[:, None, None]
        res = torch.where(live, o.reshape(B, Hq, D), res)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None):
    """Attention of one new token per sequence over its paged context.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (views of the per-layer
    cache are fine; head_dim contiguous); block_tables [B, max_blocks] int32 page ids;
    context_lens [B] int32 tokens of context including the new one, 0 = padded slot
    (its output is zeros and its block table row is never read). Query head h uses kv
    head h // (Hq // Hkv). Returns [B, Hq, D] in q.dtype, written into `out` if given.
    Triton on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    """
    if use_triton(q, k_cache, v_cache, block_tables, context_lens):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out)
