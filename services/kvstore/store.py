"""KVStore: the store's logic without sockets — the shared-memory segment and the KVPool
that decides which block holds what, answering typed requests with typed replies.

The service (service.py) is this behind a ROUTER; tests and tools use it in-process.
Both it and KVStoreClient satisfy KVStorePort, the interface workers are written against.
"""
from __future__ import annotations

import os
import random
import time
import uuid
from typing import Any, Callable

import msgspec
import torch

from services.kvstore.layout import PoolSegment, generations_handle
from services.kvstore.pool import KVPool, PoolError
from shared.protocol import KVBlocks, KVLease, KVLookupReply, KVPoolInfo, KVStatsReply

MAX_READ_BLOCKS = 32   # blocks per KVRead (a message carries at most 64 payload frames)
MAX_POLL_BLOCKS = 4096   # blocks a layer-wise KVRead may ask about (it still sends <= 32)


class KVStore:
    """One pool of `num_blocks` blocks for a model of this shape, in a fresh shm segment.
    Refusals raise PoolError (a KVStoreError) naming the bad value.

    Each KVStore is an epoch: a random number that names its segment and prefixes its
    lease ids, so a worker holding a lease or a handle from a store that died and came
    back is refused ('not_found', another pool) instead of touching someone else's blocks.
    Lease ids stay below 2**52, so JSON readers (the console) see them exactly."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, dtype: str, lease_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, device: str = "cpu"):
        self.epoch = random.randrange(1, 1 << 20)
        self.segment = PoolSegment(f"duet-kv-{os.getpid()}-{self.epoch:05x}-{uuid.uuid4().hex[:6]}",
                                   num_blocks, num_layers, block_size, num_kv_heads, head_dim,
                                   dtype, self.epoch, device)
        try:
            self.pool = KVPool(num_blocks, block_size, lease_ttl_s, clock,
                               generations=self.segment.generations,
                               first_lease_id=self.epoch << 32)
        except BaseException:
            self.segment.close()
            raise
        self.dtype = dtype

    @classmethod
    def for_model(cls, model_dir: str, num_blocks: int, block_size: int, dtype: str,
                  lease_ttl_s: float = 30.0, device: str = "cpu") -> "KVStore":
        """Sized from an HF-style model directory's config.json."""
        from shared.models.config import ModelConfig
        m = ModelConfig.from_dir(model_dir)
        return cls(num_blocks, block_size, m.num_layers, m.num_kv_heads, m.head_dim, dtype,
                   lease_ttl_s, device=device)

    @property
    def info(self) -> KVPoolInfo:
        return self.segment.info

    # -- the port ----------------------------------------------------------------------
    def pool_info(self) -> KVPoolInfo:
        return self.segment.info

    def acquire(self, request_id: str, token_ids: list[int], holder: str = "") -> KVLease:
        lease, blocks, gens, cached = self.pool.acquire(request_id, token_ids, holder)
        sums = self.pool.checksums_of(blocks[:cached // self.pool.block_size])
        return KVLease(request_id=request_id, lease_id=lease, block_ids=blocks,
                       generations=gens, num_cached_tokens=cached, pool=self.segment.name,
                       checksums=sums)

    def commit(self, request_id: str, lease_id: int, block_ids: list[int],
               token_ids: list[int], checksums: list[int] | None = None,
               written_ts: float = 0.0) -> None:
        self.pool.commit(lease_id, block_ids, token_ids, checksums, written_ts)

    def read(self, request_id: str, lease_id: int, block_ids: list[int],
             from_layers: list[int] | None = None) -> KVBlocks:
        """The lease's blocks as payload frames (KVBlocks.frames), for a reader that cannot
        map the pool: straight from the shm pages, or staged through host memory from a
        GPU pool. With from_layers (layer-wise, while prefill still writes): each block's
        layers from from_layers[i] to what its writer finished (KVPoolInfo.progress)."""
        if from_layers:
            return self._read_layers(request_id, lease_id, block_ids, from_layers)
        if len(block_ids) > MAX_READ_BLOCKS:
            raise PoolError("bad_request", f"{len(block_ids)} blocks in one read; at most "
                                           f"{MAX_READ_BLOCKS}")
        gens = self.pool.readable(lease_id, block_ids)
        reply = KVBlocks(request_id=request_id, block_ids=list(block_ids), generations=gens)
        reply.frames = self._frames([(b, 0, self.info.num_layers) for b in block_ids])
        return reply

    def _read_layers(self, request_id: str, lease_id: int, block_ids: list[int],
                     from_layers: list[int]) -> KVBlocks:
        """A poll of up to MAX_POLL_BLOCKS blocks, answered with the layers written since
        (frames for at most MAX_READ_BLOCKS blocks, in order; a block past that reports
        upto = from, so the reader asks again)."""
        L = self.info.num_layers
        if len(from_layers) != len(block_ids) or max(from_layers) > L:
            raise PoolError("bad_request", f"from_layers {from_layers[:8]} must give one layer "
                                           f"in [0, {L}] per block")
        if len(block_ids) > MAX_POLL_BLOCKS:
            raise PoolError("bad_request", f"{len(block_ids)} blocks in one layer-wise read; at "
                                           f"most {MAX_POLL_BLOCKS}")
        written = self.segment.progress[torch.tensor(block_ids, dtype=torch.int64)].tolist()
        upto, spans = [], []
        for b, f, w in zip(block_ids, from_layers, written):
            u = min(w, L) if len(spans) < MAX_READ_BLOCKS else f
            if u > f:
                spans.append((b, f, u))
            upto.append(max(u, f))
        gens = self.pool.readable(lease_id, block_ids, sum(1 for _, _, u in spans if u == L))
        self.pool.note_layers_read(lease_id, sum(u - f for _, f, u in spans),
                                   bool(spans) and spans[0][0] == block_ids[0] and spans[0][1] == 0)
        reply = KVBlocks(request_id=request_id, block_ids=list(block_ids), generations=gens,
                         upto_layers=upto)
        reply.frames = self._frames(spans)
        return reply

    def _frames(self, spans: list[tuple[int, int, int]]) -> list[memoryview]:
        """One frame per (block, first layer, end layer): those layers' bytes, contiguous in
        the layout, from the pool's own pages (a GPU pool's staged through host memory)."""
        pool = self.segment.pool
        if pool.is_cuda:
            parts = [pool[b, f:u].cpu() for b, f, u in spans]
        else:
            parts = [pool[b, f:u] for b, f, u in spans]
        return [memoryview(t.view(torch.uint8).numpy()) for t in parts]

    def evict(self, request_id: str, block_ids: list[int]) -> int:
        return self.pool.evict(block_ids)

    def claim(self, request_id: str, lease_id: int, holder: str = "") -> KVLease:
        blocks, gens = self.pool.claim(lease_id, holder)
        return KVLease(request_id=request_id, lease_id=lease_id, block_ids=blocks,
                       generations=gens, pool=self.segment.name)

    def release(self, request_id: str, lease_id: int) -> None:
        self.pool.release(lease_id)

    def renew(self, lease_ids: list[int]) -> None:
        self.pool.renew(lease_ids)

    # -- beyond the port: the gateway, debugging, tests, the console ----------------
    def drop_holder(self, holder: str) -> int:
        return self.pool.drop_holder(holder)

    def lookup(self, request_id: str, token_ids: list[int]) -> KVLookupReply:
        lease, blocks, gens, n = self.pool.lookup(request_id, token_ids)
        return KVLookupReply(request_id=request_id, lease_id=lease, block_ids=blocks,
                             generations=gens, num_tokens=n)

    def allocate(self, request_id: str, num_blocks: int, lease_id: int | None = None) -> KVLease:
        lease, blocks, gens = self.pool.allocate(request_id, num_blocks, lease_id)
        return KVLease(request_id=request_id, lease_id=lease, block_ids=blocks, generations=gens,
                       pool=self.segment.name)

    def stats(self) -> KVStatsReply:
        return KVStatsReply(**self.pool.stats())

    def status(self) -> dict[str, Any]:
        """Counts, the lease ledger, and the segment's handles (StatusReply data)."""
        gen = generations_handle(self.info.handle, self.info.num_blocks, self.info.generations)
        return {"epoch": self.epoch, "stats": self.pool.stats(), "idle": self.pool.idle(),
                "ledger": self.pool.ledger(), "handoffs": list(self.pool.handoffs),
                "dtype": self.dtype, "device": self.segment.device, "pool": msgspec.to_builtins(self.info.handle),
                "generations": msgspec.to_builtins(gen)}

    def expire(self) -> int:
        return self.pool.expire()

    def close(self) -> None:
        """Unlink the segment (views still open elsewhere stay valid until unmapped)."""
        self.segment.close()
