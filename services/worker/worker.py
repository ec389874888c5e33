"""A model worker: prefill, decode or both, switchable at run time.

It connects out to the gateway's router, registers, and heart-beats (Paranoid Pirate:
a silent gateway means reconnect with backoff and register again). One model is loaded
and shared by two engines:
  - the prefill engine attends over the KV-store's pool mapped into this process, so
    prompt KV is written straight into leased store blocks (no copy on the way out);
  - the decode engine owns a local paged cache; a hand-off copies the store blocks into
    it straight from the shared pages, then releases the lease.
Role `both` runs whole requests on the decode engine (colocated, chunked prefill).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import zmq

from shared import protocol as P
from shared.engine.engine import LLMEngine
from shared.engine.kv_cache import StoreKVCache
from shared.engine.leased_blocks import LeasedBlockManager
from shared.engine.sampling_params import SamplingParams
from shared.transport import CurveConfig, Liveness, connect_dealer, make_context, close_context, recv_msg, send_msg
from shared.wire import logprobs_to_wire, params_from_spec
from services.worker.config import WorkerConfig
from services.worker.handoff import StaleBlockError, fenced_copy

log = logging.getLogger("duet.worker")


@dataclass
class PrefillJob:
    req: P.PrefillRequest
    params: SamplingParams
    lease_id: int
    block_ids: list[int]
    generations: list[int]
    hit_tokens: int
    t_recv: float
    t_start: float | None = None


@dataclass
class DecodeJob:
    request_id: str
    t_recv: float
    timings: dict = field(default_factory=dict)
    t_first_step: float | None = None


class Worker:
    def __init__(self, config: WorkerConfig, engine: LLMEngine | None = None):
        self.cfg = config
        self.role = config.role
        self.draining = False   # the gateway routes nothing new here; it tells us for status
        self.decode = engine or LLMEngine.from_config(config.engine)
        self.ctx = make_context()
        self.curve = CurveConfig.from_dir(config.curve_dir, "client") if config.curve_dir else None
        self.kv = None
        self.prefill = None
        if config.kvstore_addr:
            self._connect_store()
        self.prefill_jobs: dict[str, PrefillJob] = {}
        self.decode_jobs: dict[str, DecodeJob] = {}
        self.stop_event = threading.Event()
        self.sock = None
        self.gateway = Liveness(config.heartbeat_s, config.liveness)

    # -- setup -------------------------------------------------------------------------
    def _connect_store(self) -> None:
        from services.kvstore.client import KVStoreClient, open_pool
        self.kv = KVStoreClient(self.ctx, self.cfg.kvstore_addr,
                                f"{self.cfg.worker_id}-kv", curve=self.curve)
        info = self.kv.pool_info()
        self.pool_info = info
        self.pool, self.generations = open_pool(info)
        mc = self.decode.model.config
        want = (mc.num_layers, mc.num_kv_heads, mc.head_dim, info.block_size)
        have = (info.num_layers, info.num_kv_heads, info.head_dim, self.decode.config.block_size)
        if want != have:
            raise ValueError(f"KV-store pool (layers, kv heads, head dim, block size)={have} "
                             f"does not fit this model {want}")
        if self.pool.dtype != self.decode.model.embed_tokens.weight.dtype:
            raise ValueError(f"KV-store pool dtype {self.pool.dtype} differs from the model's "
                             f"{self.decode.model.embed_tokens.weight.dtype}: start both with one --dtype")
        self.prefill = LLMEngine(self.decode.model, self.decode.config, tuple(self.decode.eos_token_ids),
                                 self.decode.tokenizer,
                                 block_manager=LeasedBlockManager(info.num_blocks, info.block_size),
                                 kv_cache=StoreKVCache(self.pool))

    def _connect_gateway(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = connect_dealer(self.ctx, self.cfg.gateway_addr, self.cfg.worker_id,
                                   curve=self.curve)
        self._register()
        self.gateway.heard()

    def _register(self) -> None:
        self._last_register = time.monotonic()
        eng = self.decode
        self._send(P.Register(worker_id=self.cfg.worker_id, role=self.role,
                              model=str(self.cfg.engine.model), devices=[self.cfg.engine.device],
                              max_batch_tokens=eng.config.max_num_batched_tokens,
                              total_blocks=eng.block_manager.num_blocks,
                              free_blocks=eng.block_manager.num_free_blocks,
                              block_size=eng.config.block_size))

    def _send(self, msg) -> None:
        send_msg(self.sock, msg)

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self._connect_gateway()
        log.info("worker %s up: role=%s gateway=%s", self.cfg.worker_id, self.role,
                 self.cfg.gateway_addr)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                busy = self.decode.has_unfinished() or (self.prefill and self.prefill.has_unfinished())
                events = dict(poller.poll(0 if busy else int(self.cfg.heartbeat_s * 1000 / 2)))
                if self.sock in events:
                    self._drain_inbox()
                if self.prefill is not None and self.prefill.has_unfinished():
                    self._step_prefill()
                if self.decode.has_unfinished():
                    self._step_decode()
                self._heartbeat()
                if not self.gateway.alive:
                    delay = self.gateway.next_backoff()
                    log.warning("gateway silent; reconnecting in %.1fs", delay)
                    self._abort_all("gateway lost")
                    time.sleep(delay)
                    poller.unregister(self.sock)
                    self._connect_gateway()
                    poller.register(self.sock, zmq.POLLIN)
        finally:
            self.close()

    def _heartbeat(self, force: bool = False) -> None:
        if force or self.gateway.heartbeat_due():
            s = self.decode.scheduler
            self._send(P.Heartbeat(worker_id=self.cfg.worker_id, role=self.role,
                                   free_blocks=self.decode.block_manager.num_free_blocks,
                                   running=len(s.running), waiting=len(s.waiting),
                                   queued_tokens=s.num_queued_tokens + sum(
                                       len(j.req.prompt_ids) for j in self.prefill_jobs.values())))
            self.gateway.sent()
            if self.prefill_jobs:   # queued prompts keep their store leases alive
                self.kv.renew([j.lease_id for j in self.prefill_jobs.values()])

    def _drain_inbox(self) -> None:
        while True:
            try:
                got = recv_msg(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.gateway.heard()
            if got is None:
                continue
            msg = got[1]
            try:
                self._handle(msg)
            except Exception as e:  # a bad request must not take the worker down
                rid = getattr(msg, "request_id", None)
                log.exception("request %s failed", rid)
                self._send(P.ErrorReply(code="internal", message=f"{type(e).__name__}: {e}",
                                        request_id=rid))

    def _handle(self, msg) -> None:
        if isinstance(msg, P.PrefillRequest):
            self._on_prefill(msg)
        elif isinstance(msg, P.DecodeRequest):
            self._on_decode(msg)
        elif isinstance(msg, P.Abort):
            self._abort(msg.request_id, msg.reason)
        elif isinstance(msg, P.SetRole):
            log.info("role %s -> %s", self.role, msg.role)
            if msg.role == "prefill" and self.prefill is None:
                raise ValueError("role prefill needs a KV-store; this worker has none")
            self.role = msg.role
            self._heartbeat(force=True)  # announce the new role now
        elif isinstance(msg, P.Drain):
            log.info("draining %s", "on: no new requests" if msg.enable else "off")
            self.draining = msg.enable
        elif isinstance(msg, P.StatusRequest):
            self._send(P.StatusReply(service="worker", data=self.status()))
        elif isinstance(msg, (P.Ping, P.Ack)):
            pass
        elif isinstance(msg, P.ErrorReply) and msg.code == "not_found" and msg.request_id is None:
            # the gateway lost track of us (it restarted, or purged us while we were busy)
            # its requests here were already re-dispatched or failed by the gateway
            if time.monotonic() - self._last_register > 1.0:
                log.warning("gateway does not know this worker (%s): registering again", msg.message)
                self._abort_all("gateway forgot this worker")
                self._register()
        else:
            raise ValueError(f"worker does not handle {type(msg).__name__}")

    # -- prefill -----------------------------------------------------------------------
    def _on_prefill(self, req: P.PrefillRequest) -> None:
        t = time.monotonic()
        params = params_from_spec(req.sampling)
        params.max_tokens, params.n = 1, 1   # prefill samples token 1 only
        bs = self.pool_info.block_size
        hit = self.kv.lookup(req.request_id, req.prompt_ids)
        lease_id, hit_blocks, hit_gens = hit.lease_id, list(hit.block_ids), list(hit.generations)
        hit_tokens = hit.num_tokens
        need = -(-len(req.prompt_ids) // bs) - len(hit_blocks)
        try:
            lease = self.kv.allocate(req.request_id, need, lease_id)
            lease_id, new_blocks, new_gens = lease.lease_id, list(lease.block_ids), list(lease.generations)
        except Exception:
            if lease_id is not None:
                self.kv.release(req.request_id, lease_id)
            raise
        try:
            self.prefill.add_request(req.request_id, req.prompt_ids, params,
                                     leased_blocks=hit_blocks + new_blocks,
                                     leased_hit_tokens=hit_tokens)
        except Exception:
            self.kv.release(req.request_id, lease_id)
            raise
        self.prefill_jobs[req.request_id] = PrefillJob(
            req, params_from_spec(req.sampling), lease_id, hit_blocks + new_blocks,
            hit_gens + new_gens, hit_tokens, t)

    def _step_prefill(self) -> None:
        t0 = time.monotonic()
        for job in self.prefill_jobs.values():
            if job.t_start is None:
                job.t_start = t0
        for out in self.prefill.step():
            job = self.prefill_jobs.pop(out.request_id, None)
            if job is None:
                continue
            now = time.monotonic()
            req = job.req
            self.kv.commit(req.request_id, job.lease_id, job.block_ids, req.prompt_ids)
            first = out.new_token_ids[0]
            reason = self.decode._finish_reason_for(first, job.params, 1, len(req.prompt_ids) + 1)
            if reason is not None:   # nothing left for decode: the blocks stay only as cache
                self.kv.release(req.request_id, job.lease_id)
            lp = out.new_logprobs[0] if out.new_logprobs else None
            self._send(P.PrefillDone(
                request_id=req.request_id, first_token=first, lease_id=job.lease_id,
                kv=P.KVRef(handle=self.pool_info.handle, block_ids=job.block_ids,
                           generations=job.generations, num_tokens=len(req.prompt_ids)),
                num_cached_tokens=job.hit_tokens,
                num_computed_tokens=len(req.prompt_ids) - job.hit_tokens,
                first_logprobs=logprobs_to_wire(lp) if lp and job.params.logprobs is not None else None,
                finish_reason=reason,
                timings={"prefill_queue": job.t_start - job.t_recv,
                         "prefill_compute": now - job.t_start}))

    # -- decode ------------------------------------------------------------------------
    def _on_decode(self, req: P.DecodeRequest) -> None:
        t = time.monotonic()
        params = params_from_spec(req.sampling)
        job = DecodeJob(req.request_id, t, dict(req.timings))
        if req.kv is None:   # colocated: the whole request runs here
            self.decode.add_request(req.request_id, req.prompt_ids, params)
            self.decode_jobs[req.request_id] = job
            return
        if req.first_token is None or req.lease_id is None:
            raise ValueError("a decode hand-off needs first_token and lease_id")
        if not self.decode.can_add_prefilled(len(req.prompt_ids)):
            # not claimed: the gateway may hand the lease to another decode worker
            self._send(P.ErrorReply(code="no_blocks", request_id=req.request_id,
                                    message=f"decode worker {self.cfg.worker_id} has no room"))
            return
        self.kv.claim(req.request_id, req.lease_id)
        kv = req.kv
        n_blocks = -(-kv.num_tokens // self.pool_info.block_size)
        t_copy = time.monotonic()
        try:
            self.decode.add_prefilled(
                req.request_id, req.prompt_ids, req.first_token, params,
                lambda dst: fenced_copy(self.decode.kv_cache, self.pool, self.generations,
                                        kv.block_ids[:n_blocks], kv.generations[:n_blocks], dst))
        except StaleBlockError as e:
            self._send(P.ErrorReply(code="internal", request_id=req.request_id, message=str(e)))
            return
        finally:
            self.kv.release(req.request_id, req.lease_id)
        job.timings["kv_handoff"] = time.monotonic() - t_copy
        self.decode_jobs[req.request_id] = job

    def _step_decode(self) -> None:
        t0 = time.monotonic()
        for job in self.decode_jobs.values():
            if job.t_first_step is None:
                job.t_first_step = t0
                job.timings["decode_queue"] = t0 - job.t_recv
        for out in self.decode.step():
            job = self.decode_jobs.get(out.request_id)
            timings = {}
            if job is not None and job.timings:
                timings, job.timings = job.timings, {}
            lps = [logprobs_to_wire(r) for r in out.new_logprobs] if out.new_logprobs else None
            self._send(P.TokenBatch(request_id=out.request_id, ids=out.new_token_ids,
                                    logprobs=lps, finish_reason=out.finish_reason,
                                    timings=timings))
            if out.finished:
                self.decode_jobs.pop(out.request_id, None)

    # -- aborts and shutdown ------------------------------------------------------------
    def _abort(self, request_id: str, reason: str = "") -> None:
        job = self.prefill_jobs.pop(request_id, None)
        if job is not None:
            self.prefill.abort(request_id)
            self.kv.release(request_id, job.lease_id)
        if self.decode_jobs.pop(request_id, None) is not None:
            self.decode.abort(request_id)
        log.info("request %s aborted (%s)", request_id, reason)

    def _abort_all(self, reason: str) -> None:
        for rid in list(self.prefill_jobs) + list(self.decode_jobs):
            self._abort(rid, reason)

    def status(self) -> dict:
        d = {"worker_id": self.cfg.worker_id, "role": self.role,
             "decode": self.decode.idle_counts(), "prefill_jobs": len(self.prefill_jobs),
             "decode_jobs": len(self.decode_jobs), "draining": self.draining}
        return d

    def close(self) -> None:
        self._abort_all("shutdown")
        if self.sock is not None:
            try:
                send_msg(self.sock, P.Goodbye(worker_id=self.cfg.worker_id))
            except zmq.ZMQError:
                pass
            self.sock.close(linger=200)
            self.sock = None
        if self.kv is not None:
            self.kv.close()
        close_context(self.ctx)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
