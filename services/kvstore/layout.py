"""Where the KV store's bytes live: one shared-memory segment, described once.

    offset 0                  pool   [num_blocks, num_layers, 2 (K, V), block_size,
                                      num_kv_heads, head_dim] of the pool dtype
    generations_offset(..)    generations  int64 [num_blocks]

generations_offset is the pool's nbytes rounded up to 64. KVPoolInfo.handle names the
pool part only (offset 0); open_pool() derives the generations view from it. One block
holds every layer and head of its tokens, so one (handle, block id) names it and a reader
of any TP/PP shape can slice its own layers and heads.

The generation fence: the store bumps generations[b] each time it hands block b out
fresh. A reader that was promised (b, g) checks generations[b] == g before and after
copying (check_generations); a mismatch means the block was recycled under it, and the
copy is refused rather than used as somebody's KV.
"""
from __future__ import annotations

import torch

from shared.buffers import shm
from shared.buffers.handle import ITEMSIZE, BufferHandle, numel
from shared.protocol import KVPoolInfo

GENERATIONS_ALIGN = 64


class StaleBlockError(RuntimeError):
    """A block's generation moved: it was recycled, and its bytes are not ours."""


def pool_shape(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
               head_dim: int) -> list[int]:
    return [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]


def generations_offset(pool_nbytes: int) -> int:
    """Byte offset of the int64 generations array: after the pool, 64-aligned."""
    return -(-pool_nbytes // GENERATIONS_ALIGN) * GENERATIONS_ALIGN


def segment_nbytes(pool_nbytes: int, num_blocks: int) -> int:
    """Size of the whole segment: pool, padding, generations."""
    return generations_offset(pool_nbytes) + num_blocks * ITEMSIZE["int64"]


def generations_handle(pool: BufferHandle, num_blocks: int) -> BufferHandle:
    """The handle of the generations array that follows the pool `pool` names."""
    if pool.backend != "shm" or pool.offset != 0:
        raise ValueError(f"KV pool handle must be an shm region at offset 0, got "
                         f"backend {pool.backend!r} offset {pool.offset}")
    return BufferHandle(backend="shm", base=pool.base, offset=generations_offset(pool.nbytes),
                        nbytes=num_blocks * ITEMSIZE["int64"], dtype="int64", shape=[num_blocks])


class PoolSegment:
    """The segment a store creates: the pool tensor, the generations tensor, the
    KVPoolInfo that describes them. close() unlinks it (views elsewhere stay valid)."""

    def __init__(self, name: str, num_blocks: int, num_layers: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: str, epoch: int = 0):
        shape = pool_shape(num_blocks, num_layers, block_size, num_kv_heads, head_dim)
        pool_nbytes = numel(shape) * ITEMSIZE[dtype]
        self.nbytes = segment_nbytes(pool_nbytes, num_blocks)
        self.region = shm.ShmRegion.create(name, self.nbytes)
        self.pool = self.region.tensor(dtype, shape)
        self.generations = self.region.tensor("int64", [num_blocks], generations_offset(pool_nbytes))
        self.info = KVPoolInfo(handle=self.region.export(self.pool), num_blocks=num_blocks,
                               num_layers=num_layers, block_size=block_size,
                               num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                               epoch=epoch)

    @property
    def name(self) -> str:
        return self.region.name

    def close(self) -> None:
        if self.region.owner:
            self.region.unlink()
            self.region.close()


def open_pool(info: KVPoolInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, generations) views of the store's segment, zero-copy: the pool
    as [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] of
    info.dtype, generations as int64 [num_blocks]. ValueError when the handle
    does not match the announced shape or the segment is too small."""
    shape = pool_shape(info.num_blocks, info.num_layers, info.block_size,
                       info.num_kv_heads, info.head_dim)
    h = info.handle
    if h.shape != shape or h.dtype != info.dtype:
        raise ValueError(f"pool handle is {h.dtype} {h.shape}, KVPoolInfo announces {info.dtype} {shape}")
    gen = generations_handle(h, info.num_blocks)
    region = shm.ShmRegion.attach(h.base)
    need = segment_nbytes(h.nbytes, info.num_blocks)
    if region.nbytes < need:
        raise ValueError(f"shm {h.base!r} has {region.nbytes} bytes, the pool and its "
                         f"generations need {need}")
    return shm.open(h), shm.open(gen)


def check_generations(generations: torch.Tensor, block_ids: list[int], expected: list[int],
                      when: str = "") -> None:
    """The fence: StaleBlockError naming the first recycled blocks unless every block
    still carries the generation it was promised with."""
    if len(block_ids) != len(expected):
        raise ValueError(f"{len(block_ids)} block ids but {len(expected)} generations")
    if not block_ids:
        return
    now = generations[torch.tensor(block_ids, dtype=torch.int64)].tolist()
    if now != list(expected):
        bad = [(b, e, n) for b, e, n in zip(block_ids, expected, now) if e != n]
        raise StaleBlockError(f"KV blocks recycled {when} (block, expected generation, found): "
                              f"{bad[:4]}".replace("  ", " "))
