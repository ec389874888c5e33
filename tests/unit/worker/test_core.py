"""WorkerCore without sockets: a tiny random Llama, a real in-process KVStore (its pool in
real shared memory), messages in, messages out."""
from __future__ import annotations

import msgspec
import pytest
import torch

from services.kvstore.store import KVStore
from services.kvstore.port import KVStoreError
from services.worker.core import WorkerCore
from shared import protocol as P
from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from shared.models.loader import load_model
from shared.wire import spec_from_params
from tests.conftest import assert_idle, save_tiny_model

PROMPT = [5, 17, 42, 99, 3, 150, 7, 8, 9, 10, 11, 200, 13, 14, 15, 16, 17, 18, 19, 20,
          21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]   # 37 tokens
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = save_tiny_model(tmp_path_factory.mktemp("tiny"))   # 2 layers, 2 kv heads, d 16
    return path, load_model(path, "float32")


def engine(model, blocks=64) -> LLMEngine:
    path, m = model
    return LLMEngine(m, EngineConfig(model=str(path), dtype="float32", num_kv_blocks=blocks,
                                     max_num_batched_tokens=64), eos_token_ids=(2,))


@pytest.fixture
def store():
    s = KVStore(num_blocks=32, block_size=16, num_layers=2, num_kv_heads=2, head_dim=16,
                dtype="float32", lease_ttl_s=30)
    yield s
    s.close()


def run(core: WorkerCore, max_steps=100) -> list[P.Msg]:
    out = []
    for _ in range(max_steps):
        if not core.has_work():
            return out
        out += core.step()
    raise AssertionError("the core did not finish")


def prefill_req(rid="r1", prompt=PROMPT, params=PARAMS) -> P.PrefillRequest:
    return P.PrefillRequest(request_id=rid, prompt_ids=prompt, sampling=spec_from_params(params),
                            arrival_ts=0.0)


def handoff(done: P.PrefillDone, prompt=PROMPT, params=PARAMS) -> P.DecodeRequest:
    return P.DecodeRequest(request_id=done.request_id, prompt_ids=prompt,
                           sampling=spec_from_params(params), first_token=done.first_token,
                           kv=done.kv, lease_id=done.lease_id)


def reference(model, prompt=PROMPT, params=PARAMS) -> list[int]:
    eng = engine(model)
    return eng.generate([prompt], params)[0][0]


def test_prefill_writes_kv_into_the_store_in_place_and_commits(model, store):
    core = WorkerCore("prefill-0", "prefill", engine(model), store)
    assert core.handle(prefill_req()) == []
    assert store.pool.stats()["leases"] == 1 and core.prefill_jobs
    [done] = run(core)
    assert isinstance(done, P.PrefillDone) and done.first_token == reference(model)[0]
    assert (done.num_cached_tokens, done.num_computed_tokens) == (0, 37)
    assert done.kv.handle == store.info.handle and len(done.kv.block_ids) == 3
    # the prompt's KV sits in the store's blocks exactly as a local engine computes it
    eng = engine(model)
    eng.add_request("ref", PROMPT, SamplingParams(temperature=0, max_tokens=2))
    eng.step()
    table = eng.requests["ref"][0].block_table
    for i, (ours, theirs) in enumerate(zip(done.kv.block_ids, table)):
        n = min(16, len(PROMPT) - 16 * i)       # the last block holds 5 tokens
        for layer in range(2):
            for kv in range(2):
                torch.testing.assert_close(store.segment.pool[ours, layer, kv, :n],
                                           eng.kv_cache.tensor[layer, kv, theirs, :n])
    eng.abort("ref")
    # committed: the two full blocks are a prefix hit now; the lease waits for decode
    hit = store.lookup("probe", PROMPT)
    assert hit.block_ids == done.kv.block_ids[:2] and hit.num_tokens == 32
    store.release("probe", hit.lease_id)
    assert [ls["lease_id"] for ls in store.pool.ledger()] == [done.lease_id]
    store.release("r1", done.lease_id)
    assert store.pool.idle()


def test_handoff_decodes_the_same_tokens_and_returns_every_block(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec_engine = engine(model)
    dec = WorkerCore("decode-0", "decode", dec_engine, store)
    pre.handle(prefill_req())
    [done] = run(pre)
    assert dec.handle(handoff(done)) == []
    assert store.pool.idle()                     # claimed, copied, released at once
    got = [done.first_token]
    batches = run(dec)
    for b in batches:
        got += b.ids
    assert got == reference(model)
    assert batches[-1].finish_reason == "length" and "kv_handoff" in batches[0].timings
    assert_idle(dec_engine)
    # a second request with the same prompt is served from the store's prefix cache
    pre.handle(prefill_req("r2"))
    [done2] = run(pre)
    assert (done2.num_cached_tokens, done2.num_computed_tokens) == (32, 5)
    assert done2.first_token == done.first_token
    store.release("r2", done2.lease_id)
    assert store.pool.idle()


def test_a_block_recycled_during_the_copy_is_caught_by_the_fence(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec_engine = engine(model)
    dec = WorkerCore("decode-0", "decode", dec_engine, store)
    pre.handle(prefill_req())
    [done] = run(pre)
    copy = dec_engine.kv_cache.load_from_store

    def recycled_meanwhile(pool, src, dst):
        # the lease dies mid-copy and its blocks go to someone else: generations move
        store.pool.release(done.lease_id)
        store.pool.allocate("thief", store.pool.num_available)
        copy(pool, src, dst)

    dec_engine.kv_cache.load_from_store = recycled_meanwhile
    [err] = dec.handle(handoff(done))
    assert err.code == "stale_kv" and "recycled during the copy" in err.message
    assert err.request_id == "r1" and not dec.decode_jobs
    assert_idle(dec_engine)                      # the blocks it had taken are back


def test_a_kvref_that_is_not_this_stores_or_this_leases_is_refused(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec = WorkerCore("decode-0", "decode", engine(model), store)
    pre.handle(prefill_req())
    [done] = run(pre)
    old_pool = msgspec.structs.replace(done.kv.handle, base="duet-kv-old-epoch")
    req = handoff(done)
    [err] = dec.handle(msgspec.structs.replace(req, kv=msgspec.structs.replace(req.kv, handle=old_pool)))
    assert err.code == "stale_kv" and "duet-kv-old-epoch" in err.message
    # blocks outside the lease: refused, and the claim is not left behind
    stray = msgspec.structs.replace(req.kv, block_ids=[31, 30, 29])
    [err] = dec.handle(msgspec.structs.replace(req, kv=stray))
    assert err.code == "stale_kv" and "are not lease" in err.message
    assert store.pool.idle() and not dec.decode_jobs


def test_no_room_refuses_the_handoff_before_claiming(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec = WorkerCore("decode-0", "decode", engine(model, blocks=2), store)
    pre.handle(prefill_req())
    [done] = run(pre)
    [err] = dec.handle(handoff(done))
    assert err.code == "no_blocks" and err.request_id == "r1"
    [lease] = store.pool.ledger()
    assert lease["lease_id"] == done.lease_id and not lease["claimed"]   # still for another
    store.release("r1", done.lease_id)


def test_abort_frees_everything_wherever_the_request_is(model, store):
    eng = engine(model)
    core = WorkerCore("both-0", "both", eng, store)
    core.handle(P.DecodeRequest(request_id="running", prompt_ids=PROMPT,
                                sampling=spec_from_params(PARAMS)))
    core.step()
    core.step()
    core.handle(prefill_req("queued"))          # leased, not computed yet
    assert store.pool.stats()["leases"] == 1 and eng.idle_counts()["running"] == 1
    core.handle(P.Abort(request_id="queued"))
    core.handle(P.Abort(request_id="running"))
    core.handle(P.Abort(request_id="unknown"))
    assert not core.has_work() and not core.prefill_jobs and not core.decode_jobs
    assert store.pool.idle()
    assert_idle(eng)
    assert_idle(core.prefill)


def test_colocated_request_runs_whole_without_a_store(model):
    eng = engine(model)
    core = WorkerCore("both-0", "both", eng)
    core.handle(P.DecodeRequest(request_id="c1", prompt_ids=PROMPT, sampling=spec_from_params(PARAMS)))
    batches = run(core)
    assert [t for b in batches for t in b.ids] == reference(model)
    assert set(batches[0].timings) == {"decode_queue"}
    assert_idle(eng)


def test_bad_requests_are_answered_never_raised(model, store):
    bare = WorkerCore("both-0", "both", engine(model))
    [e] = bare.handle(prefill_req())
    assert e.code == "bad_request" and "has no KV store" in e.message
    [e] = bare.handle(P.Register(worker_id="x", role="both", model="m", devices=["cpu"],
                                 max_batch_tokens=1, total_blocks=1, free_blocks=1))
    assert e.code == "bad_request" and "does not handle Register" in e.message
    [e] = bare.handle(P.SetRole(role="prefill"))
    assert e.code == "bad_request" and bare.role == "both"
    core = WorkerCore("decode-0", "decode", engine(model), store)
    hot = SamplingParams(temperature=0, max_tokens=4)
    hot.temperature = 9.0
    [e] = core.handle(prefill_req(params=hot))
    assert e.code == "bad_request" and "temperature=9.0" in e.message
    [e] = core.handle(P.DecodeRequest(request_id="h", prompt_ids=PROMPT,
                                      sampling=spec_from_params(PARAMS),
                                      kv=P.KVRef(handle=store.info.handle, block_ids=[1],
                                                 generations=[0], num_tokens=16)))
    assert e.code == "bad_request" and "first_token and lease_id" in e.message
    [e] = core.handle(prefill_req(prompt=[5000]))
    assert e.code == "bad_request" and "5000" in e.message
    assert store.pool.idle() and not core.has_work()
    with pytest.raises(ValueError, match="role prefill needs a KV store"):
        WorkerCore("p", "prefill", engine(model))


def test_a_store_that_does_not_answer_is_a_clear_unavailable(model, store):
    class DeadStore:
        def __init__(self, real):
            self.real = real

        def pool_info(self):
            return self.real.pool_info()

        def acquire(self, *a):
            raise KVStoreError("timeout", "no reply to KVAcquire within 5s")

    core = WorkerCore("prefill-0", "prefill", engine(model), DeadStore(store))
    [e] = core.handle(prefill_req())
    assert e.code == "unavailable" and e.message.startswith("KV store unavailable")
    assert not core.has_work()


def test_role_flip_and_drain_are_reported(model, store):
    core = WorkerCore("decode-0", "decode", engine(model), store)
    [hb] = core.handle(P.SetRole(role="both"))
    assert isinstance(hb, P.Heartbeat) and hb.role == "both" and core.role == "both"
    assert core.handle(P.Drain(enable=True)) == [] and core.status()["draining"]
    [st] = core.handle(P.StatusRequest())
    assert st.data["role"] == "both" and st.data["decode"]["free_blocks"] == 64
    reg = core.register("tiny", ["cpu"])
    assert (reg.role, reg.total_blocks, reg.block_size) == ("both", 64, 16)


def test_a_prompt_whose_blocks_were_given_away_is_never_written(model, store):
    """The gateway gave this worker up (its leases were dropped) while a prompt was queued:
    the blocks now belong to another request, and the worker must not write into them."""
    core = WorkerCore("prefill-0", "prefill", engine(model), store)
    core.handle(prefill_req())
    assert store.drop_holder("prefill-0") == 1
    thief = store.acquire("thief", list(range(300, 337)), "prefill-1")   # the same 3 blocks
    assert thief.block_ids == core.prefill_jobs["r1"].lease.block_ids
    for b in thief.block_ids:
        store.segment.pool[b].fill_(7.0)
    [err] = run(core)
    assert err.code == "stale_kv" and err.request_id == "r1" and "before the prefill step" in err.message
    assert bool((store.segment.pool[thief.block_ids] == 7.0).all())    # untouched
    assert not core.has_work() and core.lease_ids() == []
    store.release("thief", thief.lease_id)
    assert store.pool.idle()


def test_a_restarted_store_is_a_new_epoch_the_worker_reattaches_to(model, store):
    """The store dies and another takes its address: a fresh segment, other lease ids.
    Handles from the old epoch are refused; the next prompt re-attaches and is served."""
    class Swappable:
        def __init__(self, s):
            self.s = s

        def __getattr__(self, name):
            return getattr(self.s, name)

    port = Swappable(store)
    pre = WorkerCore("prefill-0", "prefill", engine(model), port)
    dec = WorkerCore("decode-0", "decode", engine(model), port)
    pre.handle(prefill_req("old"))
    [done] = run(pre)
    pre.handle(prefill_req("queued"))                  # held here when the store dies
    new = KVStore(num_blocks=32, block_size=16, num_layers=2, num_kv_heads=2, head_dim=16,
                  dtype="float32")
    try:
        assert new.epoch != store.epoch and new.segment.name != store.segment.name
        port.s = new
        [err] = dec.handle(handoff(done))              # an old-epoch lease: refused
        assert err.code == "not_found" and "unknown" in err.message
        with pytest.raises(KVStoreError, match="unknown"):
            new.release("old", done.lease_id)          # old lease ids mean nothing here
        msgs = pre.handle(prefill_req("fresh"))
        assert [(m.request_id, m.code) for m in msgs] == [("queued", "unavailable")]
        assert pre.pool_info.handle.base == new.segment.name
        [done2] = run(pre)
        assert done2.kv.handle.base == new.segment.name and done2.first_token == done.first_token
        assert dec.handle(handoff(done2)) == []        # the decode side re-attaches too
        got = [done2.first_token] + [t for b in run(dec) for t in b.ids]
        assert got == reference(model)
        assert new.pool.idle()
        [err] = dec.handle(handoff(done))              # and refuses the old pool by name
        assert err.code == "stale_kv" and "no longer serves" in err.message
    finally:
        new.close()


def _flip(store, block, byte=100):
    raw = store.segment.pool[block].view(torch.uint8).view(-1)
    raw[byte] ^= 0x10


def test_a_corrupted_block_is_never_decoded_from(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec_engine = engine(model)
    dec = WorkerCore("decode-0", "decode", dec_engine, store)
    pre.handle(prefill_req())
    [done] = run(pre)
    assert len(done.kv.checksums) == 3                      # one per block of the prompt
    _flip(store, done.kv.block_ids[1])                      # a bit rots in the store
    [err] = dec.handle(handoff(done))
    assert err.code == "kv_corrupt" and f"blocks [{done.kv.block_ids[1]}]" in err.message
    assert not dec.decode_jobs and dec.status()["kv_checksum_failures"] == 1
    assert_idle(dec_engine)
    assert store.pool.idle()                                # the claim was released
    # the bad block left the prefix index: the same prompt reuses block 0 only
    pre.handle(prefill_req("r2"))
    [done2] = run(pre)
    assert done2.num_cached_tokens == 16
    assert dec.handle(handoff(done2)) == []
    got = [done2.first_token] + [t for b in run(dec) for t in b.ids]
    assert got == reference(model)
    assert_idle(dec_engine) and store.pool.idle()


def test_prefill_checks_the_cached_prefix_before_using_it(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    pre.handle(prefill_req())
    [done] = run(pre)
    store.release("r1", done.lease_id)
    _flip(store, done.kv.block_ids[0])
    [err] = pre.handle(prefill_req("r2"))
    assert err.code == "kv_corrupt" and err.request_id == "r2" and not pre.prefill_jobs
    assert store.pool.idle() and pre.checksum_failures == 1
    pre.handle(prefill_req("r3"))                           # nothing cached is trusted now
    [done3] = run(pre)
    assert done3.num_cached_tokens == 0 and done3.first_token == done.first_token
    store.release("r3", done3.lease_id)


def test_verify_off_skips_the_check(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec = WorkerCore("decode-0", "decode", engine(model), store, kv_verify="off")
    pre.handle(prefill_req())
    [done] = run(pre)
    _flip(store, done.kv.block_ids[2], byte=4)
    assert dec.handle(handoff(done)) == []
    run(dec)
    with pytest.raises(ValueError, match="kv_verify='some' must be one of"):
        WorkerCore("decode-1", "decode", engine(model), store, kv_verify="some")


def test_a_decode_worker_on_another_host_takes_the_handoff_over_tcp(model, store):
    """kv_transport tcp: the decode side never maps the pool; its blocks come as frames."""
    pre = WorkerCore("prefill-0", "prefill", engine(model), store)
    dec_engine = engine(model)
    dec = WorkerCore("decode-0", "decode", dec_engine, store, kv_transport="tcp")
    assert dec.pool is None and dec.prefill is None and dec.status()["kv_transport"] == "tcp"
    pre.handle(prefill_req())
    [done] = run(pre)
    assert dec.handle(handoff(done)) == []
    got = [done.first_token] + [t for b in run(dec) for t in b.ids]
    assert got == reference(model)
    assert store.stats().read_blocks == 3 and store.pool.idle()
    assert_idle(dec_engine)
    # the checksum guards the wire path too
    pre.handle(prefill_req("r2"))
    [done2] = run(pre)
    _flip(store, done2.kv.block_ids[2])
    [err] = dec.handle(handoff(done2))
    assert err.code == "kv_corrupt" and "after the tcp read" in err.message
    assert store.pool.idle() and not dec.decode_jobs
    with pytest.raises(ValueError, match="role prefill needs a KV store whose pool it maps"):
        WorkerCore("prefill-1", "prefill", engine(model), store, kv_transport="tcp")
    with pytest.raises(ValueError, match="--kv-transport cuda_ipc cannot reach a pool in shm"):
        WorkerCore("decode-1", "decode", engine(model), store, kv_transport="cuda_ipc")


def test_the_store_reads_only_a_leases_own_blocks(store):
    lease = store.acquire("a", list(range(1, 40)), "prefill-0")
    got = store.read("a", lease.lease_id, lease.block_ids[:2])
    assert got.block_ids == lease.block_ids[:2] and len(got.frames) == 2
    assert got.frames[0].nbytes == 2 * 2 * 16 * 2 * 16 * 4
    other = [b for b in range(32) if b not in lease.block_ids][0]
    with pytest.raises(KVStoreError, match=rf"blocks \[{other}\] are not in lease"):
        store.read("a", lease.lease_id, [other])
    with pytest.raises(KVStoreError, match="33 blocks in one read; at most 32"):
        store.read("a", lease.lease_id, [lease.block_ids[0]] * 33)
    store.release("a", lease.lease_id)
