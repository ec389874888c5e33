"""What a worker needs from the KV store, as an interface.

Two things satisfy it: `KVStoreClient` (the store process over ZeroMQ) and `KVStore`
(the same logic in this process, for tests and tools). Worker code is written against
this port only, so its state machines run the same against either.
"""
from __future__ import annotations

from typing import Protocol

from shared.protocol import KVBlocks, KVLease, KVPoolInfo


class KVStoreError(Exception):
    """The store refused a request (code from its ErrorReply: 'no_blocks',
    'not_found', 'bad_request', ...) or did not answer ('timeout'); str() says why."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


class KVStorePort(Protocol):
    def pool_info(self) -> KVPoolInfo:
        """The pool's handle and shape (open it with layout.open_pool)."""

    def acquire(self, request_id: str, token_ids: list[int], holder: str) -> KVLease:
        """One new lease, held by worker `holder`, with the cached prefix of token_ids
        (num_cached_tokens) and fresh blocks for the rest. KVStoreError 'no_blocks' with
        nothing held."""

    def commit(self, request_id: str, lease_id: int, block_ids: list[int],
               token_ids: list[int], checksums: list[int] | None = None,
               written_ts: float = 0.0) -> None:
        """The lease's blocks are written (the last layer at written_ts, time.time()):
        index the full ones under token_ids, each with its checksum."""

    def read(self, request_id: str, lease_id: int, block_ids: list[int],
             from_layers: list[int] | None = None) -> "KVBlocks":
        """A lease's blocks as payload frames (the tcp hand-off); with from_layers, only
        the layers written since (layer-wise)."""

    def evict(self, request_id: str, block_ids: list[int]) -> int:
        """These blocks failed their checksum: out of the prefix index."""

    def claim(self, request_id: str, lease_id: int, holder: str) -> KVLease:
        """Worker `holder` takes over a lease (its blocks and generations)."""

    def release(self, request_id: str, lease_id: int) -> None:
        """Give a lease's blocks back; KVStoreError 'not_found' if already gone."""

    def renew(self, lease_ids: list[int]) -> None:
        """Keep these leases alive; unknown ids are ignored."""
