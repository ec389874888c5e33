"""KVStoreClient: the KV store over ZeroMQ, as a KVStorePort.

One DEALER doing strict request/reply (Lazy Pirate): on a timeout it drops the socket and
opens a fresh one, so a late reply can never be taken for the answer to the next request.
After a timeout it fails fast ('unavailable') for retry_after_s, so a dead store costs its
callers one timeout, not one per call. Not thread-safe: one per thread. The pool's layout
and open_pool() are in layout.py.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from shared import transport
from shared.protocol import (Ack, ErrorReply, KVAcquire, KVAllocate, KVClaim, KVCommit,
                             KVDropHolder, KVLease, KVLookup, KVLookupReply, KVPoolInfo,
                             KVBlocks, KVEvict, KVPoolQuery, KVRead, KVRelease, KVRenew, KVStats, KVStatsReply, Msg,
                             StatusReply, StatusRequest)
from services.kvstore.port import KVStoreError

__all__ = ["KVStoreClient", "KVStoreError"]


class KVStoreClient:
    """Synchronous request/reply to the KV store at `addr`."""

    def __init__(self, ctx: zmq.Context, addr: str, identity: str | None = None,
                 curve: transport.CurveConfig | None = None, timeout_s: float = 5.0,
                 retry_after_s: float = 1.0):
        if timeout_s <= 0 or retry_after_s < 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 and retry_after_s="
                             f"{retry_after_s} >= 0")
        self.ctx, self.addr, self.curve, self.timeout_s = ctx, addr, curve, timeout_s
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self.identity = identity or f"kvc-{uuid.uuid4().hex[:12]}"
        self._sock: zmq.Socket | None = None

    # -- requests ------------------------------------------------------------

    def pool_info(self) -> KVPoolInfo:
        """The pool's handle and shape (open it with layout.open_pool)."""
        return self._call(KVPoolQuery(), KVPoolInfo)

    def acquire(self, request_id: str, token_ids: list[int], holder: str = "") -> KVLease:
        """One new lease held by `holder`: the cached prefix of token_ids, then fresh
        blocks for the rest (num_cached_tokens says how many came cached). KVStoreError
        'no_blocks' if full."""
        return self._call(KVAcquire(request_id=request_id, token_ids=list(token_ids),
                                    holder=holder), KVLease)

    def lookup(self, request_id: str, token_ids: list[int]) -> KVLookupReply:
        """Longest cached prefix, pinned under a new lease (lease_id None: no hit)."""
        return self._call(KVLookup(request_id=request_id, token_ids=list(token_ids)), KVLookupReply)

    def allocate(self, request_id: str, num_blocks: int, lease_id: int | None = None) -> KVLease:
        """num_blocks fresh blocks added to lease_id, or to a new lease.
        KVStoreError 'no_blocks' when the pool cannot (nothing allocated)."""
        return self._call(KVAllocate(request_id=request_id, num_blocks=num_blocks,
                                     lease_id=lease_id), KVLease)

    def commit(self, request_id: str, lease_id: int, block_ids: list[int], token_ids: list[int],
               checksums: list[int] | None = None, written_ts: float = 0.0) -> None:
        """Index the lease's written full blocks under token_ids (from position 0), each
        with its checksum."""
        self._call(KVCommit(request_id=request_id, lease_id=lease_id, block_ids=list(block_ids),
                            token_ids=list(token_ids), checksums=list(checksums or []),
                            written_ts=written_ts), Ack)

    def read(self, request_id: str, lease_id: int, block_ids: list[int],
             from_layers: list[int] | None = None) -> KVBlocks:
        """A lease's blocks over the wire: KVBlocks whose frames (received without
        copies) hold one block each, or with from_layers the layers written since."""
        return self._call(KVRead(request_id=request_id, lease_id=lease_id,
                                 block_ids=list(block_ids), from_layers=list(from_layers or [])),
                          KVBlocks)

    def evict(self, request_id: str, block_ids: list[int]) -> None:
        """These blocks failed their checksum: out of the prefix index."""
        self._call(KVEvict(request_id=request_id, block_ids=list(block_ids)), Ack)

    def claim(self, request_id: str, lease_id: int, holder: str = "") -> KVLease:
        """Worker `holder` takes over a lease; its blocks and generations."""
        return self._call(KVClaim(request_id=request_id, lease_id=lease_id, holder=holder),
                          KVLease)

    def drop_holder(self, holder: str) -> None:
        """Worker `holder` is gone: the store releases every lease it holds."""
        self._call(KVDropHolder(holder=holder), Ack)

    def release(self, request_id: str, lease_id: int) -> None:
        """Return the lease's blocks; KVStoreError 'not_found' if already gone."""
        self._call(KVRelease(request_id=request_id, lease_id=lease_id), Ack)

    def renew(self, lease_ids: list[int]) -> None:
        """Keep these leases alive (their TTL restarts); unknown ids are ignored."""
        self._call(KVRenew(lease_ids=list(lease_ids)), Ack)

    def stats(self) -> KVStatsReply:
        return self._call(KVStats(), KVStatsReply)

    def status(self) -> dict[str, Any]:
        """The store's StatusReply data: stats, ledger (live leases), pool, generations."""
        return self._call(StatusRequest(), StatusReply).data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "KVStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = transport.connect_dealer(self.ctx, self.addr, self.identity, self.curve)
        return self._sock

    def _call(self, msg: Msg, want: type[Msg]) -> Any:
        rid = getattr(msg, "request_id", None)
        if time.monotonic() < self._down_until:
            raise KVStoreError("unavailable", f"the store at {self.addr} did not answer a moment "
                                              f"ago; trying again in under {self.retry_after_s}s", rid)
        sock = self._socket()
        transport.send_msg(sock, msg)
        if not sock.poll(int(self.timeout_s * 1000)):
            self.close()  # Lazy Pirate: a fresh socket drops any late reply
            self._down_until = time.monotonic() + self.retry_after_s
            raise KVStoreError("timeout", f"no reply to {type(msg).__name__} from {self.addr} "
                                          f"within {self.timeout_s}s", rid)
        got = transport.recv_msg(sock)
        if got is None:
            raise KVStoreError("bad_message", f"invalid reply to {type(msg).__name__} (see log)", rid)
        reply = got[1]
        if isinstance(reply, ErrorReply):
            raise KVStoreError(reply.code, reply.message, reply.request_id or rid)
        if not isinstance(reply, want):
            raise KVStoreError("bad_message", f"{type(msg).__name__} answered with "
                                              f"{type(reply).__name__}, want {want.__name__}", rid)
        return reply
