"""BrokerClient: the Backend over the mesh — request threads on one side, the broker
thread and its sockets on the other.

Request threads submit typed commands through a queue and ring one doorbell; each reads
its flight's events from a queue of its own. The broker thread owns the ROUTER that
workers connect to: it feeds the pure Broker (broker.py) every command, every worker
message and the clock's ticks, and carries out what the Broker returns — sends to
workers, events to request threads, and lease releases, which a releaser thread hands to
the KV store so that a slow store never stalls the broker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import zmq

from services.gateway.backend import ChoiceRequest, GenEvent, Overloaded
from services.gateway.broker import Broker, Flight, Outbox
from shared import protocol as P
from shared.models.config import ModelConfig
from shared.transport import (CurveConfig, bind_router, close_context, make_context, recv_msg,
                              send_msg)

log = logging.getLogger("duet.gateway")


# -- commands from request threads to the broker thread ------------------------------------
@dataclass
class Reply:
    """How an operator command reports back once the broker thread applied it."""
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


@dataclass
class StartFlight:
    flight: Flight


@dataclass
class AbortFlight:
    request_id: str
    reason: str = "client went away"


@dataclass
class SetWorkerRole:
    worker_id: str
    role: str
    reply: Reply


@dataclass
class SetWorkerDrain:
    worker_id: str
    enable: bool
    reply: Reply


@dataclass
class Wake:
    """Nothing to do but look at the stop flag."""


class BrokerClient:
    def __init__(self, model_dir, router_addr: str, tokenizer_addrs: list[str],
                 kvstore_addr: str | None = None, heartbeat_s: float = 0.5, liveness: int = 6,
                 curve_dir: str | None = None, model_name: str = "smollm2",
                 queue_timeout_s: float = 0.0):
        from shared.tokenization import Tokenizer
        mc = ModelConfig.from_dir(model_dir)
        self.model_name = model_name
        self.tokenizer = Tokenizer(model_dir)   # local, for incremental detokenization
        self.max_model_len = mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.router_addr, self.tokenizer_addrs = router_addr, tokenizer_addrs
        self.kvstore_addr, self.heartbeat_s, self.curve_dir = kvstore_addr, heartbeat_s, curve_dir
        self.broker = Broker(heartbeat_s, liveness, queue_timeout_s)
        self._lock = threading.Lock()            # the broker's state, for health() readers
        self.ctx = make_context()
        self.commands: queue.Queue = queue.Queue()
        self._bell, self._bell_lock = None, threading.Lock()
        self._tok_pool: queue.Queue = queue.Queue()
        self._tok_clients: list = []
        self._releases: queue.Queue = queue.Queue()   # store calls for the releaser thread
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._handlers = {
            StartFlight: lambda c: self.broker.start(c.flight),
            AbortFlight: lambda c: self.broker.abort(c.request_id, c.reason),
            SetWorkerRole: lambda c: self.broker.set_role(c.worker_id, c.role),
            SetWorkerDrain: lambda c: self.broker.set_drain(c.worker_id, c.enable),
            Wake: lambda c: Outbox(),
        }
        self._thread = threading.Thread(target=self._run, name="duet-broker", daemon=True)
        self._releaser = threading.Thread(target=self._release_leases, name="duet-releaser",
                                          daemon=True)
        self._thread.start()
        self._releaser.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"gateway broker could not bind {router_addr}")

    # -- the Backend, called from request threads ----------------------------------------
    def tokenize(self, request_id, text=None, messages=None, add_generation_prompt=True,
                 tools=None):
        from services.tokenizer.client import TokenizerClient, TokenizerError
        try:   # a small pool of clients shared by the request threads
            cli = self._tok_pool.get_nowait()
        except queue.Empty:
            curve = CurveConfig.from_dir(self.curve_dir, "client") if self.curve_dir else None
            cli = TokenizerClient(self.ctx, self.tokenizer_addrs, timeout_s=30, curve=curve)
            self._tok_clients.append(cli)
        try:
            return cli.tokenize(text=text, messages=messages, request_id=request_id,
                                add_generation_prompt=add_generation_prompt, tools=tools)
        except TokenizerError as e:
            if getattr(e, "code", "") in ("timeout", "unavailable"):
                raise Overloaded(f"tokenizer unavailable: {e}")
            raise ValueError(str(e))
        finally:
            self._tok_pool.put(cli)

    def generate(self, req: ChoiceRequest) -> Iterator[GenEvent]:
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})")
        flight = Flight(req, queue.Queue())
        self._submit(StartFlight(flight))
        return self._events(flight)

    def _events(self, flight: Flight) -> Iterator[GenEvent]:
        finished = False
        try:
            while True:
                ev = flight.reply_to.get()
                if isinstance(ev, Exception):
                    finished = True   # the broker already dropped the flight
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(flight.request_id)

    def abort(self, request_id: str) -> None:
        self._submit(AbortFlight(request_id))

    def set_role(self, worker_id: str, role: str) -> None:
        if role not in P.ROLES:
            raise ValueError(f"role={role!r} must be one of {', '.join(P.ROLES)}")
        self._submit_and_wait(SetWorkerRole(worker_id, role, Reply()))

    def set_drain(self, worker_id: str, enable: bool) -> None:
        """Stop (enable) or resume routing new requests to a worker; the ones it holds
        finish. The worker is told too, and reports it in its status. KeyError for an
        unknown worker."""
        if not isinstance(enable, bool):
            raise ValueError(f"enable={enable!r} must be true or false")
        self._submit_and_wait(SetWorkerDrain(worker_id, enable, Reply()))

    def _submit_and_wait(self, cmd, timeout_s: float = 5.0) -> None:
        """Run an operator command on the broker thread and return once it is applied, so
        the next /health (or request) already sees it. KeyError if the worker is gone,
        RuntimeError if the broker is down or could not tell the worker."""
        if not self._thread.is_alive():
            raise RuntimeError("the gateway's broker thread is not running; restart the gateway")
        self._submit(cmd)
        if not cmd.reply.done.wait(timeout_s):
            raise TimeoutError(f"the gateway's broker did not apply {type(cmd).__name__} within "
                               f"{timeout_s:g}s; it may still apply")
        if cmd.reply.error is not None:
            raise cmd.reply.error

    def health(self) -> dict:
        with self._lock:
            return self.broker.health()

    def stats(self) -> dict:
        with self._lock:
            return self.broker.stats()

    def close(self) -> None:
        self._stop.set()
        try:
            self._submit(Wake())
        except zmq.ZMQError:
            pass
        self._thread.join(5)
        self._releases.put(None)
        self._releaser.join(5)
        if self._bell is not None:
            self._bell.close(linger=0)
        for cli in self._tok_clients:
            cli.close()
        close_context(self.ctx)

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
                pass   # the broker has rings queued: it will take the commands anyway

    # -- the broker thread -------------------------------------------------------------
    def _run(self) -> None:
        curve = CurveConfig.from_dir(self.curve_dir, "server") if self.curve_dir else None
        self.sock = bind_router(self.ctx, self.router_addr, curve=curve)
        bell = self.ctx.socket(zmq.PULL)
        bell.bind("inproc://duet-broker-bell")
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(bell, zmq.POLLIN)
        self._ready.set()
        tick_s, last_tick = self.heartbeat_s / 2, 0.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(tick_s * 1000)))
                if bell in events:
                    _drain_bell(bell)
                self._take_commands()
                if self.sock in events:
                    self._read_worker_messages()
                if time.monotonic() - last_tick >= tick_s:
                    last_tick = time.monotonic()
                    self._apply(self.broker.tick)
        except Exception:
            log.exception("broker crashed")
            raise
        finally:
            self._apply(lambda: self.broker.shutdown("gateway shutting down"))
            bell.close(linger=0)
            self.sock.close(linger=0)

    def _take_commands(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            reply = getattr(cmd, "reply", None)
            try:
                failed = self._apply(lambda: self._handlers[type(cmd)](cmd))
                if reply is not None and failed:
                    raise RuntimeError(f"could not reach worker {cmd.worker_id!r} "
                                       f"(it left, or its send buffer is full)")
            except Exception as e:
                if reply is None:
                    raise
                reply.error = e
            finally:
                if reply is not None:
                    reply.done.set()

    def _read_worker_messages(self) -> None:
        while True:
            try:
                got = recv_msg(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            if got is not None:
                ident, msg = got
                try:
                    self._apply(lambda: self.broker.on_message(ident, msg))
                except Exception:
                    log.exception("handling %s from %r", type(msg).__name__, ident)

    def _apply(self, event) -> list[bytes]:
        """Run one Broker event under the lock and carry out its Outbox; returns the
        identities that could not be sent to."""
        with self._lock:
            out: Outbox = event()
        failed = [ident for ident, msg in out.sends if not send_msg(self.sock, msg, ident)]
        for reply_to, ev in out.deliveries:
            reply_to.put(ev)
        for request_id, lease_id in out.releases:
            self._releases.put(lambda kv, r=request_id, lid=lease_id: kv.release(r, lid))
        if out.renewals:
            self._releases.put(lambda kv, ids=list(out.renewals): kv.renew(ids))
        for worker_id in out.lost_workers:
            self._releases.put(lambda kv, w=worker_id: kv.drop_holder(w))
        return failed

    # -- the releaser thread -----------------------------------------------------------
    def _release_leases(self) -> None:
        if not self.kvstore_addr:
            return
        from services.kvstore.client import KVStoreClient, KVStoreError
        curve = CurveConfig.from_dir(self.curve_dir, "client") if self.curve_dir else None
        kv = KVStoreClient(self.ctx, self.kvstore_addr, "gateway-kv", curve=curve)
        try:
            while (call := self._releases.get()) is not None:
                try:
                    call(kv)
                except KVStoreError as e:   # gone already, or the store is down: TTL frees it
                    log.info("giving leases back to the store: %s", e)
        finally:
            kv.close()


def _drain_bell(bell: zmq.Socket) -> None:
    while True:
        try:
            bell.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
