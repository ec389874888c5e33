"""Paged attention in plain torch: the CPU path (CUDA uses duet_kernels/ via the runner).

One step's tokens are packed; sequences are grouped by kind so decode tokens (one query
each) are not padded to prefill chunk lengths:
  - decode group: duet_kernels/cpu/paged_decode.cpp reads each sequence's K/V straight from
    its cache blocks (fp32 softmax and sums, independent of the batch); its torch
    reference, where the kernel cannot be built, gathers the blocks and runs two matmuls.
  - prefill group: each sequence's K/V gathered through slot indices, one batched SDPA
    with a causal mask that knows the cached prefix (a lone uncached prompt skips the
    gather and runs causal SDPA on k, v directly).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from duet_kernels import cpu_kernels


@dataclass
class DecodeGroup:
    token_index: torch.Tensor   # [B] packed position of each sequence's one query token
    block_tables: torch.Tensor  # [B, max_blocks] cache blocks (0 when padded)
    ctx_lens: torch.Tensor      # [B] keys each sequence attends to


@dataclass
class PrefillGroup:
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
    decode: DecodeGroup | None
    prefill: PrefillGroup | None


def build_metadata(q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
                   block_size: int) -> AttnMetadata:
    """q_lens[b] new tokens for seq b whose context (cached + new) is ctx_lens[b] tokens."""
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int64)
    slot_block, slot_offset = [], []
    for ql, cl, bt in zip(q_lens, ctx_lens, block_tables):
        pos = np.arange(cl - ql, cl)
        slot_block.append(np.asarray(bt, dtype=np.int64)[pos // block_size])
        slot_offset.append(pos % block_size)
    decode = [b for b, ql in enumerate(q_lens) if ql == 1]
    prefill = [b for b, ql in enumerate(q_lens) if ql > 1]
    return AttnMetadata(
        torch.from_numpy(np.concatenate(slot_block)), torch.from_numpy(np.concatenate(slot_offset)),
        _decode_group(decode, starts, ctx_lens, block_tables, block_size) if decode else None,
        _prefill_group(prefill, starts, q_lens, ctx_lens, block_tables, block_size)
        if prefill else None)


def _decode_group(members, starts, ctx_lens, block_tables, block_size) -> DecodeGroup:
    B = len(members)
    nb = max(-(-ctx_lens[b] // block_size) for b in members)
    blocks = np.zeros((B, nb), dtype=np.int64)
    lens = np.empty(B, dtype=np.int64)
    for i, b in enumerate(members):
        n = -(-ctx_lens[b] // block_size)
        blocks[i, :n] = block_tables[b][:n]
        lens[i] = ctx_lens[b]
    return DecodeGroup(torch.from_numpy(starts[members]), torch.from_numpy(blocks),
                       torch.from_numpy(lens))


def _prefill_group(members, starts, q_lens, ctx_lens, block_tables, block_size) -> PrefillGroup:
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
        q_index[i, :ql] = torch.arange(int(starts[b]), int(starts[b]) + ql)
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
    return PrefillGroup(torch.cat(tokens), q_index, torch.cat(valid), kv_block, kv_offset, mask)


class TorchPagedAttention:
    """Callable handed to the model: writes this step's K/V, then attends over the cache.

    `kv_cache` is anything with `layer(l) -> (k, v)` views of shape
    [num_blocks, block_size, Hkv, D]; they may be strided (the KV-store's layout).
    """

    def __init__(self, kv_cache, meta: AttnMetadata, scale: float):
        self.kv_cache = kv_cache
        self.meta = meta
        self.scale = scale
        self.paged_decode = (cpu_kernels.paged_decode if cpu_kernels.available()
                             else cpu_kernels.paged_decode_ref)

    def __call__(self, layer: int, q, k, v):
        kc, vc = self.kv_cache.layer(layer)
        m = self.meta
        kc[m.slot_block, m.slot_offset] = k.to(kc.dtype)
        vc[m.slot_block, m.slot_offset] = v.to(vc.dtype)
        out = torch.empty_like(q)
        if m.decode is not None:
            out[m.decode.token_index] = self._decode(m.decode, q[m.decode.token_index], kc, vc)
        if m.prefill is not None:
            self._prefill(m.prefill, q, k, v, kc, vc, out)
        return out

    def decode_only_inputs(self, layers: list[int]):
        """(K caches, V caches, slot_block, slot_offset, block_tables, ctx_lens) of `layers`
        when every sequence of this step decodes one token (then token b is sequence b), the
        inputs of the fused decode stack (duet_kernels/cpu/decode_stack.cpp); else None."""
        m = self.meta
        if m.prefill is not None or m.decode is None:
            return None
        views = [self.kv_cache.layer(l) for l in layers]
        return ([k for k, _ in views], [v for _, v in views], m.slot_block, m.slot_offset,
                m.decode.block_tables, m.decode.ctx_lens)

    def _decode(self, g: DecodeGroup, q, kc, vc):
        return self.paged_decode(q, kc, vc, g.block_tables, g.ctx_lens, self.scale)

    def _prefill(self, g: PrefillGroup, q, k, v, kc, vc, out) -> None:
        # in fp32: torch's CPU flash attention is both faster there than in bf16 (1.1 vs
        # 1.7 ms for a 256-token prompt's layer, measured) and exact in its sums
        if g.mask is None:  # one whole prompt, nothing cached: attend to k, v directly
            t = g.token_index
            o = F.scaled_dot_product_attention(
                q[t].transpose(0, 1)[None].float(), k[t].transpose(0, 1)[None].float(),
                v[t].transpose(0, 1)[None].float(), is_causal=True, scale=self.scale,
                enable_gqa=True)
            out[t] = o[0].transpose(0, 1).to(q.dtype)
            return
        B, max_q = g.q_index.shape
        qg = q[g.q_index].transpose(1, 2).float()          # [B, Hq, max_q, D]
        kg = kc[g.kv_block, g.kv_offset].float().transpose(1, 2)  # [B, Hkv, max_ctx, D]
        vg = vc[g.kv_block, g.kv_offset].float().transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale,
                                           enable_gqa=True)
        o = o.transpose(1, 2).reshape(B * max_q, q.shape[1], q.shape[2])
        out[g.token_index] = o[g.q_valid].to(q.dtype)
