"""The KV-store's block pool: ref counts, prefix index, LRU free queue, leases.

Pure bookkeeping, no sockets and no KV bytes: the service owns the shared
memory and this class decides which block ids hold what.

Every block is in exactly one state:
  free    ref 0, no cached content            (handed out first)
  cached  ref 0, indexed under a chained hash (findable; evicted LRU-first)
  leased  ref > 0, pinned by one or more leases (may also be indexed)
so free + cached + leased == total, and the pool is idle when leased == 0 and
no lease is live.

A lease is what a request holds: blocks pinned by lookup() (prefix hits) and
allocate() (fresh blocks), in request order; acquire() does both at once, as
prefill does for each prompt. Prefill creates it; decode
claim()s it; release() returns its blocks. Every use (allocate, commit, claim)
and renew() touches a lease; one untouched for lease_ttl_s is released by
expire(), claimed or not: its holder died (a prefill worker renews the leases of
prompts still queued; decode releases right after its copy), so nothing leaks.

generations[b] is bumped each time block b is handed out fresh, so a reader
holding (block id, generation) compares it before and after copying and never
mistakes a recycled block for its own. The array may be a view into shared
memory (the service passes one) so that readers in other processes see bumps.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from services.kvstore.port import KVStoreError
from shared.engine.block_hash import chain_hash

log = logging.getLogger(__name__)


MAX_TOKEN_ID = 2**31 - 1
HANDOFF = "hand-off"   # the holder of a committed lease nobody has claimed yet


class PoolError(KVStoreError):
    """A request the pool refuses. code: 'no_blocks' | 'not_found' | 'bad_request'
    (the ErrorReply codes); the message names the bad value."""


@dataclass
class Lease:
    lease_id: int
    request_id: str
    created: float
    blocks: list[int] = field(default_factory=list)
    claimed: bool = False
    touched: float = 0.0
    holder: str = ""            # the worker that acquired or last claimed it
    # its hand-off's timeline (wall clock, time.time()), for the ledger: tcp reads of
    # its layers, when its writer wrote the last of them, when it was committed
    first_read_ts: float = 0.0      # its first block's layer 0 first sent over the wire
    written_ts: float = 0.0
    committed_ts: float = 0.0
    layers_read: int = 0            # (block, layer) slices sent over the wire
    layers_read_early: int = 0      # of them, before the commit

    def __post_init__(self):
        self.touched = self.touched or self.created


class KVPool:
    """Block ids, prefix cache and leases of one pool of `num_blocks` blocks."""

    def __init__(self, num_blocks: int, block_size: int, lease_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 generations: torch.Tensor | None = None, first_lease_id: int = 1):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s={lease_ttl_s} must be > 0")
        if generations is None:
            generations = torch.zeros(num_blocks, dtype=torch.int64)
        if generations.dtype != torch.int64 or list(generations.shape) != [num_blocks]:
            raise ValueError(f"generations must be int64 [{num_blocks}], got "
                             f"{generations.dtype} {list(generations.shape)}")
        self.num_blocks, self.block_size, self.lease_ttl_s = num_blocks, block_size, lease_ttl_s
        self._clock = clock
        self.generations = generations              # exposed: may live in shared memory
        self._gen = generations.numpy()             # same memory; fast scalar access
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._sums: list[int | None] = [None] * num_blocks   # indexed blocks' checksums
        self._index: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached_free = 0  # blocks in _free that hold indexed content
        self._leases: dict[int, Lease] = {}
        self._next_lease = first_lease_id   # a store's epoch picks its own range
        self.expired_leases = self.lookup_tokens = self.hit_tokens = 0
        self.read_blocks = self.evicted_blocks = 0
        self.handoffs: deque[dict] = deque(maxlen=64)   # the last read leases' timelines

    # ---------------------------------------------------------------- queries

    @property
    def num_available(self) -> int:
        """Blocks allocate() can hand out now: free plus evictable cached ones."""
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids of the longest run of indexed blocks matching the leading
        tokens, at most (len - 1) // block_size so one token is left to compute.
        A hash hit counts only if the stored tokens are equal. Pure."""
        bs, hits, parent = self.block_size, [], None
        for b in range((len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[b * bs:(b + 1) * bs])
            parent = chain_hash(parent, chunk)
            bid = self._index.get(parent)
            if bid is None or self._tokens[bid] != chunk:
                break  # a miss, or a hash collision caught by the token check
            hits.append(bid)
        return hits

    # ---------------------------------------------------------------- mutations

    def lookup(self, request_id: str, token_ids: list[int]) -> tuple[int | None, list[int], list[int], int]:
        """(lease_id, block_ids, generations, num_tokens) of the cached prefix of
        token_ids, pinned under a NEW lease; (None, [], [], 0) on no hit."""
        _check_tokens(token_ids)
        hits = self.cached_prefix(token_ids)
        self.lookup_tokens += len(token_ids)
        if not hits:
            return None, [], [], 0
        lease = self._new_lease(request_id)
        for bid in hits:
            self._pin(bid)
        lease.blocks.extend(hits)
        num_tokens = len(hits) * self.block_size
        self.hit_tokens += num_tokens
        return lease.lease_id, hits, self._generations_of(hits), num_tokens

    def fresh_needed(self, token_ids: list[int], hits: list[int]) -> int:
        """Fresh blocks token_ids need beyond the cached `hits`."""
        return -(-len(token_ids) // self.block_size) - len(hits)

    def can_acquire(self, token_ids: list[int], hits: list[int]) -> bool:
        """Room for acquire(): pinning an unpinned hit takes it out of the available ones."""
        revived = sum(1 for b in hits if self._ref[b] == 0)
        return self.fresh_needed(token_ids, hits) + revived <= len(self._free)

    def acquire(self, request_id: str, token_ids: list[int],
                holder: str = "") -> tuple[int, list[int], list[int], int]:
        """(lease_id, block_ids, generations, num_cached_tokens): one new lease, held by
        `holder`, with the cached prefix of token_ids (pinned) followed by fresh blocks for
        the rest, in token order. PoolError 'no_blocks' when the pool cannot (nothing held
        then)."""
        _check_tokens(token_ids)
        hits = self.cached_prefix(token_ids)
        need = self.fresh_needed(token_ids, hits)
        if not self.can_acquire(token_ids, hits):
            raise PoolError("no_blocks", f"request {request_id} needs {need} fresh blocks, only "
                                         f"{len(self._free)} of {self.num_blocks} are free or evictable")
        self.lookup_tokens += len(token_ids)
        self.hit_tokens += len(hits) * self.block_size
        lease = self._new_lease(request_id)
        lease.holder = holder
        for bid in hits:
            self._pin(bid)
        lease.blocks.extend(hits + [self._take_free() for _ in range(need)])
        return (lease.lease_id, list(lease.blocks), self._generations_of(lease.blocks),
                len(hits) * self.block_size)

    def allocate(self, request_id: str, num_blocks: int,
                 lease_id: int | None = None) -> tuple[int, list[int], list[int]]:
        """(lease_id, block_ids, generations) of num_blocks fresh blocks added to
        lease_id (or a new lease). Evicts LRU cached blocks as needed and bumps
        each block's generation. PoolError 'no_blocks' when fewer are available
        (nothing is allocated then), 'not_found' for an unknown lease."""
        if num_blocks < 0:
            raise PoolError("bad_request", f"num_blocks={num_blocks} must be >= 0")
        lease = self._lease(lease_id) if lease_id is not None else None
        if not self.can_allocate(num_blocks):
            raise PoolError("no_blocks", f"request {request_id} needs {num_blocks} blocks, only "
                                         f"{len(self._free)} of {self.num_blocks} are free or evictable")
        if lease is None:
            lease = self._new_lease(request_id)
        fresh = [self._take_free() for _ in range(num_blocks)]
        lease.blocks.extend(fresh)
        return lease.lease_id, fresh, self._generations_of(fresh)

    def commit(self, lease_id: int, block_ids: list[int], token_ids: list[int],
               checksums: list[int] | None = None, written_ts: float = 0.0) -> int:
        """Index the full blocks among block_ids (block i holds tokens
        [i*bs, (i+1)*bs) of token_ids) under their chained hashes, each with its
        checksum (checksums[i], when given) for whoever reuses it; blocks or
        hashes already indexed are skipped. Every block must belong to the
        lease ('bad_request' otherwise). Returns how many were newly indexed.
        The writer is done with the lease: it is in hand-off (HANDOFF) until a reader
        claims it, so the writer's death no longer drops it."""
        lease = self._lease(lease_id)
        _check_tokens(token_ids)
        if checksums and len(checksums) != len(block_ids):
            raise PoolError("bad_request", f"{len(checksums)} checksums for {len(block_ids)} blocks")
        held = set(lease.blocks)
        stray = [b for b in block_ids if b not in held]
        if stray:
            raise PoolError("bad_request", f"blocks {stray[:8]} are not in lease {lease_id} "
                                           f"(it holds {len(held)} blocks)")
        lease.holder = HANDOFF
        lease.committed_ts, lease.written_ts = time.time(), written_ts
        bs, parent, added = self.block_size, None, 0
        for i in range(min(len(block_ids), len(token_ids) // bs)):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, chunk)
            bid = block_ids[i]
            if parent in self._index or self._hash[bid] is not None:
                continue
            self._hash[bid], self._tokens[bid] = parent, chunk
            self._sums[bid] = checksums[i] if checksums else None
            self._index[parent] = bid
            added += 1
        return added

    def claim(self, lease_id: int, holder: str = "") -> tuple[list[int], list[int]]:
        """Mark the lease claimed by `holder`; (block_ids, generations). Claiming twice is
        allowed (a retried request)."""
        lease = self._lease(lease_id)
        lease.claimed, lease.holder = True, holder or lease.holder
        return list(lease.blocks), self._generations_of(lease.blocks)

    def evict(self, block_ids: list[int]) -> int:
        """Take these blocks out of the prefix index (their bytes failed a checksum): no
        prompt finds them again; a pinned one is recycled once its leases let go. How many
        were indexed."""
        n = 0
        for bid in block_ids:
            if not 0 <= bid < self.num_blocks:
                raise PoolError("bad_request", f"block {bid} is outside [0, {self.num_blocks})")
            h = self._hash[bid]
            if h is None:
                continue
            del self._index[h]
            self._hash[bid] = self._tokens[bid] = self._sums[bid] = None
            if self._ref[bid] == 0:   # cached and free: now plain free, reused first
                self._cached_free -= 1
                self._free.move_to_end(bid, last=False)
            n += 1
        self.evicted_blocks += n
        return n

    def readable(self, lease_id: int, block_ids: list[int], sent: int | None = None) -> list[int]:
        """The generations of block_ids, every one of which the live lease holds (a reader
        copying over the wire); 'bad_request' naming a block it does not hold. `sent`: how
        many whole blocks the read completes (default all of them; a layer-wise read
        completes those whose last layer it sends)."""
        lease = self._lease(lease_id)
        held = set(lease.blocks)
        stray = [b for b in block_ids if b not in held]
        if stray:
            raise PoolError("bad_request", f"blocks {stray[:8]} are not in lease {lease_id}")
        self.read_blocks += len(block_ids) if sent is None else sent
        return self._generations_of(block_ids)

    def note_layers_read(self, lease_id: int, slices: int, first_block_layer0: bool) -> None:
        """A layer-wise read of the lease sent `slices` (block, layer) slices; with
        first_block_layer0 its first block's layer 0 among them (the timeline's start)."""
        lease = self._lease(lease_id)
        lease.layers_read += slices
        if not lease.committed_ts:
            lease.layers_read_early += slices
        if first_block_layer0 and not lease.first_read_ts:
            lease.first_read_ts = time.time()

    def checksums_of(self, block_ids: list[int]) -> list[int]:
        """The committed checksums of indexed blocks (cached prefix hits); [] when any is
        unknown (committed without one)."""
        sums = [self._sums[b] for b in block_ids]
        return [] if any(v is None for v in sums) else sums

    def release(self, lease_id: int) -> int:
        """Unpin every block of the lease, tail first (so a shared prefix is
        evicted last); indexed blocks stay findable until evicted. Returns the
        number of blocks the lease held; 'not_found' for an unknown lease."""
        lease = self._lease(lease_id)
        del self._leases[lease_id]
        if lease.layers_read:
            self.handoffs.append(self._timeline(lease))
        for bid in reversed(lease.blocks):
            self._unpin(bid)
        return len(lease.blocks)

    def renew(self, lease_ids: list[int]) -> int:
        """Touch live leases (their holder is alive); unknown ids are skipped. How many."""
        now, n = self._clock(), 0
        for lid in lease_ids:
            lease = self._leases.get(lid)
            if lease is not None:
                lease.touched = now
                n += 1
        return n

    def drop_holder(self, holder: str) -> int:
        """Release every lease `holder` holds (it died); how many. An empty holder names
        nobody."""
        gone = [ls.lease_id for ls in self._leases.values() if holder and ls.holder == holder]
        for lease_id in gone:
            self.release(lease_id)
        return len(gone)

    def expire(self) -> int:
        """Release every lease untouched for lease_ttl_s; how many."""
        now = self._clock()
        stale = [lease for lease in self._leases.values()
                 if now - lease.touched > self.lease_ttl_s]
        for lease in stale:
            log.warning("lease %d of request %s expired (%s) after %.1fs idle (%d blocks)",
                        lease.lease_id, lease.request_id,
                        "claimed" if lease.claimed else "unclaimed", now - lease.touched,
                        len(lease.blocks))
            self.release(lease.lease_id)
        self.expired_leases += len(stale)
        return len(stale)

    # ---------------------------------------------------------------- reports

    def stats(self) -> dict[str, int]:
        """Counts with the KVStatsReply field names (free/cached/leased as in
        the module docstring)."""
        cached = self._cached_free
        return {
            "total_blocks": self.num_blocks,
            "free_blocks": len(self._free) - cached,
            "cached_blocks": cached,
            "leased_blocks": self.num_blocks - len(self._free),
            "leases": len(self._leases),
            "expired_leases": self.expired_leases,
            "lookup_tokens": self.lookup_tokens,
            "hit_tokens": self.hit_tokens,
            "read_blocks": self.read_blocks,
            "evicted_blocks": self.evicted_blocks,
        }

    def idle(self) -> bool:
        """Every block unpinned (free or cached) and no lease live."""
        return len(self._free) == self.num_blocks and not self._leases

    def ledger(self) -> list[dict]:
        """Every live lease, oldest first: id, request, blocks, age, claimed."""
        now = self._clock()
        return [{"lease_id": ls.lease_id, "request_id": ls.request_id, "blocks": list(ls.blocks),
                 "age_s": round(now - ls.created, 3), "claimed": ls.claimed, "holder": ls.holder}
                for ls in self._leases.values()]

    # ---------------------------------------------------------------- internals

    def _lease(self, lease_id: int) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise PoolError("not_found", f"lease {lease_id} is unknown (never issued, released or expired)")
        lease.touched = self._clock()
        return lease

    @staticmethod
    def _timeline(lease: Lease) -> dict:
        return {"lease_id": lease.lease_id, "request_id": lease.request_id,
                "blocks": len(lease.blocks), "layers_read": lease.layers_read,
                "layers_read_before_commit": lease.layers_read_early,
                "first_read_ts": lease.first_read_ts, "written_ts": lease.written_ts,
                "committed_ts": lease.committed_ts}

    def _new_lease(self, request_id: str) -> Lease:
        lease = Lease(self._next_lease, request_id, self._clock())
        self._leases[lease.lease_id] = lease
        self._next_lease += 1
        return lease

    def _generations_of(self, block_ids: list[int]) -> list[int]:
        return [int(self._gen[b]) for b in block_ids]

    def _take_free(self) -> int:
        """Pop the LRU block, evict what it cached, bump its generation, pin it."""
        bid, _ = self._free.popitem(last=False)
        h = self._hash[bid]
        if h is not None:
            self._cached_free -= 1
            del self._index[h]
            self._hash[bid] = self._tokens[bid] = self._sums[bid] = None
        self._gen[bid] += 1  # before anyone can write into it: readers see the reuse
        self._ref[bid] = 1
        return bid

    def _pin(self, bid: int) -> None:
        if self._ref[bid] == 0:
            del self._free[bid]
            self._cached_free -= self._hash[bid] is not None
        self._ref[bid] += 1

    def _unpin(self, bid: int) -> None:
        self._ref[bid] -= 1
        if self._ref[bid] == 0:
            self._free[bid] = None
            if self._hash[bid] is not None:
                self._cached_free += 1
            else:  # nothing worth keeping: reuse it first
                self._free.move_to_end(bid, last=False)


def _check_tokens(token_ids: list[int]) -> None:
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) <= MAX_TOKEN_ID:
        bad = next(t for t in token_ids if not 0 <= t <= MAX_TOKEN_ID)
        raise PoolError("bad_request", f"token id {bad} is outside [0, {MAX_TOKEN_ID}]")
