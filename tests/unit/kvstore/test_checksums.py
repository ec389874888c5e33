"""KV integrity: block checksums (xxh3 on the CPU, the GPU's weighted sum computed here on
CPU tensors), the store keeping them with its prefix index, and eviction of bad blocks."""
from __future__ import annotations

import pytest
import torch

from services.kvstore.layout import (KVChecksumError, _weighted_sums, block_checksums,
                                     verify_checksums)
from services.kvstore.store import KVStore

SHAPE = [6, 2, 2, 16, 2, 8]   # [blocks, layers, K/V, block size, kv heads, head dim]


@pytest.mark.parametrize("fn", [block_checksums, _weighted_sums], ids=["xxh3", "gpu-sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_flipped_bit_anywhere_changes_its_block_only(fn, dtype):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(SHAPE, generator=g).to(dtype)
    blocks = list(range(SHAPE[0]))
    before = fn(pool, blocks)
    assert len(set(before)) == len(blocks) and all(0 <= v < 2**63 for v in before)
    assert fn(pool, blocks) == before                     # stable
    nbytes = pool[0].numel() * pool.element_size()
    for block, byte, bit in [(0, 0, 0), (3, nbytes // 2, 5), (5, nbytes - 1, 7)]:
        raw = pool[block].view(torch.uint8).view(-1)
        raw[byte] ^= 1 << bit
        after = fn(pool, blocks)
        assert [i for i in blocks if after[i] != before[i]] == [block]
        raw[byte] ^= 1 << bit
    assert fn(pool, blocks) == before


def test_two_swapped_words_change_the_gpu_sum():
    pool = torch.randn(SHAPE)
    before = _weighted_sums(pool, [2])
    w = pool[2].view(-1)
    w[[0, 1]] = w[[1, 0]]
    assert _weighted_sums(pool, [2]) != before


def test_verify_names_the_bad_blocks():
    pool = torch.randn(SHAPE)
    sums = block_checksums(pool, [1, 2, 4])
    verify_checksums(pool, [1, 2, 4], sums)
    pool[4, 1, 1, 3, 0, 2] += 1e-6
    with pytest.raises(KVChecksumError, match=r"blocks \[4\] of 3") as e:
        verify_checksums(pool, [1, 2, 4], sums, "at the claim")
    assert e.value.block_ids == [4]
    with pytest.raises(ValueError, match="2 block ids but 3 checksums"):
        verify_checksums(pool, [1, 2], sums)


@pytest.fixture
def store():
    s = KVStore(num_blocks=8, block_size=16, num_layers=2, num_kv_heads=2, head_dim=8,
                dtype="float32")
    yield s
    s.close()


def test_the_store_keeps_committed_checksums_and_evicts_bad_blocks(store):
    prompt = list(range(1, 50))                          # 3 full blocks + 1 token
    lease = store.acquire("a", prompt, "prefill-0")
    assert lease.num_cached_tokens == 0 and lease.checksums == []
    sums = [11, 22, 33, 44]
    store.commit("a", lease.lease_id, lease.block_ids, prompt, sums)
    store.release("a", lease.lease_id)
    again = store.acquire("b", prompt, "prefill-0")      # the prefix hit carries its checksums
    assert again.num_cached_tokens == 48 and again.checksums == [11, 22, 33]
    assert again.block_ids[:3] == lease.block_ids[:3]
    # block 2 of the prefix failed its checksum: out of the index, recycled once unpinned
    assert store.evict("b", [lease.block_ids[1]]) == 1
    store.release("b", again.lease_id)
    st = store.stats()
    assert (st.cached_blocks, st.free_blocks) == (2, 6)   # blocks 1 and 3 stay cached
    third = store.acquire("c", prompt, "prefill-0")
    assert third.num_cached_tokens == 16 and third.checksums == [11]   # the chain breaks at 2
    store.release("c", third.lease_id)
    assert store.pool.idle()


def test_commit_refuses_checksums_that_do_not_match_the_blocks(store):
    lease = store.acquire("a", list(range(1, 40)), "prefill-0")
    with pytest.raises(Exception, match="2 checksums for 3 blocks"):
        store.commit("a", lease.lease_id, lease.block_ids, list(range(1, 40)), [1, 2])
    store.release("a", lease.lease_id)
