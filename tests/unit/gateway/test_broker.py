"""The gateway's Broker without sockets: every event in, exactly what it sends out."""
from __future__ import annotations

import pytest

from services.gateway.backend import ChoiceRequest, GenEvent, Overloaded
from services.gateway.broker import Broker, Flight, Stage
from shared import protocol as P
from shared.buffers.handle import BufferHandle
from shared.engine.sampling_params import SamplingParams

PROMPT = list(range(1, 41))   # 40 tokens: 3 blocks of 16
HANDLE = BufferHandle(backend="shm", base="duet-kv-test", offset=0, nbytes=4 * 64,
                      dtype="float32", shape=[64])


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


def broker(clock, **kw) -> Broker:
    return Broker(heartbeat_s=0.5, liveness=6, clock=clock, wall_clock=clock, **kw)


def register(b, worker_id, role, free=100, max_seqs=64):
    out = b.on_message(worker_id.encode(), P.Register(
        worker_id=worker_id, role=role, model="m", devices=["cpu"], max_batch_tokens=512,
        total_blocks=100, free_blocks=free, max_seqs=max_seqs))
    return out


def beat(b, worker_id, role=None, free=100):
    w = next(w for w in b.router.workers.values() if w.worker_id == worker_id)
    return b.on_message(worker_id.encode(), P.Heartbeat(
        worker_id=worker_id, role=role or w.role, free_blocks=free, running=0, waiting=0,
        queued_tokens=0))


def flight(rid="r1", max_tokens=8, tenant="anonymous") -> Flight:
    return Flight(ChoiceRequest(rid, PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens),
                                arrival=0.0, tenant=tenant), reply_to=rid)


def prefill_done(rid="r1", token=7, lease=5, finish=None) -> P.PrefillDone:
    return P.PrefillDone(request_id=rid, first_token=token, lease_id=lease,
                         kv=P.KVRef(handle=HANDLE, block_ids=[3, 4, 5], generations=[1, 1, 1],
                                    num_tokens=len(PROMPT)),
                         num_cached_tokens=16, num_computed_tokens=24, finish_reason=finish,
                         timings={"prefill_queue": 0.01, "prefill_compute": 0.2})


def tokens(rid="r1", ids=(8,), finish=None) -> P.TokenBatch:
    return P.TokenBatch(request_id=rid, ids=list(ids), finish_reason=finish)


def sent(out, kind=None):
    return [(ident.decode(), m) for ident, m in out.sends if kind is None or isinstance(m, kind)]


def events(out):
    return [ev for _, ev in out.deliveries]


def test_disaggregated_flight_prefills_hands_off_and_decodes(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    f = flight()
    out = b.start(f)
    [(who, req)] = sent(out)
    assert who == "prefill-0" and isinstance(req, P.PrefillRequest)
    assert req.prompt_ids == PROMPT and req.sampling.max_tokens == 8
    assert f.stage == Stage.PREFILLING and not out.deliveries

    out = b.on_message(b"prefill-0", prefill_done())
    [first] = events(out)
    assert first.token_ids == [7] and first.finish_reason is None
    assert first.num_cached_tokens == 16 and first.timings["prefill_compute"] == 0.2
    [(who, dec)] = sent(out)
    assert who == "decode-0" and isinstance(dec, P.DecodeRequest)
    assert (dec.first_token, dec.lease_id, dec.kv.block_ids) == (7, 5, [3, 4, 5])
    assert f.stage == Stage.HANDING_OFF

    out = b.on_message(b"decode-0", tokens(ids=[8, 9]))
    assert [e.token_ids for e in events(out)] == [[8, 9]] and f.stage == Stage.DECODING
    out = b.on_message(b"decode-0", tokens(ids=[10], finish="length"))
    [last] = events(out)
    assert last.token_ids == [10] and last.finish_reason == "length"
    assert f.stage == Stage.DONE and not b.flights and not out.releases
    assert b.counters["dispatched"] == 1


def test_colocated_flight_runs_on_a_both_worker(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    out = b.start(flight())
    [(who, req)] = sent(out)
    assert who == "both-0" and isinstance(req, P.DecodeRequest) and req.kv is None
    out = b.on_message(b"both-0", tokens(ids=[1, 2], finish="stop"))
    assert events(out)[0].finish_reason == "stop" and not b.flights


def test_token_one_that_ends_the_request_skips_decode(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    b.start(flight(max_tokens=1))
    out = b.on_message(b"prefill-0", prefill_done(finish="length"))
    assert [e.finish_reason for e in events(out)] == ["length"]
    assert not out.sends and not out.releases and not b.flights   # prefill released it itself


def test_no_worker_is_a_503_naming_the_drained(clock):
    b = broker(clock)
    [(_, ev)] = b.start(flight("r0")).deliveries
    assert isinstance(ev, Overloaded) and "no worker can serve" in str(ev)
    register(b, "both-0", "both")
    b.set_drain("both-0", True)
    [(_, ev)] = b.start(flight()).deliveries
    assert isinstance(ev, Overloaded) and "drained: both-0" in str(ev)
    assert not b.health()["ok"]


def test_a_queued_flight_waits_for_a_worker_then_expires(clock):
    b = broker(clock, queue_timeout_s=10.0)
    f = flight()
    out = b.start(f)
    assert not out.sends and not out.deliveries and f.stage == Stage.QUEUED
    assert b.health()["queued"] == 1
    out = register(b, "both-0", "both")            # a worker arrives: dispatched at once
    assert [type(m) for _, m in sent(out)] == [P.DecodeRequest] and f.stage == Stage.DECODING

    g = flight("r2")
    b.set_drain("both-0", True)
    b.start(g)
    clock.t += 5
    beat(b, "both-0")
    assert not b.tick().deliveries and g.stage == Stage.QUEUED
    clock.t += 6
    beat(b, "both-0")
    [(reply_to, ev)] = b.tick().deliveries
    assert reply_to == "r2" and isinstance(ev, Overloaded) and "waited 11s" in str(ev)


def test_worker_silent_past_the_timeout_is_purged_and_its_flight_redispatched(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "prefill-1", "prefill")
    register(b, "decode-0", "decode")
    f = flight()
    [(first_pick, _)] = sent(b.start(f))
    other = ({"prefill-0", "prefill-1"} - {first_pick}).pop()
    out = b.tick()
    assert {who for who, m in sent(out, P.Ping)} == {"prefill-0", "prefill-1", "decode-0"}
    for _ in range(5):                 # 2.5 s of heartbeats from everyone but first_pick
        clock.t += 0.5
        beat(b, other)
        beat(b, "decode-0")
        assert not [m for _, m in sent(b.tick()) if not isinstance(m, P.Ping)]
    clock.t += 0.6                     # past the 3 s timeout (0.5 s x liveness 6)
    beat(b, other)
    beat(b, "decode-0")
    out = b.tick()
    assert [(who, type(m)) for who, m in sent(out) if not isinstance(m, P.Ping)] == \
        [(other, P.PrefillRequest)]
    assert f.worker == other.encode() and f.retries == 1 and not out.deliveries
    assert first_pick not in {w.worker_id for w in b.router.workers.values()}
    assert b.counters["worker_deaths"] == 1 and b.counters["redispatched"] == 1
    # a late PrefillDone from the purged worker is not taken for the live flight
    out = b.on_message(first_pick.encode(), prefill_done())
    assert not out.deliveries and [type(m) for _, m in sent(out)] == [P.ErrorReply]


def test_a_worker_lost_after_tokens_ends_its_streams_with_a_clear_error(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    register(b, "both-1", "both")
    fa, fb = flight("a"), flight("b")
    b.start(fa)
    b.start(fb)
    victim = fa.worker.decode()
    b.on_message(fa.worker, tokens("a", ids=[1]))
    out = b.on_message(fa.worker, P.Goodbye(worker_id=victim))
    [(reply_to, ev)] = out.deliveries
    assert reply_to == "a" and ev.finish_reason == "error"
    assert ev.error == f"request failed mid-stream: worker {victim} said goodbye"
    if fb.worker == fa.worker:      # b had no token yet: it moves to the survivor
        assert fb.retries == 1 and fb.worker != victim.encode()
    assert "b" in b.flights


def test_handoff_refused_for_room_goes_to_the_next_decode_worker(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode", free=90)
    register(b, "decode-1", "decode", free=80)
    f = flight()
    b.start(f)
    [(first, dec)] = sent(b.on_message(b"prefill-0", prefill_done()))
    assert first == "decode-0"
    out = b.on_message(b"decode-0", P.ErrorReply(code="no_blocks", message="full", request_id="r1"))
    [(second, dec2)] = sent(out)
    assert second == "decode-1" and dec2.lease_id == dec.lease_id and not out.releases
    out = b.on_message(b"decode-1", P.ErrorReply(code="no_blocks", message="full", request_id="r1"))
    assert out.releases == [("r1", 5)]            # nobody can take it: the lease goes back
    [ev] = events(out)
    assert ev.finish_reason == "error" and "no decode worker could take" in ev.error


def test_decode_worker_dying_before_its_claim_passes_the_lease_on(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode", free=90)
    register(b, "decode-1", "decode", free=80)
    f = flight()
    b.start(f)
    b.on_message(b"prefill-0", prefill_done())
    out = b.on_message(b"decode-0", P.Goodbye(worker_id="decode-0"))
    [(who, dec)] = sent(out)
    assert who == "decode-1" and dec.lease_id == 5 and f.stage == Stage.HANDING_OFF
    assert not out.deliveries


def test_abort_stops_the_flight_everywhere_and_returns_its_lease(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    b.start(flight())
    b.on_message(b"prefill-0", prefill_done())
    out = b.abort("r1")
    assert [(who, type(m)) for who, m in sent(out)] == [("decode-0", P.Abort)]
    assert out.releases == [("r1", 5)] and not b.flights
    # aborted while prefilling: the lease in a late PrefillDone is given back
    b.start(flight("r2"))
    assert [type(m) for _, m in sent(b.abort("r2"))] == [P.Abort]
    out = b.on_message(b"prefill-0", prefill_done("r2", lease=6))
    assert out.releases == [("r2", 6)] and not out.deliveries
    assert b.abort("never-started").sends == []


def test_role_flip_is_sent_and_a_stale_heartbeat_cannot_revert_it(clock):
    b = broker(clock)
    register(b, "decode-0", "decode")
    out = b.set_role("decode-0", "both")
    assert [(who, m) for who, m in sent(out)] == [("decode-0", P.SetRole(role="both"))]
    beat(b, "decode-0", role="decode")          # sent before the worker saw the flip
    assert b.health()["workers"][0]["role"] == "both"
    beat(b, "decode-0", role="both")
    clock.t += 60
    beat(b, "decode-0", role="decode")          # now the worker's own word wins
    assert b.health()["workers"][0]["role"] == "decode"
    with pytest.raises(KeyError, match="nobody"):
        b.set_role("nobody", "both")
    with pytest.raises(ValueError, match="chef"):
        b.set_role("decode-0", "chef")


def test_drain_is_kept_across_registering_again(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    assert sent(b.set_drain("both-0", True)) == [("both-0", P.Drain(enable=True))]
    out = register(b, "both-0", "both")          # it restarted
    assert sent(out) == [("both-0", P.Drain(enable=True))]
    assert b.health()["workers"][0]["draining"] and b.counters["worker_deaths"] == 1
    b.set_drain("both-0", False)
    assert [type(m) for _, m in sent(b.start(flight()))] == [P.DecodeRequest]


def test_unregistered_peers_are_told_once_a_second(clock):
    b = broker(clock)
    hb = P.Heartbeat(worker_id="x", role="both", free_blocks=1, running=0, waiting=0,
                     queued_tokens=0)
    assert [m.code for _, m in sent(b.on_message(b"x", hb))] == ["not_found"]
    assert sent(b.on_message(b"x", hb)) == []
    clock.t += 1.5
    assert len(sent(b.on_message(b"x", hb))) == 1
    assert sent(b.on_message(b"x", P.Goodbye(worker_id="x"))) == []


def test_tokens_from_a_worker_that_does_not_hold_the_flight_are_dropped(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    register(b, "both-1", "both")
    f = flight()
    b.start(f)
    other = b"both-1" if f.worker == b"both-0" else b"both-0"
    assert not b.on_message(other, tokens(ids=[1])).deliveries
    assert f.tokens_sent == 0


def test_worker_errors_before_and_after_tokens(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    b.start(flight("a"))
    [(_, ev)] = b.on_message(b"both-0", P.ErrorReply(code="unavailable", message="KV store down",
                                                      request_id="a")).deliveries
    assert isinstance(ev, Overloaded) and "KV store down" in str(ev)   # a 503, retryable
    b.start(flight("b"))
    b.on_message(b"both-0", tokens("b", ids=[3]))
    [(_, ev)] = b.on_message(b"both-0", P.ErrorReply(code="internal", message="boom",
                                                      request_id="b")).deliveries
    assert isinstance(ev, GenEvent) and ev.error == "internal: boom"
    assert b.counters["errors"] == 2 and not b.flights


def test_shutdown_ends_every_flight(clock):
    b = broker(clock)
    register(b, "both-0", "both")
    b.start(flight("a"))
    b.start(flight("b"))
    out = b.shutdown("gateway shutting down")
    assert sorted(r for r, _ in out.deliveries) == ["a", "b"]
    assert all(ev.error == "gateway shutting down" for ev in events(out)) and not b.flights


def test_a_lost_worker_is_named_so_the_store_drops_its_leases(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    out = b.on_message(b"prefill-0", P.Goodbye(worker_id="prefill-0"))
    assert out.lost_workers == ["prefill-0"]
    assert b.tick().lost_workers == []


def test_the_mesh_runs_no_more_than_its_decode_slots_and_queues_the_rest(clock):
    b = broker(clock, queue_timeout_s=30)
    register(b, "both-0", "both", max_seqs=2)
    for rid in ("a", "b", "c"):
        b.start(flight(rid))
    assert [b.flights[r].stage for r in "abc"] == [Stage.DECODING, Stage.DECODING, Stage.QUEUED]
    assert b.health()["capacity"] == 2 and b.health()["queued"] == 1
    out = b.on_message(b"both-0", tokens("a", ids=[1], finish="stop"))   # a slot frees
    assert [(who, m.request_id) for who, m in sent(out)] == [("both-0", "c")]


def test_queued_flights_leave_in_turn_across_tenants(clock):
    b = broker(clock, queue_timeout_s=30)
    register(b, "both-0", "both", max_seqs=1)
    b.start(flight("greedy-0", tenant="key-1"))            # runs
    for i in range(1, 5):
        b.start(flight(f"greedy-{i}", tenant="key-1"))     # queued
    b.start(flight("polite", tenant="key-2"))              # queued after all of them
    order = []
    for rid in ["greedy-0", None, None, None]:
        running = rid or order[-1]
        out = b.on_message(b"both-0", tokens(running, ids=[1], finish="stop"))
        order += [m.request_id for _, m in sent(out, P.DecodeRequest)]
    assert order == ["greedy-1", "polite", "greedy-2", "greedy-3"]


def test_a_503_says_when_to_retry(clock):
    b = broker(clock)
    [(_, ev)] = b.start(flight()).deliveries
    assert isinstance(ev, Overloaded) and ev.retry_after_s >= 1


def test_slow_is_not_stuck_and_stuck_is_dropped(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "prefill-1", "prefill")
    register(b, "decode-0", "decode")
    f = flight()
    b.start(f)
    held = f.worker.decode()

    def hb(busy, expected):
        return b.on_message(held.encode(), P.Heartbeat(
            worker_id=held, role="prefill", free_blocks=100, running=1, waiting=0,
            queued_tokens=40, busy_s=busy, expected_s=expected))
    assert not hb(25.0, 1.0).sends               # a long step, heart-beating: slow
    assert not hb(45.0, 5.0).sends               # 45 s is within 10 x its expected 5 s
    out = hb(45.0, 1.0)                          # 45 s for a 1 s step: stuck
    assert out.lost_workers == [held] and f.retries == 1
    assert [type(m) for _, m in sent(out)] == [P.PrefillRequest] and f.worker != held.encode()


def test_a_handoff_waits_for_a_decode_worker_keeping_its_lease_alive(clock):
    """The only decode worker died before claiming; its restart (same id, new process)
    takes the hand-off, and the lease is renewed while the flight waits."""
    b = broker(clock, queue_timeout_s=30)
    register(b, "prefill-0", "prefill")
    b.on_message(b"decode-0", P.Register(worker_id="decode-0", role="decode", model="m",
                                         devices=["cpu"], max_batch_tokens=512, total_blocks=100,
                                         free_blocks=100, incarnation="aaaa"))
    f = flight()
    b.start(f)
    b.on_message(b"prefill-0", prefill_done())
    out = b.on_message(b"decode-0", P.Goodbye(worker_id="decode-0"))   # died before claiming
    assert not out.sends and not out.deliveries and not out.releases
    assert f.stage == Stage.HANDING_OFF and b.health()["waiting_handoffs"] == 1
    clock.t += 6
    beat(b, "prefill-0")
    assert b.tick().renewals == [5]
    out = b.on_message(b"decode-0", P.Register(worker_id="decode-0", role="decode", model="m",
                                               devices=["cpu"], max_batch_tokens=512,
                                               total_blocks=100, free_blocks=100,
                                               incarnation="bbbb"))
    [(who, dec)] = sent(out, P.DecodeRequest)
    assert who == "decode-0" and dec.lease_id == 5 and not b.waiting_handoffs
    # and one that waits past the queue timeout gives its lease back and ends clearly
    g = flight("r2")
    b.start(g)
    b.on_message(g.worker, prefill_done("r2", lease=6))
    b.on_message(b"decode-0", P.Goodbye(worker_id="decode-0"))
    clock.t += 31
    beat(b, "prefill-0")
    out = b.tick()
    assert ("r2", 6) in out.releases and any(
        e.finish_reason == "error" for r, e in out.deliveries if r == "r2")


def test_corrupt_kv_at_the_claim_is_prefilled_again_keeping_token_one(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    f = flight()
    b.start(f)
    out = b.on_message(b"prefill-0", prefill_done(token=7, lease=5))
    assert [e.token_ids for e in events(out)] == [[7]]
    out = b.on_message(b"decode-0", P.ErrorReply(code="kv_corrupt", request_id="r1",
                                                 message="KV checksum mismatch: blocks [4]"))
    # the lease goes back, nothing reaches the client, the prompt goes to prefill again
    assert out.releases == [("r1", 5)] and not out.deliveries
    [(who, req)] = sent(out)
    assert who == "prefill-0" and isinstance(req, P.PrefillRequest)
    assert b.counters["kv_checksum_failures"] == 1 and f.stage == Stage.PREFILLING
    # the new prefill sampled token 9, but the client already has 7: decode continues from 7
    out = b.on_message(b"prefill-0", prefill_done(token=9, lease=6))
    assert not out.deliveries
    [(who, dec)] = sent(out)
    assert who == "decode-0" and (dec.first_token, dec.lease_id) == (7, 6)
    out = b.on_message(b"decode-0", tokens(ids=[8], finish="length"))
    assert [e.token_ids for e in events(out)] == [[8]] and not b.flights
    assert b.stats()["kv_checksum_failures"] == 1


def test_corrupt_kv_again_and_again_ends_with_a_clear_error(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    b.start(flight())
    for lease in (5, 6, 7):
        b.on_message(b"prefill-0", prefill_done(lease=lease))
        out = b.on_message(b"decode-0", P.ErrorReply(code="kv_corrupt", request_id="r1",
                                                     message="KV checksum mismatch"))
    [ev] = events(out)
    assert ev.finish_reason == "error" and "kv_corrupt" in ev.error and not b.flights
    assert b.counters["kv_checksum_failures"] == 3


def test_corrupt_cached_prefix_found_by_prefill_is_dispatched_again(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register(b, "decode-0", "decode")
    f = flight()
    b.start(f)
    out = b.on_message(b"prefill-0", P.ErrorReply(code="kv_corrupt", request_id="r1",
                                                  message="KV checksum mismatch in the prefix"))
    [(who, req)] = sent(out)
    assert who == "prefill-0" and isinstance(req, P.PrefillRequest) and not out.deliveries
    assert b.counters["kv_checksum_failures"] == 1 and f.retries == 1


# -- layer-wise hand-offs -------------------------------------------------------------------
def register_tcp(b, worker_id, free=100):
    return b.on_message(worker_id.encode(), P.Register(
        worker_id=worker_id, role="decode", model="m", devices=["cpu"], max_batch_tokens=512,
        total_blocks=100, free_blocks=free, kv_transport="tcp"))


def started(rid="r1", lease=5) -> P.PrefillStarted:
    return P.PrefillStarted(request_id=rid, lease_id=lease,
                            kv=P.KVRef(handle=HANDLE, block_ids=[3, 4, 5], generations=[1, 1, 1],
                                       num_tokens=len(PROMPT)))


def test_a_decode_worker_reading_over_tcp_prefetches_and_gets_the_handoff(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register_tcp(b, "decode-0")
    f = flight()
    b.start(f)
    out = b.on_message(b"prefill-0", started())
    [(who, pre)] = sent(out)
    assert who == "decode-0" and isinstance(pre, P.KVPrefetch)
    assert (pre.request_id, pre.lease_id, pre.kv.block_ids) == ("r1", 5, [3, 4, 5])
    assert b.router.workers[b"decode-0"].free_blocks == 97   # 48 tokens' blocks reserved
    out = b.on_message(b"prefill-0", prefill_done())
    [(who, dec)] = sent(out)
    assert who == "decode-0" and isinstance(dec, P.DecodeRequest) and dec.lease_id == 5
    assert b.router.workers[b"decode-0"].free_blocks == 97   # not reserved twice
    # a worker that maps the pool gets no prefetch: its copy is quick
    b2 = broker(clock)
    register(b2, "prefill-0", "prefill")
    register(b2, "decode-0", "decode")
    b2.start(flight())
    assert sent(b2.on_message(b"prefill-0", started())) == []


def test_a_prefetching_worker_that_dies_or_loses_the_request_is_told_to_drop_it(clock):
    b = broker(clock)
    register(b, "prefill-0", "prefill")
    register_tcp(b, "decode-0", free=100)
    register_tcp(b, "decode-1", free=90)
    f = flight()
    b.start(f)
    b.on_message(b"prefill-0", started())
    assert f.prefetch_to == b"decode-0"
    b.set_drain("decode-0", True)                 # drained meanwhile: the hand-off goes on
    out = b.on_message(b"prefill-0", prefill_done())
    assert [(w, type(m).__name__) for w, m in sent(out)] == [("decode-0", "Abort"),
                                                            ("decode-1", "DecodeRequest")]
    # the client goes away during prefill: the prefill worker and the prefetcher let go
    b.set_drain("decode-0", False)
    b.start(flight("r2"))
    b.on_message(b"prefill-0", started("r2", lease=6))
    out = b.abort("r2")
    assert sorted((w, type(m).__name__) for w, m in sent(out)) == [("decode-0", "Abort"),
                                                                  ("prefill-0", "Abort")]
    # the prefill worker dies: the flight is prefilled again, the old prefetch dropped
    register(b, "prefill-1", "prefill")
    f3 = flight("r3")
    b.start(f3)
    holder = f3.worker.decode()
    b.on_message(f3.worker, started("r3", lease=7))
    fetcher = f3.prefetch_to.decode()
    clock.t += 10                                  # only the other workers heart-beat
    for w in ("decode-0", "decode-1", "prefill-1" if holder == "prefill-0" else "prefill-0"):
        beat(b, w)
    out = b.tick()
    assert [w for w, m in sent(out, P.Abort) if m.request_id == "r3"] == [fetcher]
    assert f3.worker != holder.encode() and f3.prefetch_to is None
    # and a prefill that ends the request at token 1 drops the prefetch too
    f4 = flight("r4")
    b.start(f4)
    b.on_message(f4.worker, started("r4", lease=8))
    fetcher = f4.prefetch_to.decode()
    out = b.on_message(f4.worker, prefill_done("r4", lease=8, finish="stop"))
    assert [w for w, m in sent(out, P.Abort)] == [fetcher] and f4.prefetch_to is None
