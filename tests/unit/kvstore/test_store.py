"""KVStore in-process: its segment in real shared memory, the layout, the fence."""
from __future__ import annotations

import os

import pytest
import torch

from services.kvstore.layout import StaleBlockError, check_generations, open_pool
from services.kvstore.port import KVStoreError
from services.kvstore.store import KVStore
from shared.buffers.shm import SHM_DIR


@pytest.fixture
def store():
    s = KVStore(num_blocks=6, block_size=4, num_layers=2, num_kv_heads=3, head_dim=8,
                dtype="float32")
    yield s
    s.close()


def test_the_segment_holds_pool_then_generations_and_open_pool_maps_it(store):
    info = store.pool_info()
    assert info.handle.shape == [6, 2, 2, 4, 3, 8] and info.handle.base == store.segment.name
    assert os.path.exists(os.path.join(SHM_DIR, info.handle.base))
    pool, gens = open_pool(info)
    # one block holds every layer and head of its tokens: 2*2*4*3*8 floats
    assert pool[1].numel() == 384 and pool.data_ptr() == store.segment.pool.data_ptr()
    lease = store.acquire("a", list(range(7)))
    assert gens[lease.block_ids].tolist() == lease.generations == [1, 1]
    pool[lease.block_ids[0]].fill_(2.5)
    assert bool((store.segment.pool[lease.block_ids[0]] == 2.5).all())
    store.release("a", lease.lease_id)


def test_check_generations_names_the_recycled_blocks(store):
    lease = store.acquire("a", list(range(9)))
    _, gens = open_pool(store.pool_info())
    check_generations(gens, lease.block_ids, lease.generations)
    store.release("a", lease.lease_id)
    again = store.allocate("b", 3)                 # the same blocks, handed out fresh
    assert again.block_ids == lease.block_ids == [0, 1, 2]
    with pytest.raises(StaleBlockError, match=r"recycled during the copy .*\(0, 1, 2\)"):
        check_generations(gens, lease.block_ids, lease.generations, "during the copy")
    with pytest.raises(ValueError, match="2 block ids but 1 generations"):
        check_generations(gens, [0, 1], [1])
    store.release("b", again.lease_id)


def test_refusals_are_store_errors_with_codes(store):
    with pytest.raises(KVStoreError) as e:
        store.claim("x", 99)
    assert e.value.code == "not_found" and "lease 99 is unknown" in e.value.message
    with pytest.raises(KVStoreError) as e:
        store.acquire("big", list(range(100)))
    assert e.value.code == "no_blocks"
    st = store.status()
    assert st["idle"] and st["ledger"] == [] and st["pool"]["base"] == store.segment.name


def test_close_unlinks_the_segment_but_open_views_stay_valid():
    s = KVStore(num_blocks=2, block_size=4, num_layers=1, num_kv_heads=1, head_dim=4,
                dtype="float32")
    path = os.path.join(SHM_DIR, s.segment.name)
    pool = s.segment.pool
    pool.fill_(1.0)
    s.close()
    assert not os.path.exists(path)
    assert float(pool.sum()) == pool.numel()
    torch.testing.assert_close(pool[0], torch.ones_like(pool[0]))
