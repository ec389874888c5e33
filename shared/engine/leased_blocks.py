"""Block manager for a prefill worker whose blocks are leased from the KV-store.

Each sequence arrives holding `leased_blocks` (covering its whole prompt) of which the
first `leased_hit_tokens` tokens are already cached in the store. The store owns
allocation, prefix indexing and freeing; this class only hands the table to the engine.
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

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks  # none of the store's blocks are held here

    def get_cached_prefix(self, seq: Sequence) -> list[int]:
        return seq.leased_blocks[:seq.leased_hit_tokens // self.block_size]

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> bool:
        return True

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> None:
        seq.block_table = list(seq.leased_blocks)
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
        seq.block_table = []
        seq.block_hashes = []
