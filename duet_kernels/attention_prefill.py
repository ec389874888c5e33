"""Prefill attention: causal flash attention of packed new tokens over a paged cache.

Sequence b's queries are the last n_b = cu[b+1] - cu[b] positions of its context of
length context_lens[b]; the first context_lens[b] - n_b positions are a cached prefix.
Both prefix and new tokens' K/V are read from the paged cache (already written).
One program per (query tile, sequence, query head); tiles past a sequence's end exit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import dot_precision, next_pow2, require_triton, tl, triton, use_triton

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_ptr, ctx_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_ot, stride_oh,
    stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len
    kvh = h // GROUP

    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    i_mask = i < q_len
    d_mask = d < HEAD_DIM
    q_pos = prefix + i  # absolute position of each query row
    rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # keys beyond the tile's last query position are causally invisible to the whole tile
    end = tl.minimum(ctx, prefix + (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_mask = t < end
        page = tl.load(bt_ptr + b * stride_btb + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        off = t % PAGE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + (page * stride_kn + off * stride_kb + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
        s = tl.where((t[None, :] <= q_pos[:, None]) & t_mask[None, :], s, float("-inf"))
        # the first tile holds key 0, visible to every row, so m is finite from then on
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (page * stride_vn + off * stride_vb + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=i_mask[:, None] & d_mask[None, :])


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    B = context_lens.shape[0]
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != D:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not match q head_dim {D}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} must be a multiple of num kv heads {Hkv}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the caches' {k_cache.dtype} / {v_cache.dtype}")
    if cu_seqlens_q.shape != (B + 1,) or block_tables.shape[0] != B:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} must be [B+1] and block_tables "
                         f"{tuple(block_tables.shape)} [B, max_blocks] for B={B} sequences")


def prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                             out=None, max_seqlen_q=None, block_m=None, block_n=None, num_warps=4, num_stages=2):
    """Triton path of `prefill_attention`; tile sizes are exposed for tests and benchmarks."""
    require_triton()
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    T, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    B = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    block_m = block_m or (64 if D <= 128 else 32)
    block_n = block_n or (64 if D <= 128 else 32)
    # T bounds every sequence's length without reading cu_seqlens_q on the host (graph-safe)
    max_len = T if max_seqlen_q is None else max_seqlen_q
    grid = (triton.cdiv(max_len, block_m), B, Hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=Hq // Hkv, HEAD_DIM=D, D_PAD=next_pow2(D, 16),
        PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                          out=None, max_seqlen_q=None):
    """Torch reference (and the CPU path): one fp32 SDPA call per sequence with an offset causal mask."""
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    T, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    res = out if out is not None else torch.empty_like(q)
    for b, (s, e, ctx) in enumerate(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                        context_lens.tolist())):
        n = e - s
        if n == 0:
            continue
        pages = block_tables[b, : -(-ctx // page)].long()
        k = k_cache[pages].reshape(-1, Hkv, D)[:ctx].transpose(0, 1).float()  # [Hkv, ctx, D]
        v = v_cache[pages].reshape(-1, Hkv, D)[:ctx].transpose(0, 1).float()
        # fold the G query heads of each kv head into the query-length dim: [Hkv, G*n, D]
        qb = q[s:e].float().reshape(n, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * n, D)
        pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask.repeat(G, 1), scale=scale)
        res[s:e] = o.reshape(Hkv, G, n, D).permute(2, 0, 1, 3).reshape(n, Hq, D).to(res.dtype)
    return res


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                      out=None, max_seqlen_q=None):
    """Causal attention for packed prefill tokens, with a cached prefix, over a paged KV cache.

    q [T, Hq, D] packed; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32 [B+1]),
    which are the last positions of its context of length context_lens[b] (int32 [B]).
    k_cache, v_cache [num_blocks, block_size, Hkv, D] must already hold K/V for all
    context_lens[b] positions; block_tables [B, max_blocks] int32. Query head h uses kv
    head h // (Hq // Hkv). Returns [T, Hq, D] in q.dtype (into `out` if given); rows past
    cu_seqlens_q[-1] (padding) are left unwritten. max_seqlen_q, if known, trims the grid.
    """
    if use_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
        return prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                        out, max_seqlen_q)
    return prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                 out, max_seqlen_q)
