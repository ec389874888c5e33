"""Rotary position embedding, NeoX / HF Llama "rotate_half" style, applied in place."""
from __future__ import annotations

from typing import Tuple

import torch

from ._dispatch import next_pow2, require_triton, tl, triton, use_triton


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, HEADS: tl.constexpr, H_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < HEADS) & (j < HALF)
    p1 = x_ptr + h * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, HQ, HQ_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, HK, HK_PAD, HALF, HALF_PAD)


def build_cos_sin_cache(head_dim: int, max_pos: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_pos, head_dim] table: first head_dim/2 columns cos(p * inv_freq), then sin, times attention_scaling.

    inv_freq [head_dim/2] already carries any llama3/linear/dynamic scaling (computed by
    the caller, as HF's rope init functions do); math is fp32 as in HF, then cast to dtype.
    """
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq {tuple(inv_freq.shape)} must be [head_dim/2 = {head_dim // 2}]")
    t = torch.arange(max_pos, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling).to(dtype)


def _check(positions, q, k, cos_sin_cache):
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or positions.shape != (T,) or D % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} "
                         f"must be [T, Hq, D], [T, Hkv, D], [T] with even D")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)} must be [max_pos, {D}]")


def rope_triton(positions, q, k, cos_sin_cache):
    """Triton path of `rope`."""
    require_triton()
    _check(positions, q, k, cos_sin_cache)
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if T == 0:
        return q, k
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dimension")
    _rope_kernel[(T,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HQ=Hq, HQ_PAD=next_pow2(Hq), HK=Hk, HK_PAD=next_pow2(Hk), HALF=D // 2, HALF_PAD=next_pow2(D // 2),
        num_warps=4 if Hq * D >= 2048 else 1,
    )
    return q, k


def rope_ref(positions, q, k, cos_sin_cache):
    """Torch reference (and the CPU path): HF apply_rotary_pos_emb in fp32, written back in place."""
    _check(positions, q, k, cos_sin_cache)
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        x.copy_(xf * cos + torch.cat([-x2, x1], dim=-1) * sin)
    return q, k


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
         cos_sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by positions [T] (int64); returns (q, k).

    cos_sin_cache [max_pos, D] from `build_cos_sin_cache`. Dimension i pairs with i + D/2
    (HF rotate_half); math in fp32, one rounding back to q/k's dtype.
    """
    if use_triton(positions, q, k, cos_sin_cache):
        return rope_triton(positions, q, k, cos_sin_cache)
    return rope_ref(positions, q, k, cos_sin_cache)
