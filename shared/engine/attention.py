"""Paged attention in plain torch: the CPU path (CUDA uses kernels/ via the runner).

One step's tokens are packed; sequences are grouped by kind so decode tokens (one query
each) are not padded to prefill chunk lengths. Each group gathers its sequences' K/V from
the paged cache through precomputed slot indices and runs one batched SDPA with a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    token_index: torch.Tensor   # [n_valid] packed positions of this group's query tokens
    q_index: torch.Tensor       # [B, max_q] packed token index per padded query slot
    q_valid: torch.Tensor       # [B * max_q] flat indices of real (unpadded) query slots
    kv_block: torch.Tensor      # [B, max_ctx] cache block of each key position (0 when padded)
    kv_offset: torch.Tensor     # [B, max_ctx] offset inside that block
    mask: torch.Tensor | None   # [B, 1, max_q, max_ctx] bool, True = attend; None = causal dense


@dataclass
class AttnMetadata:
    slot_block: torch.Tensor    # [T] block each new token's K/V goes to
    slot_offset: torch.Tensor   # [T] offset inside that block
    groups: list[AttnGroup]


def build_metadata(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
                   block_size: int) -> AttnMetadata:
    """q_lens[b] new tokens for seq b whose context (cached + new) is ctx_lens[b] tokens."""
    starts, blocks, offsets, t = [], [], [], 0
    for ql, cl, bt in zip(q_lens, ctx_lens, block_tables):
        starts.append(t)
        t += ql
        pos = torch.arange(cl - ql, cl)
        blocks.append(torch.tensor(bt, dtype=torch.int64)[pos // block_size])
        offsets.append(pos % block_size)
    decode = [b for b, ql in enumerate(q_lens) if ql == 1]
    prefill = [b for b, ql in enumerate(q_lens) if ql > 1]
    groups = []
    for members in (decode, prefill):
        if members:
            groups.append(_group(members, starts, q_lens, ctx_lens, block_tables, block_size))
    return AttnMetadata(torch.cat(blocks), torch.cat(offsets), groups)


def _group(members, starts, q_lens, ctx_lens, block_tables, block_size) -> AttnGroup:
    B = len(members)
    max_q = max(q_lens[b] for b in members)
    max_ctx = max(ctx_lens[b] for b in members)
    q_index = torch.zeros(B, max_q, dtype=torch.int64)
    kv_block = torch.zeros(B, max_ctx, dtype=torch.int64)
    kv_offset = torch.zeros(B, max_ctx, dtype=torch.int64)
    valid, tokens = [], []
    dense = B == 1 and q_lens[members[0]] == ctx_lens[members[0]]
    mask = None if dense else torch.zeros(B, 1, max_q, max_ctx, dtype=torch.bool)
    for i, b in enumerate(members):
        ql, cl = q_lens[b], ctx_lens[b]
        q_index[i, :ql] = torch.arange(starts[b], starts[b] + ql)
        valid.append(torch.arange(i * max_q, i * max_q + ql))
        tokens.append(q_index[i, :ql])
        table = torch.tensor(block_tables[b], dtype=torch.int64)
        pos = torch.arange(cl)
        kv_block[i, :cl] = table[pos // block_size]
        kv_offset[i, :cl] = pos % block_size
        if mask is not None:
            # query j sits at position cl - ql + j and sees keys 0..that position
            qpos = torch.arange(cl - ql, cl)[:, None]
            mask[i, 0, :ql, :cl] = pos[None, :] <= qpos
    return AttnGroup(torch.cat(tokens), q_index, torch.cat(valid), kv_block, kv_offset, mask)


class TorchPagedAttention:
    """Callable handed to the model: writes this step's K/V, then attends over the cache.

    `kv_cache` is anything with `layer(l) -> (k, v)` views of shape
    [num_blocks, block_size, Hkv, D]; they may be strided (the KV-store's layout).
    """

    def __init__(self, kv_cache, meta: AttnMetadata, scale: float):
        self.kv_cache = kv_cache
        self.meta = meta
        self.scale = scale

    def __call__(self, layer: int, q, k, v):
        kc, vc = self.kv_cache.layer(layer)
        m = self.meta
        kc[m.slot_block, m.slot_offset] = k.to(kc.dtype)
        vc[m.slot_block, m.slot_offset] = v.to(vc.dtype)
        out = torch.empty_like(q)
        for g in self.meta.groups:
            if g.mask is None:  # one whole prompt, nothing cached: attend to k, v directly
                t = g.token_index
                o = F.scaled_dot_product_attention(
                    q[t].transpose(0, 1)[None], k[t].transpose(0, 1)[None],
                    v[t].transpose(0, 1)[None], is_causal=True, scale=self.scale,
                    enable_gqa=True)
                out[g.token_index] = o[0].transpose(0, 1)
                continue
            B, max_q = g.q_index.shape
            qg = q[g.q_index].transpose(1, 2)               # [B, Hq, max_q, D]
            kg = kc[g.kv_block, g.kv_offset].to(q.dtype).transpose(1, 2)  # [B, Hkv, max_ctx, D]
            vg = vc[g.kv_block, g.kv_offset].to(q.dtype).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale,
                                               enable_gqa=True)
            o = o.transpose(1, 2).reshape(B * max_q, q.shape[1], q.shape[2])
            out[g.token_index] = o[g.q_valid]
        return out
