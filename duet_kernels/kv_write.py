"""write_kv: scatter new tokens' K/V into the paged decode cache."""
from __future__ import annotations

from ._dispatch import next_pow2, require_triton, tl, triton, use_triton


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcn, stride_kcb, stride_kch,
    stride_vcn, stride_vcb, stride_vch,
    HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    page = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(kc_ptr + page * stride_kcn + off * stride_kcb + h * stride_kch + d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(vc_ptr + page * stride_vcn + off * stride_vcb + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping):
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be [T, Hkv, D] matching caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} [num_blocks, block_size, Hkv, D]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [T={k.shape[0]}]")


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """Triton path of `write_kv`."""
    require_triton()
    _check(k, v, k_cache, v_cache, slot_mapping)
    T, H, D = k.shape
    if T == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k, v and the caches need a contiguous last (head_dim) dimension")
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS=H, H_PAD=next_pow2(H), HEAD_DIM=D, D_PAD=next_pow2(D), PAGE=k_cache.shape[1],
        num_warps=4 if H * D >= 1024 else 1,
    )


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Torch reference (and the CPU path)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    page, off = slots // k_cache.shape[1], slots % k_cache.shape[1]
    k_cache[page, off] = k.to(k_cache.dtype)
    v_cache[page, off] = v.to(v_cache.dtype)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write token t's K/V ([T, Hkv, D] each) into slot slot_mapping[t] of the paged caches, in place.

    k_cache, v_cache [num_blocks, block_size, Hkv, D]; slot = block_id * block_size + offset
    (int64 [T]); slot -1 marks a padding token that is skipped. Returns None.
    """
    if use_triton(k, v, k_cache, v_cache, slot_mapping):
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
