"""KV cache storage the runner attends over: the worker's own paged cache, or the
KV-store's pool mapped into this process (prefill writes KV straight into store blocks)."""
from __future__ import annotations

import torch

from duet_kernels.kv_pack import unpack_kv_ref, unpack_kv_triton
from shared.models.config import ModelConfig


class LocalKVCache:
    """[L, 2, num_blocks, block_size, Hkv, D]: each layer's K and V are contiguous.

    A rank of a TP/PP group caches only its layers (from layer_offset) and its KV heads
    (from head_offset): `cfg` then gives its local counts."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device="cpu",
                 num_layers: int | None = None, layer_offset: int = 0, head_offset: int = 0):
        self.tensor = torch.zeros(num_layers or cfg.num_layers, 2, num_blocks, block_size,
                                  cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layer_offset, self.head_offset = layer_offset, head_offset

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer -= self.layer_offset
        return self.tensor[layer, 0], self.tensor[layer, 1]

    def load_from_store(self, pool: torch.Tensor, src_blocks: list[int],
                        dst_blocks: list[int]) -> None:
        """Copy whole store blocks ([N, L, 2, bs, H, D] layout) into our blocks: the
        unpack_kv kernel where both sides are on the GPU, its torch reference elsewhere
        (strided copies straight from the shared pages, one per run of adjacent blocks)."""
        at = (self.layer_offset, self.head_offset)
        if self.tensor.is_cuda and pool.is_cuda:
            unpack_kv_triton(pool, self.tensor, src_blocks, dst_blocks, *at)
        else:
            unpack_kv_ref(pool, self.tensor, src_blocks, dst_blocks, *at)


    def load_block(self, block: torch.Tensor, dst: int) -> None:
        """Copy one store block [L, 2, bs, H, D] (a frame received over tcp) into our block
        dst: one strided copy, across devices if need be."""
        L, H = self.tensor.shape[0], self.tensor.shape[4]
        self.tensor[:, :, dst].copy_(block[self.layer_offset:self.layer_offset + L, :, :,
                                           self.head_offset:self.head_offset + H])


class StoreKVCache:
    """The KV-store pool [num_blocks, L, 2, block_size, Hkv, D] used in place: one block
    holds every layer, so per-layer views are strided, which the torch attention handles."""

    def __init__(self, pool: torch.Tensor, heads: tuple[int, int] | None = None):
        """heads: the [start, end) of the KV heads a TP rank writes and reads (all: None)."""
        self.tensor = pool
        self.num_blocks = pool.shape[0]
        self.block_size = pool.shape[3]
        self.heads = heads or (0, pool.shape[4])

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = self.heads
        return self.tensor[:, layer, 0, :, h0:h1], self.tensor[:, layer, 1, :, h0:h1]
