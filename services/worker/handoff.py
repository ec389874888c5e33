"""The KV hand-off, both sides, in one home.

Prefill side, PrefillLease: one store round trip acquires a lease for the whole prompt
(its cached prefix pinned, fresh blocks for the rest); the engine writes the prompt's KV
straight into those store blocks; commit() indexes the full ones for prefix reuse; kv_ref()
is what PrefillDone carries to the gateway; release() when nobody will read them (token 1
ended the request, or the request was aborted before decode claimed it).

Decode side, DecodeClaim: claim the lease (it stops expiring), check the KVRef names this
store and the lease's own blocks, copy them into the local paged cache under the
generation fence (layout.check_generations before and after), release. A decode worker
that cannot map the pool (another host, --kv-transport tcp) reads the blocks from the
store as ZeroMQ frames instead (fetch_into).

Integrity: prefill hashes every block it wrote (layout.block_checksums) once its step is
done; the cached prefix's checksums come from the store, as their first writer committed
them. The KVRef carries one per block, and decode verifies them against the pool's bytes
before copying (every block, a sample of one, or none: --kv-verify). A mismatch raises
KVChecksumError naming the blocks: they are never decoded from.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from services.kvstore.layout import (KVChecksumError, StaleBlockError, block_checksums,
                                     check_generations, checksum_kind, verify_checksums)
from services.kvstore.port import KVStorePort
from services.kvstore.store import MAX_READ_BLOCKS
from shared import protocol as P
from shared.buffers import tcp
from shared.engine.block_manager import blocks_for

VERIFY_MODES = ("all", "sample", "off")   # which hand-off blocks a reader verifies


@dataclass
class PrefillLease:
    store: KVStorePort
    request_id: str
    lease_id: int
    block_ids: list[int]
    generations: list[int]
    cached_tokens: int          # leading tokens whose KV the store already had
    pool: str = ""              # the store pool (epoch) the blocks belong to
    cached_checksums: list[int] | None = None   # the store's, for the cached prefix blocks
    checksums: list[int] | None = None          # every block's, once hashed

    @classmethod
    def acquire(cls, store: KVStorePort, request_id: str, prompt_ids: list[int],
                holder: str) -> "PrefillLease":
        lease = store.acquire(request_id, prompt_ids, holder)
        return cls(store, request_id, lease.lease_id, list(lease.block_ids),
                   list(lease.generations), lease.num_cached_tokens, lease.pool,
                   list(lease.checksums))

    def verify_cached(self, pool: torch.Tensor, block_size: int, mode: str = "all") -> int:
        """Before computing on them: the cached prefix blocks still hash to what their
        writer committed (KVChecksumError naming the bad ones). How many were checked."""
        cached = self.cached_tokens // block_size
        sums = self.cached_checksums or []
        if mode == "off" or cached == 0 or len(sums) < cached:
            return 0
        pick = list(range(cached)) if mode == "all" else [random.randrange(cached)]
        verify_checksums(pool, [self.block_ids[i] for i in pick], [sums[i] for i in pick],
                         "in the cached prefix, before prefill")
        return len(pick)

    def hash_blocks(self, pool: torch.Tensor, num_tokens: int, block_size: int) -> None:
        """Checksums of the blocks holding num_tokens tokens: the cached ones as the store
        has them, the ones this prefill wrote hashed now (after its writes finished)."""
        n = blocks_for(num_tokens, block_size)
        cached = self.cached_tokens // block_size
        known = self.cached_checksums or []
        if len(known) < cached:   # the store lacks some (committed without one): hash all
            known, cached = [], 0
        self.checksums = known[:cached] + block_checksums(pool, self.block_ids[cached:n])

    def check(self, generations: torch.Tensor, when: str) -> None:
        """StaleBlockError if the store gave any of our blocks to someone else (the lease
        expired, or the gateway gave this worker up for dead): never write or commit then."""
        check_generations(generations, self.block_ids, self.generations, when)

    def commit(self, prompt_ids: list[int], written_ts: float = 0.0) -> None:
        if self.checksums is None:
            self.store.commit(self.request_id, self.lease_id, self.block_ids, prompt_ids,
                              written_ts=written_ts)
        else:   # the blocks that hold the prompt, each with its checksum
            n = len(self.checksums)
            self.store.commit(self.request_id, self.lease_id, self.block_ids[:n], prompt_ids,
                              self.checksums, written_ts)

    def release(self) -> None:
        self.store.release(self.request_id, self.lease_id)

    def kv_ref(self, pool: P.KVPoolInfo, num_tokens: int) -> P.KVRef:
        return P.KVRef(handle=pool.handle, block_ids=self.block_ids,
                       generations=self.generations, num_tokens=num_tokens,
                       checksums=list(self.checksums or []))


class DecodeClaim:
    """A claimed lease on the decode side. claim() raises StaleBlockError when the KVRef
    cannot be ours to read (another store's pool, blocks outside the lease)."""

    def __init__(self, store: KVStorePort, request_id: str, lease_id: int, src_blocks: list[int],
                 generations: list[int], checksums: list[int] | None = None,
                 verify: str = "all"):
        self.store, self.request_id, self.lease_id = store, request_id, lease_id
        self.src_blocks, self.generations = src_blocks, generations
        self.checksums, self.verify = checksums or [], verify

    @classmethod
    def claim(cls, store: KVStorePort, pool: P.KVPoolInfo, request_id: str, lease_id: int,
              kv: P.KVRef, holder: str, verify: str = "all") -> "DecodeClaim":
        if kv.handle.base != pool.handle.base:
            raise StaleBlockError(f"request {request_id}: KV blocks live in pool "
                                  f"{kv.handle.base!r}, this worker reads {pool.handle.base!r} "
                                  f"(a restarted store, or another mesh's)")
        n = blocks_for(kv.num_tokens, pool.block_size)
        lease = store.claim(request_id, lease_id, holder)
        sums = list(kv.checksums[:n]) if len(kv.checksums) >= n else []
        claim = cls(store, request_id, lease_id, list(kv.block_ids[:n]), list(kv.generations[:n]),
                    sums, verify)
        if list(lease.block_ids[:n]) != claim.src_blocks:
            claim.release()
            raise StaleBlockError(f"request {request_id}: KVRef blocks {claim.src_blocks[:4]}... "
                                  f"are not lease {lease_id}'s {list(lease.block_ids[:4])}...")
        return claim

    def copy_into(self, cache, pool: torch.Tensor, generations: torch.Tensor,
                  dst_blocks: list[int]) -> None:
        """Copy the claimed blocks into the local cache's dst_blocks, fenced, after
        verifying their checksums (KVChecksumError: nothing is copied)."""
        check_generations(generations, self.src_blocks, self.generations, "before the copy")
        self.verify_checksums(pool)
        cache.load_from_store(pool, self.src_blocks, dst_blocks)
        if pool.is_cuda:   # the copy is queued on the GPU: fence after it has run
            torch.cuda.current_stream(pool.device).synchronize()
        check_generations(generations, self.src_blocks, self.generations, "during the copy")

    def release(self) -> None:
        self.store.release(self.request_id, self.lease_id)

    def _picked(self) -> list[int]:
        """Indices of the blocks the verify mode checks."""
        if not self.checksums or self.verify == "off":
            return []
        if self.verify == "sample":
            return [random.randrange(len(self.src_blocks))]
        return list(range(len(self.src_blocks)))

    def verify_checksums(self, pool: torch.Tensor) -> int:
        """Verify the blocks the mode asks for; how many were checked."""
        pick = self._picked()
        if pick:
            verify_checksums(pool, [self.src_blocks[i] for i in pick],
                             [self.checksums[i] for i in pick], "at the decode claim")
        return len(pick)

    def fetch_into(self, cache, store: KVStorePort, info: P.KVPoolInfo,
                   dst_blocks: list[int]) -> None:
        """The tcp hand-off, for a reader that cannot map the pool (another host): read the
        claimed blocks from the store as ZeroMQ frames (sent from the pool's memory, received
        without copies), MAX_READ_BLOCKS at a time; check each batch's generations, verify
        the checksums, copy each block into the local cache."""
        shape = [info.num_layers, 2, info.block_size, info.num_kv_heads, info.head_dim]
        pick = set(self._picked())
        for start in range(0, len(self.src_blocks), MAX_READ_BLOCKS):
            ids = self.src_blocks[start:start + MAX_READ_BLOCKS]
            got = store.read(self.request_id, self.lease_id, ids)
            if list(got.generations) != self.generations[start:start + len(ids)]:
                raise StaleBlockError(f"KV blocks recycled before the read (block, expected, "
                                      f"found): {list(zip(ids, self.generations[start:], got.generations))[:4]}")
            blocks = [tcp.from_frame(f, info.dtype, shape) for f in got.frames]
            self._load_verified(cache, info, blocks, start, dst_blocks, pick, "the tcp read")

    def load_staged(self, cache, info: P.KVPoolInfo, staging: torch.Tensor,
                    dst_blocks: list[int]) -> None:
        """The layer-wise tcp hand-off's end: the claimed blocks, already fetched layer by
        layer into `staging` (the store's layout), verified and copied into the cache."""
        if staging.shape[0] != len(self.src_blocks):
            raise ValueError(f"{staging.shape[0]} staged blocks for a claim of "
                             f"{len(self.src_blocks)}")
        pick = set(self._picked())
        for start in range(0, len(self.src_blocks), MAX_READ_BLOCKS):
            blocks = list(staging[start:start + MAX_READ_BLOCKS])
            self._load_verified(cache, info, blocks, start, dst_blocks, pick,
                                "the layer-wise tcp read")

    def _load_verified(self, cache, info: P.KVPoolInfo, blocks: list[torch.Tensor], start: int,
                       dst_blocks: list[int], pick: set[int], when: str) -> None:
        """Blocks start.. of the claim, held here in the store's layout: the picked ones'
        checksums verified (KVChecksumError: none of them is loaded), then each copied
        into its local block (a TP/PP group: one broadcast to the ranks)."""
        kind = checksum_kind(info)
        for i, block in enumerate(blocks):
            j = start + i
            if j in pick:
                [have] = block_checksums(block.unsqueeze(0), [0], kind)
                if have != self.checksums[j]:
                    raise KVChecksumError(f"KV checksum mismatch after {when}: block "
                                          f"{self.src_blocks[j]} does not hold what its writer "
                                          f"committed", [self.src_blocks[j]])
        dst = dst_blocks[start:start + len(blocks)]
        if hasattr(cache, "load_blocks"):   # a TP/PP group: one broadcast to the ranks
            cache.load_blocks(torch.stack(blocks), dst)
        else:
            for block, d in zip(blocks, dst):
                cache.load_block(block, d)
