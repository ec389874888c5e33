"""KV cache storage the runner attends over: the worker's own paged cache, or the
KV-store's pool mapped into this process (prefill writes KV straight into store blocks)."""
from __future__ import annotations

import torch

from kernels.kv_pack import unpack_kv_ref, unpack_kv_triton
from shared.models.config import ModelConfig


class LocalKVCache:
    """[L, 2, num_blocks, block_size, Hkv, D]: each layer's K and V are contiguous."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device="cpu"):
        self.tensor = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads,
                                  cfg.head_dim, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[layer, 0], self.tensor[layer, 1]

    def load_from_store(self, pool: torch.Tensor, src_blocks: list[int],
                        dst_blocks: list[int]) -> None:
        """Copy whole store blocks ([N, L, 2, bs, H, D] layout) into our blocks: the
        unpack_kv kernel where both sides are on the GPU, its torch reference elsewhere
        (strided copies straight from the shared pages, one per run of adjacent blocks)."""
        if self.tensor.is_cuda and pool.is_cuda:
            unpack_kv_triton(pool, self.tensor, src_blocks, dst_blocks)
        else:
            unpack_kv_ref(pool, self.tensor, src_blocks, dst_blocks)


    def load_block(self, block: torch.Tensor, dst: int) -> None:
        """Copy one store block [L, 2, bs, H, D] (a frame received over tcp) into our block
        dst: one strided copy, across devices if need be."""
        self.tensor[:, :, dst].copy_(block)


class StoreKVCache:
    """The KV-store pool [num_blocks, L, 2, block_size, Hkv, D] used in place: one block
    holds every layer, so per-layer views are strided, which the torch attention handles."""

    def __init__(self, pool: torch.Tensor):
        self.tensor = pool
        self.num_blocks = pool.shape[0]
        self.block_size = pool.shape[3]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[:, layer, 0], self.tensor[:, layer, 1]
