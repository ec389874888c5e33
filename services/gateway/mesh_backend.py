"""MeshBackend: the gateway's broker between HTTP request threads and model workers.

One broker thread owns the ROUTER socket workers connect to (and a KV-store client);
request threads hand it commands through a queue and a doorbell, and read their events
from a per-request queue. The broker dispatches (prefill -> decode, or colocated),
heart-beats every worker, and purges the silent ones: their requests are re-dispatched
when no token has reached the client yet, else ended with a clear error.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import zmq

from shared import protocol as P
from shared.models.config import ModelConfig
from shared.transport import (CurveConfig, PeerTable, bind_router, close_context, make_context,
                              recv_msg, send_msg)
from shared.wire import spec_from_params
from services.gateway.backend import GenEvent, GenRequest, Overloaded
from services.gateway.router import Router, WorkerInfo

log = logging.getLogger("duet.gateway")
MAX_RETRIES = 2


@dataclass
class Flight:
    req: GenRequest
    events: queue.Queue
    stage: str = "new"                # new | prefill | decode | colocated | done
    worker: bytes | None = None       # who holds it now
    tokens_sent: int = 0
    retries: int = 0
    lease_id: int | None = None
    tried_decode: set = field(default_factory=set)
    pending_handoff: P.PrefillDone | None = None
    t_dispatch: float = 0.0


class MeshBackend:
    def __init__(self, model_dir, router_addr: str, tokenizer_addrs: list[str],
                 kvstore_addr: str | None = None, heartbeat_s: float = 0.5, liveness: int = 6,
                 curve_dir: str | None = None, model_name: str = "smollm2"):
        self.model_name = model_name
        mc = ModelConfig.from_dir(model_dir)
        from shared.tokenization import Tokenizer
        self.tokenizer = Tokenizer(model_dir)   # local, for incremental detokenization
        self.max_model_len = mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.router_addr = router_addr
        self.tokenizer_addrs = tokenizer_addrs
        self.kvstore_addr = kvstore_addr
        self.heartbeat_s = heartbeat_s
        self.curve_dir = curve_dir
        self.ctx = make_context()
        self.router = Router()
        self.peers = PeerTable(timeout_s=heartbeat_s * liveness)
        self.flights: dict[str, Flight] = {}
        self._told: dict[bytes, float] = {}   # unregistered peers last told to register
        self.commands: queue.Queue = queue.Queue()
        self._bell, self._bell_lock = None, threading.Lock()
        self._tok_pool: queue.Queue = queue.Queue()
        self._tok_clients: list = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.counters = {"dispatched": 0, "redispatched": 0, "worker_deaths": 0, "errors": 0}
        self.drained: set[str] = set()   # worker ids an operator drained (broker thread)
        self._thread = threading.Thread(target=self._run, name="duet-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"gateway broker could not bind {router_addr}")

    # -- request-thread side ---------------------------------------------------------------
    def _submit(self, cmd) -> None:
        self.commands.put(cmd)
        # one doorbell socket for all request threads (hundreds of per-thread sockets
        # exhaust file descriptors); zmq sockets are not thread-safe, hence the lock
        with self._bell_lock:
            if self._bell is None:
                self._bell = self.ctx.socket(zmq.PUSH)
                self._bell.connect("inproc://duet-broker-bell")
            try:
                self._bell.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass   # the broker has rings queued: it will drain the commands anyway

    def tokenize(self, request_id, text=None, messages=None, add_generation_prompt=True):
        from services.tokenizer.client import TokenizerClient, TokenizerError
        try:   # a small pool of clients shared by the request threads
            cli = self._tok_pool.get_nowait()
        except queue.Empty:
            curve = CurveConfig.from_dir(self.curve_dir, "client") if self.curve_dir else None
            cli = TokenizerClient(self.ctx, self.tokenizer_addrs, timeout_s=30, curve=curve)
            self._tok_clients.append(cli)
        try:
            return cli.tokenize(text=text, messages=messages, request_id=request_id,
                                add_generation_prompt=add_generation_prompt)
        except TokenizerError as e:
            if getattr(e, "code", "") in ("timeout", "unavailable"):
                raise Overloaded(f"tokenizer unavailable: {e}")
            raise ValueError(str(e))
        finally:
            self._tok_pool.put(cli)

    def generate(self, req: GenRequest) -> Iterator[GenEvent]:
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})")
        if not self.router.workers:
            raise Overloaded("no model workers are registered with the gateway")
        flight = Flight(req, queue.Queue())
        self._submit(("start", flight))
        return self._events(flight)

    def _events(self, flight: Flight) -> Iterator[GenEvent]:
        finished = False
        try:
            while True:
                ev = flight.events.get()
                if isinstance(ev, Exception):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(flight.req.request_id)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def set_role(self, worker_id: str, role: str) -> None:
        if role not in ("prefill", "decode", "both"):
            raise ValueError(f"role={role!r} must be prefill, decode or both")
        self._submit_and_wait(("role", worker_id, role))

    def set_drain(self, worker_id: str, enable: bool) -> None:
        """Stop (enable) or resume routing new requests to a worker; the ones it holds
        finish. The worker is told too, and reports it in its status. The broker thread,
        which owns the worker table, raises KeyError for an unknown worker."""
        if not isinstance(enable, bool):
            raise ValueError(f"enable={enable!r} must be true or false")
        self._submit_and_wait(("drain", worker_id, enable))

    def _submit_and_wait(self, cmd: tuple, timeout_s: float = 5.0) -> None:
        """Run an operator command on the broker thread and return once it is applied, so
        the next /health (or request) already sees it. KeyError if the worker is gone by
        then, RuntimeError if the broker is down or could not tell the worker."""
        if not self._thread.is_alive():
            raise RuntimeError("the gateway's broker thread is not running; restart the gateway")
        done, outcome = threading.Event(), []
        self._submit((*cmd, done, outcome))
        if not done.wait(timeout_s):
            raise TimeoutError(f"the gateway's broker did not apply {cmd[0]} within "
                               f"{timeout_s:g}s; it may still apply")
        if outcome and isinstance(outcome[0], Exception):
            raise outcome[0]

    def health(self) -> dict:
        workers = [w.as_dict() for w in list(self.router.workers.values())]
        roles = {w["role"] for w in workers if not w["draining"]}   # who takes new requests
        ok = bool(workers) and ("both" in roles or {"prefill", "decode"} <= roles)
        return {"ok": ok, "workers": workers, "mode": "disaggregated" if self.router.disaggregated
                else "colocated", "inflight": len(self.flights)}

    def stats(self) -> dict:
        return dict(self.counters, inflight=len(self.flights), workers=len(self.router.workers))

    def close(self) -> None:
        self._stop.set()
        try:
            self._submit(("noop",))
        except zmq.ZMQError:
            pass
        self._thread.join(5)
        if self._bell is not None:
            self._bell.close(linger=0)
        for cli in self._tok_clients:
            cli.close()
        close_context(self.ctx)

    # -- broker thread -------------------------------------------------------------------
    def _run(self) -> None:
        curve = CurveConfig.from_dir(self.curve_dir, "server") if self.curve_dir else None
        self.sock = bind_router(self.ctx, self.router_addr, curve=curve)
        bell = self.ctx.socket(zmq.PULL)
        bell.bind("inproc://duet-broker-bell")
        self.kv = None
        if self.kvstore_addr:
            from services.kvstore.client import KVStoreClient
            self.kv = KVStoreClient(self.ctx, self.kvstore_addr, "gateway-kv",
                                    curve=CurveConfig.from_dir(self.curve_dir, "client") if self.curve_dir else None)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(bell, zmq.POLLIN)
        self._ready.set()
        last_ping = 0.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(self.heartbeat_s * 1000 / 2)))
                if bell in events:
                    while True:
                        try:
                            bell.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                while True:
                    try:
                        cmd = self.commands.get_nowait()
                    except queue.Empty:
                        break
                    self._command(cmd)
                if self.sock in events:
                    self._drain_workers()
                now = time.monotonic()
                if now - last_ping >= self.heartbeat_s:
                    self._send_heartbeats()
                    last_ping = now
                self._purge_workers()
        except Exception:
            log.exception("broker crashed")
            raise
        finally:
            for f in list(self.flights.values()):
                f.events.put(GenEvent([], finish_reason="error", error="gateway shutting down"))
            bell.close(linger=0)
            self.sock.close(linger=0)
            if self.kv is not None:
                self.kv.close()

    def _command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "start":
            flight = cmd[1]
            self.flights[flight.req.request_id] = flight
            self._dispatch(flight)
        elif kind == "abort":
            self._abort(cmd[1], "client went away")
        elif kind in ("role", "drain"):
            _, worker_id, value, done, outcome = cmd
            try:
                w = next((w for w in self.router.workers.values() if w.worker_id == worker_id),
                         None)
                if w is None:
                    raise KeyError(f"no worker {worker_id!r}")
                if kind == "drain":
                    # kept by worker id: a worker that re-registers stays drained
                    (self.drained.add if value else self.drained.discard)(worker_id)
                    w.draining = value
                    msg = P.Drain(enable=value)
                else:
                    w.role = value
                    w.pending_role = (value, time.monotonic() + max(5.0, 4 * self.heartbeat_s))
                    msg = P.SetRole(role=value)
                if not send_msg(self.sock, msg, w.identity):
                    raise RuntimeError(f"could not reach worker {worker_id!r} (send buffer full)")
                outcome.append(None)
            except Exception as e:
                outcome.append(e)
            finally:
                done.set()

    def _dispatch(self, f: Flight) -> None:
        r = f.req
        f.t_dispatch = time.time()
        spec = spec_from_params(r.params)
        if self.router.disaggregated:
            w = self.router.pick_prefill(r.prompt_ids)
            f.stage, f.worker = "prefill", w.identity
            w.inflight.add(r.request_id)
            send_msg(self.sock, P.PrefillRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                                                 sampling=spec, arrival_ts=r.arrival), w.identity)
        else:
            w = self.router.pick_decode(len(r.prompt_ids), roles=("both",))
            if w is None:   # 503: capacity, not a failure of this request
                drained = ", ".join(sorted(self.drained))
                self.flights.pop(r.request_id, None)
                f.stage = "done"
                f.events.put(Overloaded(
                    "no worker can serve this request now (need a 'both' worker, or prefill "
                    "and decode workers)" + (f"; drained: {drained}" if drained else "")))
                return
            f.stage, f.worker = "colocated", w.identity
            w.inflight.add(r.request_id)
            send_msg(self.sock, P.DecodeRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                                                sampling=spec), w.identity)
        self.counters["dispatched"] += 1

    def _drain_workers(self) -> None:
        while True:
            try:
                got = recv_msg(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if got is None:
                continue
            ident, msg = got
            known = ident in self.router.workers
            if isinstance(msg, P.Register):
                self._register(ident, msg)
                continue
            if not known:
                now = time.monotonic()
                if (not isinstance(msg, (P.Goodbye, P.ErrorReply))
                        and now - self._told.get(ident, 0.0) > 1.0):   # once a second at most
                    self._told[ident] = now
                    log.warning("message %s from unregistered peer %r", type(msg).__name__, ident)
                    send_msg(self.sock, P.ErrorReply(code="not_found", message="register first"), ident)
                continue
            self.peers.seen(ident)
            try:
                self._on_worker_msg(ident, msg)
            except Exception:
                log.exception("handling %s from %r", type(msg).__name__, ident)

    def _register(self, ident: bytes, m: P.Register) -> None:
        old = self.router.workers.get(ident)
        if old is not None:
            self._worker_lost(ident, "re-registered")
        w = self.router.workers[ident] = WorkerInfo(ident, m.worker_id, m.role, m.total_blocks,
                                                    m.free_blocks, m.block_size)
        if m.worker_id in self.drained:   # drained before it re-registered: still drained
            w.draining = True
            send_msg(self.sock, P.Drain(enable=True), ident)
        self.peers.seen(ident)
        log.info("worker %s registered: role=%s blocks=%d", m.worker_id, m.role, m.total_blocks)

    def _on_worker_msg(self, ident: bytes, msg) -> None:
        w = self.router.workers[ident]
        if isinstance(msg, P.Heartbeat):
            if w.pending_role is not None:
                role, deadline = w.pending_role
                # a heartbeat sent before the worker took the new role must not revert it;
                # if the worker never takes it (it refused), its own word wins in the end
                if msg.role == role or time.monotonic() > deadline:
                    w.pending_role = None
            if w.pending_role is None:
                w.role = msg.role
            w.free_blocks, w.running = msg.free_blocks, msg.running
            w.waiting, w.queued_tokens, w.assigned_tokens = msg.waiting, msg.queued_tokens, 0
        elif isinstance(msg, P.PrefillDone):
            self._on_prefill_done(w, msg)
        elif isinstance(msg, P.TokenBatch):
            f = self.flights.get(msg.request_id)
            if f is None:
                return
            f.tokens_sent += len(msg.ids)
            ev = GenEvent(list(msg.ids), list(msg.logprobs) if msg.logprobs else None,
                          msg.finish_reason, timings=dict(msg.timings))
            if msg.finish_reason is not None:
                w.inflight.discard(msg.request_id)
                self._finish(f, ev)
            else:
                f.events.put(ev)
        elif isinstance(msg, P.ErrorReply):
            self._on_worker_error(w, msg)
        elif isinstance(msg, P.Goodbye):
            self._worker_lost(ident, "said goodbye")
        elif isinstance(msg, P.StatusReply):
            pass

    def _on_prefill_done(self, w: WorkerInfo, m: P.PrefillDone) -> None:
        w.inflight.discard(m.request_id)
        f = self.flights.get(m.request_id)
        if f is None or f.stage != "prefill":   # aborted meanwhile: give the blocks back
            self._release(m.request_id, m.lease_id)
            return
        t = dict(m.timings)
        t["gateway_queue"] = max(f.t_dispatch - f.req.arrival, 0.0)  # includes tokenize
        first = GenEvent([m.first_token], [m.first_logprobs] if m.first_logprobs else None,
                         m.finish_reason, num_cached_tokens=m.num_cached_tokens, timings=t)
        f.tokens_sent += 1
        if m.finish_reason is not None:   # the prefill worker released the lease itself
            self._finish(f, first)
            return
        f.events.put(first)
        self._send_decode(f, m)

    def _send_decode(self, f: Flight, m: P.PrefillDone) -> None:
        d = self.router.pick_decode(len(f.req.prompt_ids) + f.req.params.max_tokens,
                                    exclude=f.tried_decode)
        if d is None:
            self._release(m.request_id, m.lease_id)
            self._finish(f, GenEvent([], finish_reason="error", error="no decode worker available"))
            return
        f.stage, f.worker, f.lease_id = "decode", d.identity, m.lease_id
        f.tried_decode.add(d.identity)
        f.pending_handoff = m
        d.inflight.add(f.req.request_id)
        send_msg(self.sock, P.DecodeRequest(
            request_id=f.req.request_id, prompt_ids=f.req.prompt_ids,
            sampling=spec_from_params(f.req.params), first_token=m.first_token, kv=m.kv,
            lease_id=m.lease_id), d.identity)

    def _on_worker_error(self, w: WorkerInfo, m: P.ErrorReply) -> None:
        f = self.flights.get(m.request_id) if m.request_id else None
        log.warning("worker %s: %s (%s) for request %s", w.worker_id, m.code, m.message, m.request_id)
        if f is None:
            return
        w.inflight.discard(m.request_id)
        if m.code == "no_blocks" and f.stage == "decode" and f.pending_handoff is not None:
            # refused before claiming: the lease still stands, offer it to another worker
            self._send_decode(f, f.pending_handoff)
            return
        self.counters["errors"] += 1
        self._finish(f, GenEvent([], finish_reason="error", error=f"{m.code}: {m.message}"))

    def _redispatch(self, f: Flight, why: str) -> None:
        if f.tokens_sent == 0 and f.retries < MAX_RETRIES:
            f.retries += 1
            self.counters["redispatched"] += 1
            log.warning("request %s re-dispatched: %s", f.req.request_id, why)
            self._dispatch(f)
        else:
            self._finish(f, GenEvent([], finish_reason="error",
                                     error=f"request failed mid-stream: {why}"))

    def _abort(self, request_id: str, reason: str) -> None:
        f = self.flights.pop(request_id, None)
        if f is None:
            return
        if f.worker is not None and f.worker in self.router.workers:
            self.router.workers[f.worker].inflight.discard(request_id)
            send_msg(self.sock, P.Abort(request_id=request_id, reason=reason), f.worker)
        if f.stage == "decode" and f.pending_handoff is not None:
            # the decode worker may not have claimed yet; an extra release is harmless
            self._release(request_id, f.lease_id)
        f.stage = "done"

    def _finish(self, f: Flight, ev: GenEvent) -> None:
        self.flights.pop(f.req.request_id, None)
        f.stage = "done"
        f.events.put(ev)

    def _release(self, request_id: str, lease_id: int | None) -> None:
        if self.kv is None or lease_id is None:
            return
        try:
            self.kv.release(request_id, lease_id)
        except Exception as e:
            log.warning("request %s: releasing lease %s failed: %s", request_id, lease_id, e)

    def _send_heartbeats(self) -> None:
        for ident in list(self.router.workers):
            send_msg(self.sock, P.Ping(sender="gateway"), ident)

    def _purge_workers(self) -> None:
        for ident, _ in self.peers.purge():
            self._worker_lost(ident, "missed its heartbeats")

    def _worker_lost(self, ident: bytes, why: str) -> None:
        w = self.router.workers.pop(ident, None)
        self.peers.forget(ident)
        if w is None:
            return
        self.counters["worker_deaths"] += 1
        log.warning("worker %s %s; %d requests affected", w.worker_id, why, len(w.inflight))
        for rid in list(w.inflight):
            f = self.flights.get(rid)
            if f is not None and f.worker == ident:
                self._redispatch(f, f"worker {w.worker_id} {why}")
