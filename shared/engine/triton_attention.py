"""Paged attention through the Triton kernels in duet_kernels/: the CUDA path.

Same callable protocol as TorchPagedAttention: `(layer, q, k, v) -> out` writes this
step's K/V into the cache (`write_kv`), then attends. A decode-only step (one new token
per sequence) runs `paged_decode_attention`; any other step runs `prefill_attention`
over the packed tokens, where decode tokens are simply sequences of query length 1.

The metadata is a handful of small device tensors built once per step. The kernels
take the caches' strides, so the KV-store's strided per-layer views (StoreKVCache) work
as well as LocalKVCache's contiguous ones. On CPU the kernels run their torch references,
or the Triton interpreter under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from duet_kernels import paged_decode_attention, prefill_attention, write_kv


@dataclass
class TritonAttnMetadata:
    """One step's inputs to the kernels; the kernels' docstrings state each contract."""
    slot_mapping: torch.Tensor   # [T] int64 cache slot (block * block_size + offset); -1 = skip
    block_tables: torch.Tensor   # [B, W] int32; entries past a sequence's context are never read
    context_lens: torch.Tensor   # [B] int32 cached + new tokens; 0 = padded slot
    cu_seqlens_q: torch.Tensor   # [B + 1] int32 packed-row offsets of each sequence's queries
    max_seqlen_q: int
    decode_only: bool            # every sequence has exactly one new token


def token_slots(q_len: int, ctx_len: int, table: list[int], block_size: int) -> list[int]:
    """Cache slots of a sequence's q_len new tokens, the last of its ctx_len positions."""
    return [table[p // block_size] * block_size + p % block_size
            for p in range(ctx_len - q_len, ctx_len)]


def table_array(block_tables: list[list[int]], ctx_lens: list[int], block_size: int,
                width: int | None = None) -> np.ndarray:
    """[B, width] int32 block tables, each row cut to the blocks its context uses and
    zero-padded (kernels never read past a context). width defaults to the widest row."""
    need = [-(-c // block_size) for c in ctx_lens]
    out = np.zeros((len(need), width or max(need, default=1)), dtype=np.int32)
    for row, (table, n) in enumerate(zip(block_tables, need)):
        out[row, :n] = table[:n]
    return out


def build_triton_metadata(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
                          block_size: int, device) -> TritonAttnMetadata:
    """q_lens[b] new tokens for sequence b, whose context (cached + new) is ctx_lens[b]."""
    slots: list[int] = []
    for ql, cl, table in zip(q_lens, ctx_lens, block_tables):
        slots.extend(token_slots(ql, cl, table, block_size))
    cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(q_lens)
    dev = torch.device(device)
    return TritonAttnMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev),
        block_tables=torch.from_numpy(table_array(block_tables, ctx_lens, block_size)).to(dev),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(dev),
        cu_seqlens_q=torch.from_numpy(cu).to(dev),
        max_seqlen_q=max(q_lens),
        decode_only=all(ql == 1 for ql in q_lens),
    )


class TritonPagedAttention:
    """Callable handed to the model: writes this step's K/V, then attends over the cache.

    `kv_cache` is anything with `layer(l) -> (k, v)` views of shape
    [num_blocks, block_size, Hkv, D] with a contiguous last dimension (strided is fine).
    Issues no host synchronisation, so a decode step can be captured in a CUDA graph.
    """

    def __init__(self, kv_cache, meta: TritonAttnMetadata, scale: float):
        self.kv_cache = kv_cache
        self.meta = meta
        self.scale = scale

    def __call__(self, layer: int, q, k, v):
        # q: [T, Hq, D]; k, v: [T, Hkv, D] (v may be a strided view of the fused qkv)
        kc, vc = self.kv_cache.layer(layer)
        m = self.meta
        write_kv(k, v, kc, vc, m.slot_mapping)
        out = torch.empty_like(q)
        if m.decode_only:
            return paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens, self.scale,
                                          out=out)
        return prefill_attention(q, kc, vc, m.block_tables, m.cu_seqlens_q, m.context_lens,
                                 self.scale, out=out, max_seqlen_q=m.max_seqlen_q)
