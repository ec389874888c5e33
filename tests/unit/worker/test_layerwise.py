"""The layer-wise hand-off without sockets: a prefill WorkerCore publishing each layer of a
chunked prompt, the store serving only written layers, a decode WorkerCore (tcp) fetching
them while prefill runs, then decoding the reference tokens from what it fetched."""
from __future__ import annotations

import pytest
import torch

from services.kvstore.port import KVStoreError
from services.kvstore.store import KVStore
from services.worker.core import WorkerCore
from shared import protocol as P
from shared.config import EngineConfig
from shared.engine.engine import LLMEngine
from shared.engine.sampling_params import SamplingParams
from shared.models.loader import load_model
from shared.wire import spec_from_params
from tests.conftest import assert_idle, save_tiny_model

PROMPT = list(range(3, 40))            # 37 tokens: blocks of 16, 16 and 5
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LAYERS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = save_tiny_model(tmp_path_factory.mktemp("tiny"))   # 2 layers, 2 kv heads, d 16
    return path, load_model(path, "float32")


def engine(model, chunk=16) -> LLMEngine:
    path, m = model
    return LLMEngine(m, EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64,
                                     max_num_batched_tokens=chunk), eos_token_ids=(2,))


@pytest.fixture
def store():
    s = KVStore(num_blocks=32, block_size=16, num_layers=LAYERS, num_kv_heads=2, head_dim=16,
                dtype="float32", lease_ttl_s=30)
    yield s
    s.close()


def prefill_req(rid="r1") -> P.PrefillRequest:
    return P.PrefillRequest(request_id=rid, prompt_ids=PROMPT, sampling=spec_from_params(PARAMS),
                            arrival_ts=0.0)


def reference(model) -> list[int]:
    return engine(model, 64).generate([PROMPT], PARAMS)[0][0]


def test_prefill_publishes_each_layer_of_each_chunk_and_the_store_serves_only_those(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store, layerwise_min_tokens=16)
    [started] = pre.handle(prefill_req())
    assert isinstance(started, P.PrefillStarted) and started.kv.num_tokens == 37
    blocks = started.kv.block_ids
    assert len(blocks) == 3 and store.segment.progress[blocks].tolist() == [0, 0, 0]
    seen = []   # progress of the first block as layer 1 starts: layer 0 is out already
    hook = pre.decode.model.layers[1].register_forward_pre_hook(
        lambda *_: seen.append(int(store.segment.progress[blocks[0]])))
    try:
        assert pre.step() == []                          # chunk 1: tokens 0..15
        assert seen == [1]
        assert store.segment.progress[blocks].tolist() == [LAYERS, 0, 0]
        got = store.read("r1", started.lease_id, blocks, [0, 0, 0])
        assert got.upto_layers == [LAYERS, 0, 0] and len(got.frames) == 1
        assert got.frames[0].nbytes == LAYERS * 2 * 16 * 2 * 16 * 4
        again = store.read("r1", started.lease_id, blocks, [LAYERS, 0, 0])
        assert again.frames == () or list(again.frames) == []   # nothing new: no frame
        assert pre.step() == []                          # chunk 2: tokens 16..31
        assert store.segment.progress[blocks].tolist() == [LAYERS, LAYERS, 0]
        [done] = pre.step()                              # chunk 3: 32..36, the last block
    finally:
        hook.remove()
    assert isinstance(done, P.PrefillDone)
    assert store.segment.progress[blocks].tolist() == [LAYERS] * 3
    [timeline] = [h for h in store.status()["ledger"] if h["lease_id"] == done.lease_id]
    store.release("r1", done.lease_id)
    [line] = store.status()["handoffs"]
    assert line["layers_read"] == LAYERS and line["layers_read_before_commit"] == LAYERS
    assert 0 < line["first_read_ts"] < line["written_ts"] <= line["committed_ts"]
    assert timeline["claimed"] is False and store.pool.idle()
    # a short prompt is not announced; the bad read is refused naming the layers
    pre2 = WorkerCore("prefill-1", "prefill", engine(model), store, layerwise_min_tokens=64)
    assert pre2.handle(prefill_req("r2")) == []
    lease = next(iter(pre2.prefill_jobs.values())).lease
    with pytest.raises(KVStoreError, match=r"from_layers \[3, 0, 0\] must give one layer in \[0, 2\]"):
        store.read("r2", lease.lease_id, lease.block_ids, [3, 0, 0])
    pre2.abort("r2")
    assert store.pool.idle()


def handoff(done: P.PrefillDone) -> P.DecodeRequest:
    return P.DecodeRequest(request_id=done.request_id, prompt_ids=PROMPT,
                           sampling=spec_from_params(PARAMS), first_token=done.first_token,
                           kv=done.kv, lease_id=done.lease_id)


def test_decode_over_tcp_fetches_layers_while_prefill_runs_and_decodes_the_reference(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model), store, layerwise_min_tokens=16)
    dec_engine = engine(model, 64)
    dec = WorkerCore("decode-0", "decode", dec_engine, store, kv_transport="tcp")
    [started] = pre.handle(prefill_req())
    assert dec.handle(P.KVPrefetch(request_id="r1", kv=started.kv, lease_id=started.lease_id)) == []
    job = dec.prefetcher.jobs["r1"]
    pre.step()
    dec.prefetcher.poll(store)
    assert job.have == [LAYERS, 0, 0] and not job.done.is_set()
    pre.step()
    job.next_poll = 0.0
    dec.prefetcher.poll(store)
    assert job.have == [LAYERS, LAYERS, 0]
    [done] = pre.step()
    assert dec.handle(handoff(done)) == []       # takes the job, fetches the last block
    assert dec.prefetcher.stats["used"] == 1 and not dec.prefetcher.jobs
    got = [done.first_token] + [t for b in _run(dec) for t in b.ids]
    assert got == reference(model)
    assert store.stats().read_blocks == 3 and store.pool.idle()
    [line] = store.status()["handoffs"]
    assert line["layers_read"] == 3 * LAYERS and line["layers_read_before_commit"] == 2 * LAYERS
    assert_idle(dec_engine)


def test_a_corrupted_prefetch_is_never_decoded_and_a_lost_lease_falls_back(model, store):
    pre = WorkerCore("prefill-0", "prefill", engine(model, 64), store, layerwise_min_tokens=16)
    dec = WorkerCore("decode-0", "decode", engine(model, 64), store, kv_transport="tcp")
    [started] = pre.handle(prefill_req())
    dec.handle(P.KVPrefetch(request_id="r1", kv=started.kv, lease_id=started.lease_id))
    [done] = pre.step()
    job = dec.prefetcher.jobs["r1"]
    dec.prefetcher.poll(store)
    assert job.done.is_set() and job.have == [LAYERS] * 3
    job.staging.view(torch.uint8)[1, 0, 0, 3, 1, 7] ^= 0x10   # a bit flipped in transit
    [err] = dec.handle(handoff(done))
    assert err.code == "kv_corrupt" and "after the layer-wise tcp read" in err.message
    assert dec.checksum_failures == 1 and store.stats().evicted_blocks == 1
    assert store.pool.idle() and not dec.decode_jobs
    # the prefill of r2 dies (its lease released): the prefetch fails, and the hand-off of
    # a new prefill (another lease) is read whole over tcp instead
    [started] = pre.handle(prefill_req("r2"))
    dec.handle(P.KVPrefetch(request_id="r2", kv=started.kv, lease_id=started.lease_id))
    pre.abort("r2")
    dec.prefetcher.poll(store)
    assert isinstance(dec.prefetcher.jobs["r2"].error, KVStoreError)
    pre.handle(prefill_req("r2"))
    [done2] = pre.step()
    assert dec.handle(handoff(done2)) == [] and dec.prefetcher.stats["used"] == 1   # r1's
    got = [done2.first_token] + [t for b in _run(dec) for t in b.ids]
    assert got == reference(model)
    assert store.pool.idle() and not dec.prefetcher.jobs


def test_prefetch_staging_is_bounded_and_aborts_free_it(model, store):
    dec = WorkerCore("decode-0", "decode", engine(model), store, kv_transport="tcp",
                     prefetch_max_bytes=40_000)       # one 3-block prompt is 24,576 bytes
    lease = store.acquire("a", PROMPT, "prefill-0")
    kv = P.KVRef(handle=store.info.handle, block_ids=lease.block_ids,
                 generations=lease.generations, num_tokens=37)
    dec.handle(P.KVPrefetch(request_id="a", kv=kv, lease_id=lease.lease_id))
    dec.handle(P.KVPrefetch(request_id="b", kv=kv, lease_id=lease.lease_id))
    assert list(dec.prefetcher.jobs) == ["a"] and dec.prefetcher.stats["refused"] == 1
    assert dec.status()["kv_prefetch"]["started"] == 1
    dec.handle(P.Abort(request_id="a"))
    assert dec.prefetcher.bytes_held == 0
    store.release("a", lease.lease_id)


def _run(core: WorkerCore, max_steps=100) -> list[P.Msg]:
    out = []
    for _ in range(max_steps):
        if not core.has_work():
            return out
        out += core.step()
    raise AssertionError("the core did not finish")
