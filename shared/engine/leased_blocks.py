"""Block manager for a prefill worker whose blocks are leased from the KV-store.

Before a prompt is queued, the worker hands over its lease (`assign`): the store blocks
covering the whole prompt, of which the first `hit_tokens` tokens are already cached.
The store owns allocation, prefix indexing and freeing; this class only hands each
sequence its table, so the engine writes KV straight into the store's blocks.
"""
from __future__ import annotations

from shared.engine.block_manager import blocks_for
from shared.engine.sequence import Sequence


class LeasedBlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._leases: dict[str, tuple[list[int], int]] = {}   # request id -> (blocks, hit tokens)

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks  # none of the store's blocks are held here

    def assign(self, request_id: str, block_ids: list[int], hit_tokens: int) -> None:
        """The store blocks request_id's prompt will be computed into."""
        if hit_tokens % self.block_size or hit_tokens > len(block_ids) * self.block_size:
            raise ValueError(f"request {request_id}: hit_tokens={hit_tokens} must be a multiple "
                             f"of {self.block_size} within its {len(block_ids)} blocks")
        self._leases[request_id] = (list(block_ids), hit_tokens)

    def unassign(self, request_id: str) -> None:
        """Forget a lease that never made it into the queue."""
        self._leases.pop(request_id, None)

    def get_cached_prefix(self, seq: Sequence) -> list[int]:
        blocks, hit_tokens = self._lease(seq)
        return blocks[:hit_tokens // self.block_size]

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> bool:
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> None:
        seq.block_table = list(self._lease(seq)[0])
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        self.prefix_queries += len(seq) - 1
        self.prefix_hits += seq.num_cached_tokens
        self.append_slots(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return True

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        need = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        if need > len(seq.block_table):
            raise RuntimeError(f"request {seq.request_id}: lease holds {len(seq.block_table)} "
                               f"blocks, step needs {need}")

    def commit_full_blocks(self, seq: Sequence) -> None:
        pass  # the worker commits to the store once the prompt is done

    def free(self, seq: Sequence) -> None:
        # only finish() frees here: can_append is always true, so nothing is preempted
        seq.block_table = []
        seq.block_hashes = []
        self._leases.pop(seq.request_id, None)

    def _lease(self, seq: Sequence) -> tuple[list[int], int]:
        lease = self._leases.get(seq.request_id)
        if lease is None:
            raise RuntimeError(f"request {seq.request_id}: no store lease assigned before it was queued")
        return lease
