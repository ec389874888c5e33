"""The gateway's broker as pure logic: flights, dispatch and the worker table.

No sockets, no threads. Each method takes one event — a new request, an abort, an
operator command, a worker's message, the passing of time — and returns an Outbox: the
(identity, message) pairs to send to workers, the events for the request threads waiting
on their flights, and the store leases to give back (one by one, or all of a lost
worker's). broker_client.py runs it on one
thread behind the sockets; tests drive it directly.

A flight is one choice's life:

    queued -> prefilling -> handing_off -> decoding -> done     (disaggregated)
    queued -> decoding -> done                                   (colocated: a 'both' worker)

A flight waits in `queued` (at most queue_timeout_s) while no worker can take it, or
while the mesh already runs as many requests as its decode slots hold (Router.capacity);
queued flights leave in turn across tenants (API keys), oldest first within each, so
one client's burst cannot starve another's requests. A
worker that is lost (silent past the timeout, said goodbye, registered again) has its
flights re-dispatched when no token of theirs reached the client yet (at most
MAX_RETRIES times), and the others end with an error naming the worker. A hand-off not
yet claimed (the decode worker refused it for want of room, or died first) goes to the
next decode worker with the same lease.

Layer-wise: a prefill worker announces a long prompt's blocks as soon as it holds them
(PrefillStarted). When the decode worker this flight would go to reads hand-offs over tcp,
it is told now (KVPrefetch) and fetches each layer while prefill computes the next ones;
the hand-off then goes to that worker, unless it died, drained or refused meanwhile (it
is told to drop the prefetch).
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from services.gateway.backend import ChoiceRequest, GenEvent, Overloaded
from services.gateway.router import Router, WorkerInfo
from shared import protocol as P
from shared.transport import PeerTable, stuck_after_s
from shared.wire import spec_from_params

log = logging.getLogger("duet.gateway")
MAX_RETRIES = 2
# worker error codes that mean "not now" rather than "this request is bad": before any
# token reached the client they become a 503, so the client may retry
UNAVAILABLE_CODES = ("no_blocks", "unavailable", "overloaded")
RETRY_AFTER_S = 2   # what a 503 tells the client to wait
RENEW_EVERY_S = 5.0  # how often a waiting hand-off's lease is renewed (well inside its TTL)


class Stage(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    HANDING_OFF = "handing_off"
    DECODING = "decoding"
    DONE = "done"


@dataclass
class Flight:
    request: ChoiceRequest
    reply_to: Any                         # where the loop delivers this flight's events
    stage: Stage = Stage.QUEUED
    worker: bytes | None = None           # who holds it now
    tokens_sent: int = 0
    retries: int = 0
    queued_at: float = 0.0                # broker clock
    t_dispatch: float = 0.0               # wall clock, for the gateway_queue stage
    handoff: P.PrefillDone | None = None  # prefill's result, until a decode worker claims it
    tried_decode: set = field(default_factory=set)   # incarnations that refused or died
    handoff_since: float | None = None    # broker clock: waiting for a decode worker since
    kept_first: P.PrefillDone | None = None   # prefilled again after corrupt KV: token 1 as sent
    renewed_at: float = 0.0               # broker clock: its lease last renewed while waiting
    prefetch_to: bytes | None = None      # the decode worker fetching its KV layer by layer

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Outbox:
    sends: list[tuple[bytes, P.Msg]] = field(default_factory=list)
    deliveries: list[tuple[Any, GenEvent | Exception]] = field(default_factory=list)
    releases: list[tuple[str, int]] = field(default_factory=list)   # (request id, lease id)
    renewals: list[int] = field(default_factory=list)       # leases the gateway keeps alive
    lost_workers: list[str] = field(default_factory=list)   # the store drops their leases


class Broker:
    def __init__(self, heartbeat_s: float = 0.5, liveness: int = 6, queue_timeout_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.heartbeat_s, self.queue_timeout_s = heartbeat_s, queue_timeout_s
        self.clock, self.wall_clock = clock, wall_clock
        self.router = Router()
        self.peers = PeerTable(timeout_s=heartbeat_s * liveness, clock=clock)
        self.flights: dict[str, Flight] = {}
        self.queue: dict[str, Flight] = {}    # the queued ones, oldest first
        self.waiting_handoffs: dict[str, Flight] = {}   # prefilled, no decode worker took them yet
        self._registrations = 0
        self._turn: list[str] = []            # tenants in the order they are served next
        self.drained: set[str] = set()        # worker ids an operator drained
        self.counters = {"dispatched": 0, "redispatched": 0, "worker_deaths": 0, "errors": 0,
                         "kv_checksum_failures": 0}
        self._told: dict[bytes, float] = {}   # unregistered peers last told to register
        self._last_ping = float("-inf")
        self._out = Outbox()
        self._on_message = {P.Heartbeat: self._on_heartbeat, P.PrefillDone: self._on_prefill_done,
                            P.PrefillStarted: self._on_prefill_started,
                            P.TokenBatch: self._on_tokens, P.ErrorReply: self._on_worker_error,
                            P.Goodbye: lambda w, m: self._worker_lost(w.identity, "said goodbye"),
                            P.StatusReply: lambda w, m: None}

    def _flush(self) -> Outbox:
        out, self._out = self._out, Outbox()
        return out

    # -- events from request threads and operators -----------------------------------------
    def start(self, flight: Flight) -> Outbox:
        """A new flight: queued, then dispatched at once if its turn and a worker allow."""
        self.flights[flight.request_id] = flight
        self._enqueue(flight)
        self._dispatch_queued()
        if flight.stage == Stage.QUEUED and not self._may_wait(flight):
            self._fail(flight, self._no_worker_message(), unavailable=True)
        return self._flush()

    def abort(self, request_id: str, reason: str = "client went away") -> Outbox:
        """The client went away: stop the flight wherever it is and free what it holds."""
        f = self.flights.pop(request_id, None)
        if f is not None:
            self.queue.pop(request_id, None)
            self.waiting_handoffs.pop(request_id, None)
            w = self.router.workers.get(f.worker) if f.worker is not None else None
            if w is not None:
                w.inflight.discard(request_id)
                self._send(w.identity, P.Abort(request_id=request_id, reason=reason))
            if f.stage == Stage.HANDING_OFF:
                # the decode worker may not have claimed yet; an extra release is harmless
                self._release(f)
            self._cancel_prefetch(f, reason)
            f.stage = Stage.DONE
            self._dispatch_queued()
        return self._flush()

    def set_role(self, worker_id: str, role: str) -> Outbox:
        """Flip a worker's role; KeyError naming it when no such worker is registered."""
        if role not in P.ROLES:
            raise ValueError(f"role={role!r} must be one of {', '.join(P.ROLES)}")
        w = self._worker_named(worker_id)
        w.role = role
        # until the worker's own heartbeat says so, a heartbeat sent before the flip
        # must not revert it
        w.pending_role = (role, self.clock() + max(5.0, 4 * self.heartbeat_s))
        self._send(w.identity, P.SetRole(role=role))
        self._dispatch_queued()
        return self._flush()

    def set_drain(self, worker_id: str, enable: bool) -> Outbox:
        """Stop (enable) or resume routing new requests to a worker; what it holds
        finishes. Kept by worker id, so a worker that registers again stays drained."""
        w = self._worker_named(worker_id)
        (self.drained.add if enable else self.drained.discard)(worker_id)
        w.draining = enable
        self._send(w.identity, P.Drain(enable=enable))
        self._dispatch_queued()
        return self._flush()

    def shutdown(self, why: str) -> Outbox:
        """End every flight (the gateway is stopping)."""
        for f in list(self.flights.values()):
            self._finish(f, GenEvent([], finish_reason="error", error=why))
        return self._flush()

    # -- events from workers and the clock ---------------------------------------------------
    def on_message(self, ident: bytes, msg: P.Msg) -> Outbox:
        """One message from the peer `ident` on the worker socket."""
        if isinstance(msg, P.Register):
            self._register(ident, msg)
        elif ident not in self.router.workers:
            self._tell_to_register(ident, msg)
        else:
            self.peers.seen(ident)
            handler = self._on_message.get(type(msg))
            if handler is None:
                log.warning("worker %r sent %s, which the gateway does not take", ident,
                            type(msg).__name__)
            else:
                handler(self.router.workers[ident], msg)
        return self._flush()

    def tick(self) -> Outbox:
        """Time passed: ping workers when due, drop the silent ones, retry or expire
        queued flights."""
        now = self.clock()
        if now - self._last_ping >= self.heartbeat_s:
            self._last_ping = now
            for ident in self.router.workers:
                self._send(ident, P.Ping(sender="gateway"))
        for ident, _ in self.peers.purge():
            self._worker_lost(ident, "missed its heartbeats")
        self._dispatch_queued()
        for f in [f for f in self.queue.values() if not self._may_wait(f)]:
            self._fail(f, f"{self._no_worker_message()} (waited {now - f.queued_at:.0f}s)",
                       unavailable=True)
        self._retry_handoffs()
        return self._flush()

    # -- reports (read from other threads under the client's lock) ---------------------------
    def health(self) -> dict:
        workers = [w.as_dict() for w in self.router.workers.values()]
        roles = {w["role"] for w in workers if not w["draining"]}   # who takes new requests
        ok = bool(workers) and ("both" in roles or {"prefill", "decode"} <= roles)
        return {"ok": ok, "workers": workers, "inflight": len(self.flights),
                "counters": dict(self.counters),
                "queued": len(self.queue), "capacity": self.router.capacity(),
                "waiting_handoffs": len(self.waiting_handoffs),
                "mode": "disaggregated" if self.router.disaggregated else "colocated"}

    def stats(self) -> dict:
        return dict(self.counters, inflight=len(self.flights), workers=len(self.router.workers))

    # -- dispatch ---------------------------------------------------------------------------
    def _enqueue(self, f: Flight) -> None:
        self._cancel_prefetch(f, "prefilled again")
        f.stage, f.worker, f.queued_at = Stage.QUEUED, None, self.clock()
        self.queue[f.request_id] = f
        if f.request.tenant not in self._turn:
            self._turn.append(f.request.tenant)

    def _dispatch_queued(self) -> None:
        """Dispatch queued flights while there is room: the tenant whose turn it is sends
        its oldest, then goes to the back of the line."""
        while self.queue and len(self.flights) - len(self.queue) < self.router.capacity():
            oldest = {}
            for f in self.queue.values():
                oldest.setdefault(f.request.tenant, f)
            self._turn = [t for t in self._turn if t in oldest]
            tenant = self._turn.pop(0)
            if not self._dispatch(oldest[tenant]):
                self._turn.insert(0, tenant)
                return
            if any(f.request.tenant == tenant for f in self.queue.values()):
                self._turn.append(tenant)

    def _dispatch(self, f: Flight) -> bool:
        """Send a queued flight to a worker; False when none can take it now."""
        r = f.request
        spec = spec_from_params(r.params)
        if self.router.disaggregated:
            w = self.router.pick_prefill(r.prompt_ids)
            f.stage = Stage.PREFILLING
            msg = P.PrefillRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                                   sampling=spec, arrival_ts=r.arrival)
        else:
            w = self.router.pick_decode(len(r.prompt_ids), roles=("both",))
            if w is None:
                return False
            f.stage = Stage.DECODING
            msg = P.DecodeRequest(request_id=r.request_id, prompt_ids=r.prompt_ids, sampling=spec)
        self.queue.pop(r.request_id, None)
        f.worker, f.t_dispatch = w.identity, self.wall_clock()
        w.inflight.add(r.request_id)
        self._send(w.identity, msg)
        self.counters["dispatched"] += 1
        return True

    def _may_wait(self, f: Flight) -> bool:
        return self.clock() - f.queued_at < self.queue_timeout_s

    def _no_worker_message(self) -> str:
        drained = ", ".join(sorted(self.drained))
        return ("no worker can serve this request now (need a 'both' worker, or prefill and "
                "decode workers)" + (f"; drained: {drained}" if drained else ""))

    def _send_decode(self, f: Flight, why: str = "") -> None:
        """Offer prefill's KV (f.handoff) to a decode worker not yet tried; while none can
        take it, it waits (at most queue_timeout_s, its lease kept alive meanwhile)."""
        m, r = f.handoff, f.request
        d = self._prefetching(f)
        if d is None:
            self._cancel_prefetch(f, "handed to another decode worker")
            d = self.router.pick_decode(len(r.prompt_ids) + r.params.max_tokens,
                                        exclude=f.tried_decode)
        f.prefetch_to = None
        f.stage, f.worker = Stage.HANDING_OFF, None
        if d is None:
            now = self.clock()
            if f.handoff_since is None:
                f.handoff_since = f.renewed_at = now
            if now - f.handoff_since < self.queue_timeout_s:
                self.waiting_handoffs[f.request_id] = f
                return
            self._release(f)
            self._fail(f, (f"{why}; " if why else "") + "no decode worker could take this "
                          "request's KV", unavailable=True)
            return
        self.waiting_handoffs.pop(f.request_id, None)
        f.worker, f.handoff_since = d.identity, None
        f.tried_decode.add(d.incarnation)
        d.inflight.add(r.request_id)
        d.handoffs += 1
        self._send(d.identity, P.DecodeRequest(
            request_id=r.request_id, prompt_ids=r.prompt_ids, sampling=spec_from_params(r.params),
            first_token=m.first_token, kv=m.kv, lease_id=m.lease_id))

    def _prefetching(self, f: Flight):
        """The decode worker fetching f's KV layer by layer, if it can still take it."""
        d = self.router.workers.get(f.prefetch_to) if f.prefetch_to is not None else None
        if d is None or d.draining or d.role not in ("decode", "both") \
                or d.incarnation in f.tried_decode:
            return None
        return d

    def _cancel_prefetch(self, f: Flight, reason: str) -> None:
        """The worker prefetching f's KV will not get it: it drops what it fetched."""
        if f.prefetch_to is not None and f.prefetch_to in self.router.workers \
                and f.prefetch_to != f.worker:
            self._send(f.prefetch_to, P.Abort(request_id=f.request_id, reason=reason))
        f.prefetch_to = None

    def _retry_handoffs(self) -> None:
        """Waiting hand-offs try every decode worker again (room frees up, workers come
        back); their leases are renewed every few seconds while they wait."""
        now = self.clock()
        for f in list(self.waiting_handoffs.values()):
            f.tried_decode.clear()
            self._send_decode(f, "waited for a decode worker")
            if f.request_id in self.waiting_handoffs and now - f.renewed_at >= RENEW_EVERY_S:
                f.renewed_at = now
                self._out.renewals.append(f.handoff.lease_id)

    # -- worker messages ---------------------------------------------------------------------
    def _register(self, ident: bytes, m: P.Register) -> None:
        if ident in self.router.workers:
            self._worker_lost(ident, "registered again")
        self._registrations += 1
        w = self.router.workers[ident] = WorkerInfo(
            ident, m.worker_id, m.role, m.total_blocks, m.free_blocks, m.block_size,
            max_seqs=m.max_seqs, tp=m.tp, pp=m.pp, kv_transport=m.kv_transport,
            incarnation=m.incarnation or f"{m.worker_id}#{self._registrations}")
        if m.worker_id in self.drained:   # drained before it registered again: still drained
            w.draining = True
            self._send(ident, P.Drain(enable=True))
        self.peers.seen(ident)
        self._told.pop(ident, None)
        log.info("worker %s registered: role=%s blocks=%d tp=%d pp=%d", m.worker_id, m.role,
                 m.total_blocks, m.tp, m.pp)
        self._dispatch_queued()
        self._retry_handoffs()

    def _tell_to_register(self, ident: bytes, msg: P.Msg) -> None:
        now = self.clock()
        if (not isinstance(msg, (P.Goodbye, P.ErrorReply))
                and now - self._told.get(ident, float("-inf")) > 1.0):   # once a second at most
            self._told[ident] = now
            log.warning("message %s from unregistered peer %r", type(msg).__name__, ident)
            self._send(ident, P.ErrorReply(code="not_found", message="register first"))

    def _on_heartbeat(self, w: WorkerInfo, m: P.Heartbeat) -> None:
        if w.pending_role is not None:
            role, deadline = w.pending_role
            # the worker's word wins once it took the new role, or when it never does
            if m.role == role or self.clock() > deadline:
                w.pending_role = None
        if w.pending_role is None:
            w.role = m.role
        w.free_blocks, w.running = m.free_blocks, m.running
        w.waiting, w.queued_tokens, w.assigned_tokens = m.waiting, m.queued_tokens, 0
        w.prefill_steps, w.decode_steps = m.prefill_steps, m.decode_steps
        w.ranks_alive = m.ranks_alive
        if m.busy_s > stuck_after_s(m.expected_s):
            # alive (it heart-beats) but its engine makes no progress: as good as dead
            self._worker_lost(w.identity, f"is stuck: a step has run {m.busy_s:.0f}s, "
                                          f"expected {m.expected_s:.1f}s")

    def _on_prefill_started(self, w: WorkerInfo, m: P.PrefillStarted) -> None:
        """A long prompt's blocks are leased: if the decode worker it would go to reads
        over tcp, that worker starts fetching its layers now (KVPrefetch)."""
        f = self.flights.get(m.request_id)
        if f is None or f.stage != Stage.PREFILLING or f.worker != w.identity:
            return
        r = f.request
        need = len(r.prompt_ids) + r.params.max_tokens
        d = self.router.pick_decode(need, exclude=f.tried_decode, reserve=False)
        if d is None or d.kv_transport != "tcp" or d.role != "decode":
            return   # it maps the pool (the copy is quick), or nobody can take it yet
        self.router.reserve(d, need)
        self._cancel_prefetch(f, "prefilled again")
        f.prefetch_to = d.identity
        self._send(d.identity, P.KVPrefetch(request_id=m.request_id, kv=m.kv,
                                            lease_id=m.lease_id))

    def _on_prefill_done(self, w: WorkerInfo, m: P.PrefillDone) -> None:
        w.inflight.discard(m.request_id)
        f = self.flights.get(m.request_id)
        if f is None or f.stage != Stage.PREFILLING or f.worker != w.identity:
            # aborted or re-dispatched meanwhile: give the blocks back
            self._out.releases.append((m.request_id, m.lease_id))
            return
        if f.kept_first is not None:
            self._resume_after_reprefill(f, m)
            return
        timings = dict(m.timings, gateway_queue=max(f.t_dispatch - f.request.arrival, 0.0))
        first = GenEvent([m.first_token], [m.first_logprobs] if m.first_logprobs else None,
                         m.finish_reason, num_cached_tokens=m.num_cached_tokens, timings=timings)
        f.tokens_sent += 1
        if m.finish_reason is not None:   # the prefill worker released the lease itself
            self._finish(f, first)
            return
        self._deliver(f, first)
        f.handoff = m
        self._send_decode(f)

    def _on_tokens(self, w: WorkerInfo, m: P.TokenBatch) -> None:
        f = self.flights.get(m.request_id)
        if f is None or f.worker != w.identity:
            return   # aborted, or a worker we already gave up on
        if f.stage == Stage.HANDING_OFF:   # decode claimed, copied and released the lease
            f.stage, f.handoff = Stage.DECODING, None
        f.tokens_sent += len(m.ids)
        ev = GenEvent(list(m.ids), list(m.logprobs) if m.logprobs else None, m.finish_reason,
                      timings=dict(m.timings))
        if m.finish_reason is not None:
            w.inflight.discard(m.request_id)
            self._finish(f, ev)
        else:
            self._deliver(f, ev)

    def _on_worker_error(self, w: WorkerInfo, m: P.ErrorReply) -> None:
        log.warning("worker %s: %s (%s) for request %s", w.worker_id, m.code, m.message,
                    m.request_id)
        f = self.flights.get(m.request_id) if m.request_id else None
        if f is None or f.worker != w.identity:
            return
        w.inflight.discard(m.request_id)
        if m.code == "no_blocks" and f.stage == Stage.HANDING_OFF:
            # refused before claiming: the lease still stands
            self._send_decode(f, f"decode worker {w.worker_id} has no room")
            return
        if m.code == "kv_corrupt" and f.stage == Stage.HANDING_OFF:
            self._reprefill(f, w, m.message)
            return
        if m.code == "kv_corrupt" and f.stage == Stage.PREFILLING:
            # its cached prefix failed the checksum before prefill used it (now evicted)
            self.counters["kv_checksum_failures"] += 1
            self._redispatch(f, f"worker {w.worker_id}: {m.message}")
            return
        if f.stage == Stage.HANDING_OFF:
            self._release(f)
        self.counters["errors"] += 1
        self._fail(f, f"{m.code}: {m.message}", unavailable=m.code in UNAVAILABLE_CODES)

    # -- losing workers ----------------------------------------------------------------------
    def _worker_lost(self, ident: bytes, why: str) -> None:
        w = self.router.workers.pop(ident, None)
        self.peers.forget(ident)
        if w is None:
            return
        self.counters["worker_deaths"] += 1
        self._out.lost_workers.append(w.worker_id)
        log.warning("worker %s %s; %d requests affected", w.worker_id, why, len(w.inflight))
        for rid in list(w.inflight):
            f = self.flights.get(rid)
            if f is None or f.worker != ident:
                continue
            if f.stage == Stage.HANDING_OFF:
                # if it died before claiming, the lease still stands for another decode
                # worker; if it had claimed, that one is told 'not_found' and we end there
                self._send_decode(f, f"decode worker {w.worker_id} {why}")
            else:
                self._redispatch(f, f"worker {w.worker_id} {why}")

    def _reprefill(self, f: Flight, w: WorkerInfo, message: str) -> None:
        """The decode worker found the prompt's KV corrupted (checksums) and decoded nothing
        from it; the store took the bad blocks out of its prefix index. Prefill the prompt
        again and hand that over, keeping the token 1 the client already has."""
        self.counters["kv_checksum_failures"] += 1
        first = f.handoff
        self._release(f)
        if f.retries >= MAX_RETRIES or first is None:
            self.counters["errors"] += 1
            self._fail(f, f"kv_corrupt: {message}; prefilled again {f.retries} times")
            return
        f.retries += 1
        f.kept_first = first
        f.tried_decode.clear()
        self.counters["redispatched"] += 1
        log.warning("request %s: KV failed its checksum on %s; prefilling again", f.request_id,
                    w.worker_id)
        self._enqueue(f)
        self._dispatch_queued()
        if f.stage == Stage.QUEUED and not self._may_wait(f):
            self._fail(f, f"kv_corrupt, and {self._no_worker_message()}", unavailable=True)

    def _resume_after_reprefill(self, f: Flight, m: P.PrefillDone) -> None:
        kept, f.kept_first = f.kept_first, None
        if m.finish_reason is not None:   # sampled another token 1, and that one ended it
            self.counters["errors"] += 1
            self._fail(f, "kv_corrupt: the prompt was prefilled again after a KV checksum "
                          "mismatch, and that prefill ended the request")
            return
        f.handoff = msgspec.structs.replace(m, first_token=kept.first_token,
                                            first_logprobs=kept.first_logprobs)
        self._send_decode(f)

    def _redispatch(self, f: Flight, why: str) -> None:
        if f.tokens_sent == 0 and f.retries < MAX_RETRIES:
            f.retries += 1
            self.counters["redispatched"] += 1
            log.warning("request %s re-dispatched: %s", f.request_id, why)
            self._enqueue(f)
            self._dispatch_queued()
            if f.stage == Stage.QUEUED and not self._may_wait(f):
                self._fail(f, f"{why}, and {self._no_worker_message()}", unavailable=True)
        else:
            self._finish(f, GenEvent([], finish_reason="error",
                                     error=f"request failed mid-stream: {why}"))

    # -- endings and effects -----------------------------------------------------------------
    def _fail(self, f: Flight, message: str, unavailable: bool = False) -> None:
        """End a flight with an error: a 503 when no token was sent and it is a matter of
        capacity, else an error event (mid-stream, or a request that cannot run)."""
        if unavailable and f.tokens_sent == 0:
            self._end(f)
            self._out.deliveries.append((f.reply_to, Overloaded(message, RETRY_AFTER_S)))
        else:
            self._finish(f, GenEvent([], finish_reason="error", error=message))

    def _finish(self, f: Flight, ev: GenEvent) -> None:
        self._end(f)
        self._deliver(f, ev)

    def _end(self, f: Flight) -> None:
        self._cancel_prefetch(f, "request ended")
        self.flights.pop(f.request_id, None)
        self.queue.pop(f.request_id, None)
        self.waiting_handoffs.pop(f.request_id, None)
        was_active = f.stage != Stage.QUEUED
        f.stage = Stage.DONE
        if was_active:
            self._dispatch_queued()   # its slot is free

    def _deliver(self, f: Flight, ev: GenEvent) -> None:
        self._out.deliveries.append((f.reply_to, ev))

    def _release(self, f: Flight) -> None:
        if f.handoff is not None:
            self._out.releases.append((f.request_id, f.handoff.lease_id))
            f.handoff = None

    def _send(self, ident: bytes, msg: P.Msg) -> None:
        self._out.sends.append((ident, msg))

    def _worker_named(self, worker_id: str) -> WorkerInfo:
        w = next((w for w in self.router.workers.values() if w.worker_id == worker_id), None)
        if w is None:
            raise KeyError(f"no worker {worker_id!r}")
        return w
