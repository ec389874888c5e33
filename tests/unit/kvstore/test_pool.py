"""KVPool: exact block ids, LRU eviction order, prefix hits, generations, leases."""
import pytest
import torch

from services.kvstore import pool as pool_mod
from services.kvstore.pool import KVPool, PoolError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def toks(n, start=100):
    return list(range(start, start + n))


def make(num_blocks=8, block_size=4, ttl=10.0, **kw):
    return KVPool(num_blocks, block_size, ttl, **kw)


def assert_idle(pool):
    s = pool.stats()
    assert pool.idle(), (s, pool.ledger())
    assert s["leased_blocks"] == 0 and s["leases"] == 0
    assert s["free_blocks"] + s["cached_blocks"] == s["total_blocks"]


def test_allocate_hands_out_lowest_ids_and_bumps_generations():
    pool = make()
    assert pool.allocate("r1", 3) == (1, [0, 1, 2], [1, 1, 1])
    assert pool.allocate("r2", 2) == (2, [3, 4], [1, 1])
    assert pool.allocate("r1", 1, lease_id=1) == (1, [5], [1])
    assert pool.claim(1) == ([0, 1, 2, 5], [1, 1, 1, 1])
    assert pool.stats() == {"total_blocks": 8, "free_blocks": 2, "cached_blocks": 0, "leased_blocks": 6,
                            "leases": 2, "expired_leases": 0, "lookup_tokens": 0, "hit_tokens": 0,
                                "read_blocks": 0, "evicted_blocks": 0}
    assert pool.release(1) == 4 and pool.release(2) == 2
    assert_idle(pool)


def test_no_blocks_allocates_nothing():
    pool = make(num_blocks=4)
    pool.allocate("r1", 3)
    before, gens = pool.stats(), pool.generations.clone()
    with pytest.raises(PoolError) as e:
        pool.allocate("r2", 2)
    assert e.value.code == "no_blocks"
    assert "needs 2 blocks" in str(e.value) and "only 1 of 4" in str(e.value)
    with pytest.raises(PoolError, match="needs 2 blocks"):
        pool.allocate("r1", 2, lease_id=1)  # into an existing lease: same refusal
    assert pool.stats() == before and torch.equal(pool.generations, gens)
    assert [ls["blocks"] for ls in pool.ledger()] == [[0, 1, 2]]


def test_release_unknown_or_twice_is_not_found():
    pool = make()
    with pytest.raises(PoolError, match="lease 42 is unknown") as e:
        pool.release(42)
    assert e.value.code == "not_found"
    lease, _, _ = pool.allocate("r1", 1)
    pool.release(lease)
    with pytest.raises(PoolError, match=f"lease {lease} is unknown"):
        pool.release(lease)
    for op in (lambda: pool.claim(7), lambda: pool.commit(7, [], []), lambda: pool.allocate("r", 1, 7)):
        with pytest.raises(PoolError, match="lease 7 is unknown"):
            op()
    assert_idle(pool)


def test_commit_then_lookup_hits_full_blocks_and_leaves_one_token():
    pool = make()
    prompt = toks(10)  # 2 full blocks of 4, and 2 tokens in a third
    lease, blocks, _ = pool.allocate("r1", 3)
    assert pool.commit(lease, blocks, prompt) == 2
    assert pool.commit(lease, blocks, prompt) == 0  # already indexed: skipped
    pool.release(lease)
    assert pool.stats()["cached_blocks"] == 2 and pool.stats()["free_blocks"] == 6

    assert pool.lookup("r2", prompt) == (2, [0, 1], [1, 1], 8)
    assert pool.lookup("r3", prompt[:9]) == (3, [0, 1], [1, 1], 8)
    assert pool.lookup("r4", prompt[:8]) == (4, [0], [1], 4)  # cap: one token left to compute
    assert pool.lookup("r5", prompt[:4] + [7, 7, 7, 7, 7]) == (5, [0], [1], 4)
    assert pool.lookup("r6", toks(9, start=500)) == (None, [], [], 0)  # a miss makes no lease
    s = pool.stats()
    assert s["leases"] == 4 and s["leased_blocks"] == 2
    assert s["lookup_tokens"] == 10 + 9 + 8 + 9 + 9 and s["hit_tokens"] == 8 + 8 + 4 + 4
    for lid in (2, 3, 4, 5):
        pool.release(lid)
    assert_idle(pool)


def test_hash_collision_is_caught_by_token_check(monkeypatch):
    monkeypatch.setattr(pool_mod, "chain_hash", lambda parent, tokens: b"collide")
    pool = make()
    lease, blocks, _ = pool.allocate("r1", 1)
    pool.commit(lease, blocks, toks(4) + [0])
    pool.release(lease)
    assert pool.lookup("r2", toks(4, start=900) + [0]) == (None, [], [], 0)  # same hash, other tokens
    assert pool.lookup("r3", toks(4) + [0]) == (2, [0], [1], 4)
    pool.release(2)
    assert_idle(pool)


def test_release_order_evicts_tail_first_and_reuses_unhashed_blocks_first():
    pool = make(num_blocks=4, block_size=2)
    a, a_blocks, _ = pool.allocate("a", 2)  # [0, 1], cached below
    b, b_blocks, _ = pool.allocate("b", 2)  # [2, 3], never committed
    pool.commit(a, a_blocks, toks(4))
    pool.release(a)  # free queue: 1, 0 (tail first, prefix last)
    pool.release(b)  # unhashed go to the front: 2, 3, 1, 0
    assert pool.allocate("c", 2)[1] == [2, 3]
    assert pool.stats()["cached_blocks"] == 2
    assert pool.allocate("d", 1)[1:] == ([1], [2])  # evicts a's tail; generation bumped
    assert pool.stats()["cached_blocks"] == 1
    assert pool.lookup("e", toks(4) + [0])[1:] == ([0], [1], 2)  # the prefix survived
    for lid in (3, 4, 5):
        pool.release(lid)
    assert_idle(pool)
    assert pool.generations.tolist() == [1, 2, 2, 2]  # every reuse bumped, the kept prefix not


def test_pinned_cached_blocks_are_not_evicted():
    pool = make(num_blocks=3, block_size=2)
    lease, blocks, _ = pool.allocate("a", 1)
    pool.commit(lease, blocks, toks(2))
    pool.release(lease)
    hit = pool.lookup("b", toks(2) + [0])
    assert hit[1] == [0]
    with pytest.raises(PoolError, match="needs 3 blocks, only 2 of 3"):
        pool.allocate("c", 3)
    assert pool.allocate("c", 2, lease_id=hit[0])[1] == [1, 2]
    assert pool.claim(hit[0]) == ([0, 1, 2], [1, 1, 1])  # prefix hits first, not re-bumped
    pool.release(hit[0])
    assert_idle(pool)


def test_block_shared_by_two_leases_stays_pinned_until_both_release():
    pool = make(num_blocks=2, block_size=2)
    lease, blocks, _ = pool.allocate("a", 1)
    pool.commit(lease, blocks, toks(2))
    pool.release(lease)
    l1, l2 = pool.lookup("b", toks(3))[0], pool.lookup("c", toks(3))[0]
    pool.release(l1)
    assert pool.stats()["leased_blocks"] == 1
    with pytest.raises(PoolError, match="only 1 of 2"):
        pool.allocate("d", 2)
    pool.release(l2)
    assert pool.stats()["cached_blocks"] == 1
    assert_idle(pool)


def test_commit_rejects_blocks_outside_the_lease_and_bad_tokens():
    pool = make()
    mine, _, _ = pool.allocate("a", 1)
    theirs, _, _ = pool.allocate("b", 1)
    with pytest.raises(PoolError, match=r"blocks \[1\] are not in lease 1") as e:
        pool.commit(mine, [1], toks(4))
    assert e.value.code == "bad_request"
    with pytest.raises(PoolError, match=r"token id -3 is outside"):
        pool.commit(mine, [0], [1, 2, -3, 4])
    with pytest.raises(PoolError, match=r"token id 4294967296 is outside"):
        pool.lookup("c", [1, 2**32])
    assert pool.stats()["cached_blocks"] == 0 and pool.commit(mine, [0], toks(3)) == 0  # partial: not indexed
    pool.release(mine)
    pool.release(theirs)
    assert_idle(pool)


def test_leases_expire_when_untouched_for_the_ttl():
    clock = FakeClock()
    pool = make(ttl=10.0, clock=clock)
    old, _, _ = pool.allocate("old", 2)
    queued, _, _ = pool.allocate("queued", 2)     # a prompt still waiting in a prefill queue
    clock.now = 5.0
    young, _, _ = pool.allocate("young", 1)
    clock.now = 9.0
    assert pool.renew([queued, 999]) == 1         # its worker is alive; unknown ids skipped
    clock.now = 10.0
    assert pool.expire() == 0  # exactly at the TTL: still alive
    clock.now = 10.5
    assert pool.expire() == 1
    assert [ls["request_id"] for ls in pool.ledger()] == ["queued", "young"]
    assert pool.stats()["expired_leases"] == 1 and pool.stats()["free_blocks"] == 5
    with pytest.raises(PoolError, match=f"lease {old} is unknown"):
        pool.claim(old)  # decode came too late: it must not read those blocks
    clock.now = 12.0
    pool.claim(queued)                            # claiming touches it too
    clock.now = 21.0
    assert pool.expire() == 1                     # young: untouched since 5.0
    assert [ls["request_id"] for ls in pool.ledger()] == ["queued"]
    clock.now = 100.0                             # a decode worker died holding its claim:
    assert pool.expire() == 1                     # claimed leases expire too, nothing leaks
    assert pool.stats()["expired_leases"] == 3
    assert_idle(pool)
    assert young == 3


def test_generations_live_in_the_given_tensor():
    shared = torch.full((4,), 7, dtype=torch.int64)
    pool = make(num_blocks=4, generations=shared)
    assert pool.generations is shared
    lease, blocks, gens = pool.allocate("r", 2)
    assert gens == [8, 8] and shared.tolist() == [8, 8, 7, 7]
    pool.release(lease)
    with pytest.raises(ValueError, match="int64 \\[4\\]"):
        make(num_blocks=4, generations=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("args, msg", [((0, 4, 1.0), "num_blocks=0"), ((4, 0, 1.0), "block_size=0"),
                                       ((4, 4, 0.0), "lease_ttl_s=0.0")])
def test_bad_construction_names_the_value(args, msg):
    with pytest.raises(ValueError, match=msg):
        KVPool(*args)


def check_invariants(pool):
    """Counters agree with a recount from the leases and the index."""
    refs = [0] * pool.num_blocks
    for lease in pool.ledger():
        for b in lease["blocks"]:
            refs[b] += 1
    s = pool.stats()
    assert s["leased_blocks"] == sum(1 for r in refs if r) and pool._ref == refs
    assert s["cached_blocks"] == sum(1 for b in range(pool.num_blocks) if not refs[b] and pool._hash[b])
    assert s["free_blocks"] + s["cached_blocks"] + s["leased_blocks"] == s["total_blocks"]
    assert {h: b for b, h in enumerate(pool._hash) if h} == pool._index


def test_random_operations_keep_counts_consistent():
    import random
    rng, clock = random.Random(0), FakeClock()
    pool = make(num_blocks=12, block_size=2, ttl=5.0, clock=clock)
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    for _ in range(600):
        leases = [ls["lease_id"] for ls in pool.ledger()]
        op = rng.random()
        clock.now += rng.random()
        try:
            if op < 0.3:
                prompt = rng.choice(prompts)
                lid, hits, _, n = pool.lookup("r", prompt)
                need = -(-len(prompt) // 2) - len(hits)
                lid, blocks, _ = pool.allocate("r", need, lid)
                pool.commit(lid, hits + blocks, prompt)
            elif op < 0.55 and leases:
                pool.release(rng.choice(leases))
            elif op < 0.65 and leases:
                pool.claim(rng.choice(leases))
            elif op < 0.75:
                pool.expire()
            else:
                pool.allocate("r", rng.randrange(4))
        except PoolError as e:
            assert e.code == "no_blocks"
        check_invariants(pool)
    s = pool.stats()
    assert s["hit_tokens"] > 0 and s["expired_leases"] > 0 and pool.generations.max() > 1  # all paths ran
    for ls in pool.ledger():
        pool.release(ls["lease_id"])
    check_invariants(pool)
    assert_idle(pool)


def test_acquire_pins_the_cached_prefix_and_adds_fresh_blocks_in_one_lease():
    pool = make(num_blocks=8, block_size=4)
    prompt = toks(10)                              # 3 blocks: 2 full + 2 tokens
    lease, blocks, gens, cached = pool.acquire("a", prompt)
    assert (lease, blocks, gens, cached) == (1, [0, 1, 2], [1, 1, 1], 0)
    pool.commit(lease, blocks, prompt)
    pool.release(lease)
    # the same prompt: blocks 0 and 1 come cached (unbumped), the tail is fresh
    lease, blocks, gens, cached = pool.acquire("b", prompt)
    assert (blocks, gens, cached) == ([0, 1, 2], [1, 1, 2], 8)
    assert pool.stats()["hit_tokens"] == 8 and pool.stats()["lookup_tokens"] == 20
    pool.release(lease)
    assert_idle(pool)


def test_acquire_counts_revived_hits_and_refuses_without_holding_anything():
    pool = make(num_blocks=4, block_size=4)
    prompt = toks(9)                               # 3 blocks
    lease, blocks, _, _ = pool.acquire("a", prompt)
    pool.commit(lease, blocks, prompt)
    pool.release(lease)                            # 0, 1 cached; 2 unhashed; 3 never used
    other = pool.allocate("x", 1)[0]               # takes 2 (unhashed first): 1 truly free
    # 2 hits revived from the free list + 1 fresh = 3, and 3 are free or evictable
    assert pool.can_acquire(prompt, pool.cached_prefix(prompt))
    longer = toks(13)                              # 2 hits + 2 fresh: one too many
    assert not pool.can_acquire(longer, pool.cached_prefix(longer))
    before, gens = pool.stats(), pool.generations.clone()
    with pytest.raises(PoolError, match="needs 2 fresh blocks, only 3 of 4") as e:
        pool.acquire("b", longer)
    assert e.value.code == "no_blocks"
    assert pool.stats() == before and torch.equal(pool.generations, gens)
    pool.release(other)
    assert_idle(pool)


def test_drop_holder_releases_only_that_workers_leases():
    pool = make(num_blocks=8, block_size=4)
    a = pool.acquire("a", toks(5), holder="prefill-0")[0]
    b = pool.acquire("b", toks(5, 200), holder="prefill-1")[0]
    c, blocks, _, _ = pool.acquire("c", toks(5, 300), holder="prefill-0")
    d, dblocks, _, _ = pool.acquire("d", toks(5, 400), holder="prefill-0")
    pool.claim(c, holder="decode-0")                  # decode took c over
    pool.commit(d, dblocks, toks(5, 400))             # d is written: in hand-off
    assert {ls["lease_id"]: ls["holder"] for ls in pool.ledger()} == \
        {a: "prefill-0", b: "prefill-1", c: "decode-0", d: "hand-off"}
    assert pool.drop_holder("prefill-0") == 1 and pool.drop_holder("") == 0
    assert [ls["lease_id"] for ls in pool.ledger()] == [b, c, d]   # d outlives its writer
    assert pool.drop_holder("decode-0") == 1 and pool.drop_holder("prefill-1") == 1
    pool.claim(d, holder="decode-1")
    assert pool.drop_holder("decode-1") == 1
    assert_idle(pool)
