"""The KV hand-off, both sides, in one home.

Prefill side, PrefillLease: one store round trip acquires a lease for the whole prompt
(its cached prefix pinned, fresh blocks for the rest); the engine writes the prompt's KV
straight into those store blocks; commit() indexes the full ones for prefix reuse; kv_ref()
is what PrefillDone carries to the gateway; release() when nobody will read them (token 1
ended the request, or the request was aborted before decode claimed it).

Decode side, DecodeClaim: claim the lease (it stops expiring), check the KVRef names this
store and the lease's own blocks, copy them into the local paged cache under the
generation fence (layout.check_generations before and after), release.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.kvstore.layout import StaleBlockError, check_generations
from services.kvstore.port import KVStorePort
from shared import protocol as P
from shared.engine.block_manager import blocks_for


@dataclass
class PrefillLease:
    store: KVStorePort
    request_id: str
    lease_id: int
    block_ids: list[int]
    generations: list[int]
    cached_tokens: int          # leading tokens whose KV the store already had
    pool: str = ""              # the store pool (epoch) the blocks belong to

    @classmethod
    def acquire(cls, store: KVStorePort, request_id: str, prompt_ids: list[int],
                holder: str) -> "PrefillLease":
        lease = store.acquire(request_id, prompt_ids, holder)
        return cls(store, request_id, lease.lease_id, list(lease.block_ids),
                   list(lease.generations), lease.num_cached_tokens, lease.pool)

    def check(self, generations: torch.Tensor, when: str) -> None:
        """StaleBlockError if the store gave any of our blocks to someone else (the lease
        expired, or the gateway gave this worker up for dead): never write or commit then."""
        check_generations(generations, self.block_ids, self.generations, when)

    def commit(self, prompt_ids: list[int]) -> None:
        self.store.commit(self.request_id, self.lease_id, self.block_ids, prompt_ids)

    def release(self) -> None:
        self.store.release(self.request_id, self.lease_id)

    def kv_ref(self, pool: P.KVPoolInfo, num_tokens: int) -> P.KVRef:
        return P.KVRef(handle=pool.handle, block_ids=self.block_ids,
                       generations=self.generations, num_tokens=num_tokens)


class DecodeClaim:
    """A claimed lease on the decode side. claim() raises StaleBlockError when the KVRef
    cannot be ours to read (another store's pool, blocks outside the lease)."""

    def __init__(self, store: KVStorePort, request_id: str, lease_id: int, src_blocks: list[int],
                 generations: list[int]):
        self.store, self.request_id, self.lease_id = store, request_id, lease_id
        self.src_blocks, self.generations = src_blocks, generations

    @classmethod
    def claim(cls, store: KVStorePort, pool: P.KVPoolInfo, request_id: str, lease_id: int,
              kv: P.KVRef, holder: str) -> "DecodeClaim":
        if kv.handle.base != pool.handle.base:
            raise StaleBlockError(f"request {request_id}: KV blocks live in pool "
                                  f"{kv.handle.base!r}, this worker reads {pool.handle.base!r} "
                                  f"(a restarted store, or another mesh's)")
        n = blocks_for(kv.num_tokens, pool.block_size)
        lease = store.claim(request_id, lease_id, holder)
        claim = cls(store, request_id, lease_id, list(kv.block_ids[:n]), list(kv.generations[:n]))
        if list(lease.block_ids[:n]) != claim.src_blocks:
            claim.release()
            raise StaleBlockError(f"request {request_id}: KVRef blocks {claim.src_blocks[:4]}... "
                                  f"are not lease {lease_id}'s {list(lease.block_ids[:4])}...")
        return claim

    def copy_into(self, cache, pool: torch.Tensor, generations: torch.Tensor,
                  dst_blocks: list[int]) -> None:
        """Copy the claimed blocks into the local cache's dst_blocks, fenced."""
        check_generations(generations, self.src_blocks, self.generations, "before the copy")
        cache.load_from_store(pool, self.src_blocks, dst_blocks)
        check_generations(generations, self.src_blocks, self.generations, "during the copy")

    def release(self) -> None:
        self.store.release(self.request_id, self.lease_id)
