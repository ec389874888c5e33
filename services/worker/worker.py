"""The worker process: a WorkerCore behind one DEALER to the gateway.

Three threads (four for a decode worker reading hand-offs over tcp), so neither liveness
nor leases wait for the model:
  - the engine loop (the main thread) runs the core: it applies the gateway's messages,
    steps the engines, and pushes what they produce to the IO thread over an inproc pipe;
  - the IO thread owns the DEALER: it forwards those messages,
    heart-beats with the engine thread's latest snapshot (so heartbeats flow during a
    step of any length), and watches the gateway (Paranoid Pirate: a silent gateway
    means reconnect with backoff and register again, aborting what it had sent us);
  - the lease keeper renews the store leases of the prompts held here, from that same
    snapshot and with a store client of its own, so a long step cannot let them expire;
  - the prefetcher (decode over tcp) fetches the layers of prompts still prefilling
    elsewhere, with a store client of its own (layerwise.py).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass

import msgspec
import torch
import zmq

from services.worker.config import WorkerConfig
from services.worker.core import WorkerCore
from shared import protocol as P
from shared.engine.engine import LLMEngine
from shared.transport import (CurveConfig, Liveness, close_context, connect_dealer, make_context,
                              recv_msg, send_msg, stuck_after_s)

log = logging.getLogger("duet.worker")
STORE_TIMEOUT_S = 2.0


@dataclass
class AbortAll:
    """IO thread -> engine thread: drop every request (the gateway forgot them)."""
    reason: str


def _wait_for(store, timeout_s: float) -> None:
    """The store may still be starting (or restarting): wait for its first answer."""
    from services.kvstore.client import KVStoreError
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.pool_info()
            return
        except KVStoreError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the KV store at {store.addr} did not answer within "
                                   f"{timeout_s:.0f}s: {e}") from None
            log.info("waiting for the KV store at %s (%s)", store.addr, e.code)
            time.sleep(0.5)


def build_group(config: WorkerConfig) -> LLMEngine:
    """The leader's engine of a TP x PP group: check the shape against the model, start
    the other ranks on this host (unless torchrun started them), join them."""
    from shared.models.config import ModelConfig
    from shared.models.hub import resolve_model
    from shared.parallel.launch import spawn_followers
    from shared.parallel.runner import build_group_engine
    from shared.parallel.shape import check_shape
    check_shape(ModelConfig.from_dir(resolve_model(config.engine.model)), config.tp, config.pp)
    procs = []
    if "RANK" not in os.environ:
        procs = spawn_followers(config.engine, config.tp, config.pp, config.group_timeout_s,
                                config.group_connect_timeout_s,
                                log_level=logging.getLevelName(log.getEffectiveLevel()))
    elif os.environ["RANK"] != "0":
        raise ValueError(f"RANK={os.environ['RANK']}: only rank 0 runs the worker; other "
                         f"ranks run `python -m shared.parallel`")
    try:
        return build_group_engine(config.engine, config.tp, config.pp, procs,
                                  config.group_timeout_s, config.group_connect_timeout_s)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise


class Worker:
    def __init__(self, config: WorkerConfig, engine: LLMEngine | None = None):
        self.cfg = config
        self.ctx = make_context()
        self.curve = CurveConfig.from_dir(config.curve_dir, "client") if config.curve_dir else None
        store = None
        if config.kvstore_addr:
            from services.kvstore.client import KVStoreClient
            # store calls take milliseconds: a short timeout bounds what a dead store costs
            store = KVStoreClient(self.ctx, config.kvstore_addr, f"{config.worker_id}-kv",
                                  curve=self.curve, timeout_s=STORE_TIMEOUT_S)
            _wait_for(store, config.startup_timeout_s)
        if engine is None:
            engine = (build_group(config) if config.tp * config.pp > 1
                      else LLMEngine.from_config(config.engine))
        self.group = engine.group      # the GroupLeader of a TP/PP group, else None
        try:
            self.core = WorkerCore(config.worker_id, config.role, engine, store,
                                   kv_verify=config.kv_verify, kv_transport=config.kv_transport,
                                   layerwise_min_tokens=config.layerwise_min_tokens,
                                   prefetch_max_bytes=config.prefetch_max_mb << 20,
                                   prefetch_threaded=True)
        except BaseException:
            if self.group is not None:
                self.group.stop("the worker could not start")
            raise
        self.devices = [config.engine.device]
        self.inbox: queue.Queue = queue.Queue()       # gateway messages for the engine thread
        self.stop_event = threading.Event()
        self.gateway = Liveness(config.heartbeat_s, config.liveness)
        self._out_addr = f"inproc://duet-worker-out-{id(self)}"
        self.cores = None   # shared.cores.CoreShare: threads per step from the host's load
        if config.core_share:
            from shared.cores import CoreShare
            self.cores = CoreShare(config.core_share, cap=config.engine.threads)
            self._threads = torch.get_num_threads()
        self._publish()
        self.sock: zmq.Socket | None = None
        self._last_register = 0.0

    # -- engine thread ------------------------------------------------------------------
    def _publish(self) -> None:
        """What the other threads may use without asking the engine: our Register, our
        latest Heartbeat, the leases we hold (one attribute write: atomic for readers)."""
        self._snapshot = (self.core.register(str(self.cfg.engine.model), self.devices),
                          self.core.heartbeat(), self.core.lease_ids())

    def _engine_loop(self) -> None:
        out = self.ctx.socket(zmq.PUSH)
        out.connect(self._out_addr)
        try:
            while not self.stop_event.is_set():
                msgs = []
                for item in self._take_inbox(block=not self.core.has_work()):
                    if isinstance(item, AbortAll):
                        self.core.abort_all(item.reason)
                    else:
                        msgs += self.core.handle(item)
                for m in msgs:   # before the step: a PrefillStarted must not wait for it
                    out.send_multipart(P.encode(m), copy=False)
                msgs = []
                self._publish()   # the leases just acquired are renewed during the step
                if self.core.has_work():
                    if self.cores is not None:
                        n = self.cores.begin_step()
                        if n != self._threads:
                            torch.set_num_threads(n)
                            self._threads = n
                    try:
                        msgs += self.core.step()
                    finally:
                        if self.cores is not None:
                            self.cores.end_step(more=self.core.has_work())
                self.core.tick()
                for m in msgs:
                    out.send_multipart(P.encode(m), copy=False)
                self._publish()
        except Exception:
            log.exception("engine thread crashed")
            self.stop_event.set()
        finally:
            self.core.abort_all("shutdown")
            if self.group is not None:
                self.group.stop("the worker is stopping")
            if self.cores is not None:
                self.cores.close()
            out.close(linger=200)

    def _take_inbox(self, block: bool) -> list:
        items = []
        try:
            if block:
                items.append(self.inbox.get(timeout=self.cfg.heartbeat_s))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            return items

    # -- IO thread --------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop on this (the main) thread — oneDNN's GEMMs measured 25% slower
        on any other thread — the IO loop and the lease keeper beside it."""
        pipe = self.ctx.socket(zmq.PULL)
        pipe.bind(self._out_addr)
        io = threading.Thread(target=self._io_loop, args=(pipe,), name="duet-io", daemon=True)
        keeper = threading.Thread(target=self._keep_leases, name="duet-leases", daemon=True)
        prefetch = threading.Thread(target=self._prefetch, name="duet-prefetch", daemon=True)
        self._connect_gateway()
        io.start()
        if self.cfg.kvstore_addr:
            keeper.start()
            prefetch.start()
        log.info("worker %s up: role=%s gateway=%s", self.cfg.worker_id, self.core.role,
                 self.cfg.gateway_addr)
        try:
            self._engine_loop()
        finally:
            self.stop_event.set()
            io.join(10)
            for t in (keeper, prefetch):
                if t.is_alive():
                    t.join(10)
            self._forward(pipe)   # the engine's last words (aborts) still reach the gateway
            pipe.close(linger=0)
            self.close()

    def _io_loop(self, pipe: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(max(1, self.gateway.poll_timeout_ms())))
                if pipe in events:
                    self._forward(pipe)
                if self.sock in events:
                    self._read_gateway()
                if self.gateway.heartbeat_due():
                    self._heartbeat()
                if not self.gateway.alive:
                    poller.unregister(self.sock)
                    self._reconnect()
                    poller.register(self.sock, zmq.POLLIN)
        except Exception:
            log.exception("IO thread crashed")
        finally:
            self.stop_event.set()

    def _heartbeat(self) -> None:
        """The engine's latest Heartbeat, with how long its running step has taken. A step
        far past what it should take (twice what the gateway calls stuck) ends the process:
        its supervisor starts a fresh one."""
        busy_s, expected_s = self.core.progress(time.monotonic())
        if busy_s > 2 * stuck_after_s(expected_s):
            log.critical("engine stuck: a step has run %.0fs (expected %.1fs); exiting so the "
                         "supervisor restarts this worker", busy_s, expected_s)
            os._exit(3)
        send_msg(self.sock, msgspec.structs.replace(self._snapshot[1], busy_s=round(busy_s, 3),
                                                    expected_s=round(expected_s, 3)))
        self.gateway.sent()

    def _connect_gateway(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = connect_dealer(self.ctx, self.cfg.gateway_addr, self.cfg.worker_id,
                                   curve=self.curve)
        self._register()
        self.gateway.heard()

    def _register(self) -> None:
        self._last_register = time.monotonic()
        send_msg(self.sock, self._snapshot[0])

    def _reconnect(self) -> None:
        delay = self.gateway.next_backoff()
        log.warning("gateway silent; reconnecting in %.1fs", delay)
        self.inbox.put(AbortAll("gateway lost"))
        if self.stop_event.wait(delay):
            return
        self._connect_gateway()

    def _forward(self, pipe: zmq.Socket) -> None:
        """Send what the engine thread produced, frames as they are (encoded there)."""
        while True:
            try:
                frames = pipe.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self.sock.send_multipart(frames, copy=False)
            except zmq.Again:
                log.warning("send to the gateway timed out; a message was dropped")

    def _read_gateway(self) -> None:
        while True:
            try:
                got = recv_msg(self.sock, zmq.NOBLOCK, answer_invalid=True)
            except zmq.Again:
                return
            self.gateway.heard()
            if got is None:
                continue   # invalid: recv_msg logged it and told the gateway
            msg = got[1]
            if isinstance(msg, (P.Ping, P.Ack)):
                continue
            if isinstance(msg, P.ErrorReply) and msg.request_id is None:
                self._on_gateway_error(msg)
                continue
            self.inbox.put(msg)

    def _on_gateway_error(self, msg: P.ErrorReply) -> None:
        busy_s, expected_s = self.core.progress(time.monotonic())
        if busy_s > stuck_after_s(expected_s):
            return   # the gateway gave us up as stuck: not back until the step ends
        if msg.code == "not_found" and time.monotonic() - self._last_register > 1.0:
            # the gateway lost track of us (it restarted, or purged us while we were
            # silent); what it had sent us was re-dispatched or failed there
            log.warning("gateway does not know this worker (%s): registering again", msg.message)
            self.inbox.put(AbortAll("gateway forgot this worker"))
            self._register()
        elif msg.code != "not_found":
            log.warning("gateway: %s (%s)", msg.code, msg.message)

    # -- lease keeper thread ---------------------------------------------------------------
    def _keep_leases(self) -> None:
        from services.kvstore.client import KVStoreClient, KVStoreError
        with KVStoreClient(self.ctx, self.cfg.kvstore_addr, f"{self.cfg.worker_id}-leases",
                           curve=self.curve, timeout_s=STORE_TIMEOUT_S) as kv:
            while not self.stop_event.wait(self.cfg.heartbeat_s):
                ids = self._snapshot[2]
                if ids:
                    try:
                        kv.renew(ids)
                    except KVStoreError as e:
                        log.warning("renewing %d leases failed: %s", len(ids), e)

    # -- prefetch thread (decode over tcp) ---------------------------------------------------
    def _prefetch(self) -> None:
        """Poll the store for the layers of the prefetch jobs, each when it is due; idle
        while there are none (or this worker maps the pool: no prefetcher)."""
        from services.kvstore.client import KVStoreClient
        try:   # behind this worker's own steps, and a prefill sharing the host, for the CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass
        with KVStoreClient(self.ctx, self.cfg.kvstore_addr, f"{self.cfg.worker_id}-prefetch",
                           curve=self.curve, timeout_s=STORE_TIMEOUT_S) as kv:
            while not self.stop_event.is_set():
                pf = self.core.prefetcher   # replaced when the store restarts
                due = pf.next_due() if pf is not None else None
                if due is None or due > 0:
                    wake = pf.wake if pf is not None else self.stop_event
                    wake.wait(min(due if due is not None else 0.5, 0.5))
                    if pf is not None:
                        pf.wake.clear()
                    continue
                try:
                    pf.poll(kv)
                except Exception:   # a bug here must not take the worker down
                    log.exception("layer-wise prefetch failed")
                    self.stop_event.wait(0.5)

    def close(self) -> None:
        if self.sock is not None:
            try:
                send_msg(self.sock, P.Goodbye(worker_id=self.cfg.worker_id))
            except zmq.ZMQError:
                pass
            self.sock.close(linger=200)
            self.sock = None
        if self.core.store is not None:
            self.core.store.close()
        close_context(self.ctx)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
