"""pack_kv / unpack_kv: move KV blocks between the decode cache and the KV-store pool.

cache [L, 2, N, bs, Hkv, D] holds layers layer_start.. and kv heads head_start.. of the
store [M, Ls, 2, bs, Hs, D] (a TP/PP slice), so one kernel copies a strided 6-d block
region in either direction: one program per (block pair, layer, K-or-V).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ._dispatch import next_pow2, require_triton, tl, triton, use_triton

Blocks = Union[torch.Tensor, Sequence[int]]


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
    src_layer0, src_head0, dst_layer0, dst_head0,
    s_blk, s_lay, s_kv, s_tok, s_head,
    d_blk, d_lay, d_kv, d_tok, d_head,
    HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, ROWS: tl.constexpr,
):
    i = tl.program_id(0)
    # int64: layer * s_lay passes 2**31 elements on a large decode cache (e.g. 8B-shaped, >= 2k blocks)
    layer = (tl.program_id(1) // 2).to(tl.int64)
    kv = (tl.program_id(1) % 2).to(tl.int64)
    sb = tl.load(src_ids_ptr + i).to(tl.int64)
    db = tl.load(dst_ids_ptr + i).to(tl.int64)
    src = src_ptr + sb * s_blk + (layer + src_layer0) * s_lay + kv * s_kv + src_head0 * s_head
    dst = dst_ptr + db * d_blk + (layer + dst_layer0) * d_lay + kv * d_kv + dst_head0 * d_head
    d = tl.arange(0, D_PAD)[None, :]
    # rows enumerate (token, head) pairs of the block; ROWS of them per step
    for r0 in range(0, PAGE * H_PAD, ROWS):
        r = r0 + tl.arange(0, ROWS)[:, None]
        tok = r // H_PAD
        h = r % H_PAD
        mask = (tok < PAGE) & (h < HEADS) & (d < HEAD_DIM)
        x = tl.load(src + tok * s_tok + h * s_head + d, mask=mask)
        tl.store(dst + tok * d_tok + h * d_head + d, x.to(dst_ptr.dtype.element_ty), mask=mask)


def _ids(blocks: Blocks, device) -> torch.Tensor:
    if isinstance(blocks, torch.Tensor):
        return blocks.to(device=device, dtype=torch.int64)
    return torch.tensor(list(blocks), device=device, dtype=torch.int64)


def _check(cache, store, src, dst, layer_start, head_start):
    L, two, _, bs, H, D = cache.shape
    _, Ls, two_s, bs_s, Hs, D_s = store.shape
    if two != 2 or two_s != 2 or bs != bs_s or D != D_s:
        raise ValueError(f"cache {tuple(cache.shape)} [L,2,N,bs,Hkv,D] and store {tuple(store.shape)} "
                         f"[M,Ls,2,bs,Hs,D] disagree on block_size or head_dim")
    if not (0 <= layer_start and layer_start + L <= Ls and 0 <= head_start and head_start + H <= Hs):
        raise ValueError(f"layers {layer_start}..{layer_start + L - 1} / heads {head_start}..{head_start + H - 1} "
                         f"out of the store's range [0, {Ls}) / [0, {Hs})")
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src_blocks {tuple(src.shape)} and dst_blocks {tuple(dst.shape)} must be equal 1-d")


def _copy_triton(src_t, dst_t, src_ids, dst_ids, src_strides, dst_strides, src_off, dst_off, L, H):
    n = src_ids.numel()
    if n == 0 or L == 0:
        return
    bs, D = src_t.shape[3], src_t.shape[5]
    h_pad, d_pad = next_pow2(H), next_pow2(D)
    if src_t.stride(-1) != 1 or dst_t.stride(-1) != 1:
        raise ValueError("cache and store need a contiguous last (head_dim) dimension")
    _copy_blocks_kernel[(n, 2 * L)](
        src_t, dst_t, src_ids, dst_ids, *src_off, *dst_off, *src_strides, *dst_strides,
        HEADS=H, H_PAD=h_pad, HEAD_DIM=D, D_PAD=d_pad, PAGE=bs,
        ROWS=min(next_pow2(bs) * h_pad, max(1, 8192 // d_pad)), num_warps=4,
    )


def _cache_strides(c):  # (block, layer, kv, token, head) of [L, 2, N, bs, H, D]
    return c.stride(2), c.stride(0), c.stride(1), c.stride(3), c.stride(4)


def _store_strides(s):  # (block, layer, kv, token, head) of [M, Ls, 2, bs, H, D]
    return s.stride(0), s.stride(1), s.stride(2), s.stride(3), s.stride(4)


def pack_kv_triton(cache, store, src_blocks, dst_blocks, layer_start=0, head_start=0):
    """Triton path of `pack_kv`."""
    require_triton()
    src, dst = _ids(src_blocks, cache.device), _ids(dst_blocks, cache.device)
    _check(cache, store, src, dst, layer_start, head_start)
    _copy_triton(cache, store, src, dst, _cache_strides(cache), _store_strides(store),
                 (0, 0), (layer_start, head_start), cache.shape[0], cache.shape[4])


def unpack_kv_triton(store, cache, src_blocks, dst_blocks, layer_start=0, head_start=0):
    """Triton path of `unpack_kv`."""
    require_triton()
    src, dst = _ids(src_blocks, cache.device), _ids(dst_blocks, cache.device)
    _check(cache, store, src, dst, layer_start, head_start)
    _copy_triton(store, cache, src, dst, _store_strides(store), _cache_strides(cache),
                 (layer_start, head_start), (0, 0), cache.shape[0], cache.shape[4])


def _runs(src: torch.Tensor, dst: torch.Tensor):
    """(src start, dst start, length) of the maximal runs where both ids count up by one:
    blocks handed out together are usually adjacent, and one strided copy per run moves
    them at near-memcpy speed where a gather would stage every byte through a temporary."""
    s, d = src.tolist(), dst.tolist()
    i = 0
    while i < len(s):
        j = i + 1
        while j < len(s) and s[j] == s[j - 1] + 1 and d[j] == d[j - 1] + 1:
            j += 1
        yield s[i], d[i], j - i
        i = j


def pack_kv_ref(cache, store, src_blocks, dst_blocks, layer_start=0, head_start=0):
    """Torch reference (and the CPU path) of `pack_kv`."""
    src, dst = _ids(src_blocks, "cpu"), _ids(dst_blocks, "cpu")
    _check(cache, store, src, dst, layer_start, head_start)
    L, H = cache.shape[0], cache.shape[4]
    for s0, d0, n in _runs(src, dst):
        store[d0:d0 + n, layer_start:layer_start + L, :, :, head_start:head_start + H] = \
            cache[:, :, s0:s0 + n].permute(2, 0, 1, 3, 4, 5)     # [n, L, 2, bs, H, D]


def unpack_kv_ref(store, cache, src_blocks, dst_blocks, layer_start=0, head_start=0):
    """Torch reference (and the CPU path) of `unpack_kv`."""
    src, dst = _ids(src_blocks, "cpu"), _ids(dst_blocks, "cpu")
    _check(cache, store, src, dst, layer_start, head_start)
    L, H = cache.shape[0], cache.shape[4]
    for s0, d0, n in _runs(src, dst):
        cache[:, :, d0:d0 + n] = store[s0:s0 + n, layer_start:layer_start + L, :, :,
                                       head_start:head_start + H].permute(1, 2, 0, 3, 4, 5)


def pack_kv(cache, store, src_blocks: Blocks, dst_blocks: Blocks, layer_start: int = 0, head_start: int = 0):
    """Copy decode-cache blocks src_blocks[i] into store blocks dst_blocks[i], in place.

    cache [L, 2, N, bs, Hkv, D] holds store layers layer_start..layer_start+L-1 and kv
    heads head_start..head_start+Hkv-1; store [M, Ls, 2, bs, Hs, D]. Only that slice of
    each destination block is written. Block ids: int tensor or list, equal length.
    """
    if use_triton(cache, store):
        return pack_kv_triton(cache, store, src_blocks, dst_blocks, layer_start, head_start)
    return pack_kv_ref(cache, store, src_blocks, dst_blocks, layer_start, head_start)


def unpack_kv(store, cache, src_blocks: Blocks, dst_blocks: Blocks, layer_start: int = 0, head_start: int = 0):
    """Reverse of `pack_kv`: copy this reader's slice of store blocks src_blocks[i] into cache blocks dst_blocks[i]."""
    if use_triton(cache, store):
        return unpack_kv_triton(store, cache, src_blocks, dst_blocks, layer_start, head_start)
    return unpack_kv_ref(store, cache, src_blocks, dst_blocks, layer_start, head_start)
