"""Talking to the KV store: a synchronous client, and opening its pool.

Shared-memory layout (one POSIX shm segment, created and unlinked by the store):

    offset 0                       pool   [num_blocks, num_layers, 2, block_size,
                                           num_kv_heads, head_dim] of the pool dtype
    offset generations_offset(..)  generations  int64 [num_blocks]

generations_offset = pool nbytes rounded up to 64 bytes. KVPoolInfo.handle
names the pool part only (offset 0); open_pool() derives the generations
view from it. A reader copying block b, whose KVRef says generation g, checks
generations[b] == g before AND after the copy (generations_match); a mismatch
means the block was recycled and the copy must be discarded.

KVStoreClient is one DEALER doing strict request/reply (Lazy Pirate): on a
timeout it drops the socket and opens a fresh one, so a late reply can never
be taken for the answer to the next request. Not thread-safe: one per thread.
"""
from __future__ import annotations

import uuid
from typing import Any

import torch
import zmq

from shared import transport
from shared.buffers import shm
from shared.buffers.handle import ITEMSIZE, BufferHandle
from shared.protocol import (Ack, ErrorReply, KVAllocate, KVClaim, KVCommit, KVLease, KVLookup,
                             KVLookupReply, KVPoolInfo, KVPoolQuery, KVRelease, KVRenew, KVStats,
                             KVStatsReply, Msg, StatusReply, StatusRequest)

GENERATIONS_ALIGN = 64


# ---------------------------------------------------------------- shm layout

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


def generations_match(generations: torch.Tensor, block_ids: list[int], expected: list[int]) -> bool:
    """True when every block still carries the generation the lease named."""
    if len(block_ids) != len(expected):
        raise ValueError(f"{len(block_ids)} block ids but {len(expected)} generations")
    if not block_ids:
        return True
    now = generations[torch.tensor(block_ids, dtype=torch.long)]
    return bool(torch.equal(now, torch.tensor(expected, dtype=torch.int64)))


# ---------------------------------------------------------------- client

class KVStoreError(Exception):
    """The store refused a request (code from its ErrorReply) or did not
    answer (code 'timeout'); str() carries its message."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


class KVStoreClient:
    """Synchronous request/reply to the KV store at `addr`."""

    def __init__(self, ctx: zmq.Context, addr: str, identity: str | None = None,
                 curve: transport.CurveConfig | None = None, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.ctx, self.addr, self.curve, self.timeout_s = ctx, addr, curve, timeout_s
        self.identity = identity or f"kvc-{uuid.uuid4().hex[:12]}"
        self._sock: zmq.Socket | None = None

    # -- requests ------------------------------------------------------------

    def pool_info(self) -> KVPoolInfo:
        """The pool's handle and shape (open it with open_pool)."""
        return self._call(KVPoolQuery(), KVPoolInfo)

    def lookup(self, request_id: str, token_ids: list[int]) -> KVLookupReply:
        """Longest cached prefix, pinned under a new lease (lease_id None: no hit)."""
        return self._call(KVLookup(request_id=request_id, token_ids=list(token_ids)), KVLookupReply)

    def allocate(self, request_id: str, num_blocks: int, lease_id: int | None = None) -> KVLease:
        """num_blocks fresh blocks added to lease_id, or to a new lease.
        KVStoreError 'no_blocks' when the pool cannot (nothing allocated)."""
        return self._call(KVAllocate(request_id=request_id, num_blocks=num_blocks,
                                     lease_id=lease_id), KVLease)

    def commit(self, request_id: str, lease_id: int, block_ids: list[int], token_ids: list[int]) -> None:
        """Index the lease's written full blocks under token_ids (from position 0)."""
        self._call(KVCommit(request_id=request_id, lease_id=lease_id, block_ids=list(block_ids),
                            token_ids=list(token_ids)), Ack)

    def claim(self, request_id: str, lease_id: int) -> KVLease:
        """Take over a lease (it stops expiring); its blocks and generations."""
        return self._call(KVClaim(request_id=request_id, lease_id=lease_id), KVLease)

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
        sock = self._socket()
        transport.send_msg(sock, msg)
        if not sock.poll(int(self.timeout_s * 1000)):
            self.close()  # Lazy Pirate: a fresh socket drops any late reply
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
