"""BlockManager: exact block ids, prefix hits, eviction order."""
from __future__ import annotations

from shared.engine.block_manager import BlockManager
from shared.engine.sampling_params import SamplingParams
from shared.engine.sequence import Sequence

P = SamplingParams(temperature=0, max_tokens=4)


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), P)


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    cached = bm.get_cached_prefix(s)
    n = len(s) - len(cached) * bm.block_size
    assert bm.can_allocate(s, n, cached)
    bm.allocate(s, n, cached)
    return cached


def test_allocate_hands_out_lowest_free_ids_and_grows_by_blocks():
    bm = BlockManager(8, 4)
    a = seq(range(10))                         # 10 tokens: 3 blocks
    assert admit(bm, a) == [] and a.block_table == [0, 1, 2] and bm.num_free_blocks == 5
    assert a.num_computed_tokens == 0
    a.num_computed_tokens = 10
    assert bm.can_append(a, 2)
    bm.append_slots(a, 2)                      # 12 tokens still fit 3 blocks
    assert a.block_table == [0, 1, 2]
    bm.append_slots(a, 3)                      # 13: a fourth
    assert a.block_table == [0, 1, 2, 3] and bm.num_free_blocks == 4
    assert bm.can_append(a, 22)                # 32 tokens: all 8 blocks
    assert not bm.can_append(a, 23)            # 33 tokens: 9 blocks, only 8 exist


def test_prefix_hit_reuses_the_exact_blocks_and_leaves_one_token():
    bm = BlockManager(8, 4)
    a = seq(range(12), "a")
    admit(bm, a)
    a.num_computed_tokens = 12
    bm.commit_full_blocks(a)
    assert bm.num_cached_blocks == 3
    b = seq(list(range(12)), "b")              # all 3 blocks match, but one token must run
    cached = admit(bm, b)
    assert cached == [0, 1] and b.block_table == [0, 1, 3] and b.num_cached_tokens == 8
    c = seq(list(range(8)) + [99, 98, 97, 96, 95], "c")
    assert bm.get_cached_prefix(c) == [0, 1]   # diverges inside block 2
    assert bm.prefix_hits == 8


def test_free_puts_the_tail_first_and_unhashed_blocks_are_reused_first():
    bm = BlockManager(6, 4)
    a = seq(range(10), "a")                    # blocks 0, 1 full; 2 partial
    admit(bm, a)
    a.num_computed_tokens = 10
    bm.commit_full_blocks(a)
    bm.free(a)
    # the partial block 2 (no hash) is reused first; then never-used 3..5; then the
    # cached tail 1 before the cached head 0
    assert list(bm.free_queue) == [2, 3, 4, 5, 1, 0]
    b = seq(range(100, 124), "b")              # 6 blocks: takes everything, evicting 1 then 0
    admit(bm, b)
    assert b.block_table == [2, 3, 4, 5, 1, 0] and bm.num_cached_blocks == 0


def test_a_block_shared_by_two_sequences_stays_until_both_free():
    bm = BlockManager(4, 4)
    a = seq(range(9), "a")
    admit(bm, a)
    a.num_computed_tokens = 9
    bm.commit_full_blocks(a)
    b = seq(range(9), "b")
    assert admit(bm, b) == [0, 1]
    bm.free(a)
    assert 0 not in bm.free_queue and 1 not in bm.free_queue and 2 in bm.free_queue
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(3, 4)
    a = seq(range(9), "a")
    admit(bm, a)
    a.num_computed_tokens = 9
    bm.commit_full_blocks(a)
    bm.free(a)                                 # 0, 1 cached; 2 free
    b = seq(range(9), "b")
    cached = bm.get_cached_prefix(b)
    assert cached == [0, 1]
    assert bm.can_allocate(b, 1, cached)       # 2 revived + 1 fresh = 3
    assert not bm.can_allocate(b, 5, cached)   # 2 fresh needed: only 1 left after reviving
