"""Paged-KV block allocator with chained-hash prefix caching.

Free blocks sit in an LRU queue; a freed block keeps its hash (and stays findable as a
cached prefix) until it is reused. Blocks are freed in reverse so a sequence's tail is
evicted before its prefix, which other requests are likelier to share.
"""
from __future__ import annotations

from collections import OrderedDict

from shared.engine.block_hash import chain_hash
from shared.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0   # tokens looked up in the prefix cache
        self.prefix_hits = 0      # of those, served from it

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    # -- prefix cache --------------------------------------------------------------
    def get_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of cached full blocks matching seq's leading tokens.

        Leaves at least one token to compute: the step needs it to produce logits.
        Pure: nothing is reserved until `allocate`.
        """
        if not self.enable_prefix_caching:
            return []
        bs, toks = self.block_size, seq.token_ids
        hits, parent = [], None
        for b in range((len(toks) - 1) // bs):
            chunk = toks[b * bs:(b + 1) * bs]
            parent = chain_hash(parent, chunk)
            bid = self.hash_to_block.get(parent)
            if bid is None or self.blocks[bid].token_ids != tuple(chunk):
                break  # a miss, or a hash collision caught by comparing tokens
            hits.append(bid)
        return hits

    # -- allocation --------------------------------------------------------------
    def _blocks_short(self, held: int, tokens_after: int) -> int:
        return max(blocks_for(tokens_after, self.block_size) - held, 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> bool:
        """Room for a waiting seq: its cached prefix plus num_new_tokens fresh tokens."""
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        short = self._blocks_short(len(cached), len(cached) * self.block_size + num_new_tokens)
        return short + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> None:
        assert not seq.block_table, f"{seq} already holds blocks"
        for bid in cached:
            self._ref(bid)
        seq.block_table = list(cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        seq.block_hashes = [self.blocks[b].hash for b in cached]
        self.prefix_queries += len(seq) - 1 if self.enable_prefix_caching else 0
        self.prefix_hits += seq.num_cached_tokens
        self.append_slots(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        short = self._blocks_short(len(seq.block_table), seq.num_computed_tokens + num_new_tokens)
        return short <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold num_computed_tokens + num_new_tokens."""
        held, after = len(seq.block_table), seq.num_computed_tokens + num_new_tokens
        for _ in range(self._blocks_short(held, after)):
            seq.block_table.append(self._pop_free())

    def _pop_free(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict the cached content it still held
            if self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free_queue[bid]
        block.ref_count += 1

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full (and computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for b in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            chunk = tuple(seq.token_ids[b * bs:(b + 1) * bs])
            parent = chain_hash(parent, chunk)
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_table[b]]
            if parent not in self.hash_to_block and block.hash is None:
                block.hash, block.token_ids = parent, chunk
                self.hash_to_block[parent] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, tail first; unhashed blocks are reused before cached ones."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[bid] = None
                if block.hash is None:
                    self.free_queue.move_to_end(bid, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no sequence holds; returns how many."""
        n = 0
        for bid in list(self.free_queue):
            block = self.blocks[bid]
            if block.hash is not None:
                self.hash_to_block.pop(block.hash, None)
                block.hash = block.token_ids = None
                n += 1
        return n
