"""The routing policy alone: prefix affinity, bounded; decode by free blocks."""
from __future__ import annotations

from services.gateway.router import Router, WorkerInfo


def worker(name, role="prefill", free=100, queued=0) -> WorkerInfo:
    return WorkerInfo(identity=name.encode(), worker_id=name, role=role, total_blocks=100,
                      free_blocks=free, queued_tokens=queued)


def test_a_prompt_sticks_to_the_worker_that_saw_its_first_block():
    r = Router()
    a, b = worker("p0"), worker("p1")
    r.workers = {a.identity: a, b.identity: b}
    prompt = list(range(100, 140))
    first = r.pick_prefill(prompt)
    first.assigned_tokens = 0
    other = b if first is a else a
    other.queued_tokens = 0
    first.queued_tokens = 1000           # busier, but within the stickiness margin
    assert r.pick_prefill(prompt + [7]) is first
    first.queued_tokens = 10_000         # clearly busier: the prefix moves
    assert r.pick_prefill(prompt) is other


def test_prefix_affinity_is_bounded_least_recently_used_first():
    r = Router(affinity_max=8)
    p = worker("p0")
    r.workers = {p.identity: p}
    prompts = [[i] * 16 for i in range(20)]
    for ids in prompts:
        r.pick_prefill(ids)
    assert len(r.affinity) == 8
    r.pick_prefill(prompts[12])          # touched: survives the next evictions
    for ids in ([i] * 16 for i in range(100, 107)):
        r.pick_prefill(ids)
    from shared.engine.block_hash import chain_hash
    assert chain_hash(None, prompts[12]) in r.affinity
    assert chain_hash(None, prompts[13]) not in r.affinity and len(r.affinity) == 8


def test_decode_goes_to_the_most_free_blocks_and_skips_tried_incarnations():
    r = Router()
    d0, d1 = worker("d0", "decode", free=50), worker("d1", "decode", free=90)
    d0.incarnation, d1.incarnation = "i0", "i1"
    r.workers = {d0.identity: d0, d1.identity: d1}
    assert r.pick_decode(64) is d1 and d1.free_blocks == 86
    assert r.pick_decode(64, exclude={"i1"}) is d0
    assert r.pick_decode(64, exclude={"i0", "i1"}) is None
