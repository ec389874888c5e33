"""WorkerCore: one model worker's request state machines, with no sockets or threads.

    prefill  PrefillRequest -> PrefillLease.acquire (cached prefix + fresh store blocks)
             [-> PrefillStarted for a long prompt: its blocks fill layer by layer]
             -> the prefill engine writes the prompt's KV straight into those blocks
             -> commit -> PrefillDone{token 1, KVRef, lease}
    decode   DecodeRequest with a KVRef -> DecodeClaim.claim -> fenced copy into the local
             paged cache -> release -> continuous batching -> TokenBatch, ...
             [over tcp, after a KVPrefetch: the blocks were fetched layer by layer
             meanwhile (layerwise.py); the claim verifies and copies them]
    both     DecodeRequest without a KVRef: the whole request runs here (chunked prefill)

One model is shared by two engines: the prefill engine attends over the store's pool
mapped into this process; the decode engine owns a local paged cache. handle(msg) and
step() return the messages to send to the gateway; worker.py owns the socket, liveness
and reconnects. The store is any KVStorePort (the real client or an in-process KVStore),
or None for a worker without one (role both only).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from services.kvstore.layout import (KVChecksumError, StaleBlockError, close_pool, open_pool,
                                     open_progress)
from services.kvstore.port import KVStoreError, KVStorePort
from services.worker.handoff import VERIFY_MODES, DecodeClaim, PrefillLease
from services.worker.layerwise import LayerProgress, Prefetcher
from shared import protocol as P
from shared.buffers import dtypes
from shared.engine.engine import LLMEngine
from shared.engine.kv_cache import StoreKVCache
from shared.engine.leased_blocks import LeasedBlockManager
from shared.engine.sampling_params import SamplingParams
from shared.wire import logprobs_to_wire, params_from_spec

KV_TRANSPORTS = ("auto", "shm", "cuda_ipc", "tcp")   # how hand-offs reach this worker

log = logging.getLogger("duet.worker")
STARTING_S_PER_TOKEN = 0.01   # until measured: a slow CPU's fp32 prefill rate


def _tokens_done(engine: LLMEngine) -> int:
    return engine.stats.prompt_tokens_computed + engine.stats.decode_tokens


@dataclass
class PrefillJob:
    req: P.PrefillRequest
    params: SamplingParams          # as requested: decides whether token 1 ends it
    lease: PrefillLease
    t_recv: float
    t_start: float | None = None    # its first scheduled step


@dataclass
class DecodeJob:
    request_id: str
    t_recv: float
    timings: dict = field(default_factory=dict)   # sent with its first TokenBatch
    started: bool = False


class WorkerCore:
    def __init__(self, worker_id: str, role: str, engine: LLMEngine,
                 store: KVStorePort | None = None, clock: Callable[[], float] = time.monotonic,
                 incarnation: str | None = None, kv_verify: str = "all",
                 kv_transport: str = "auto", layerwise_min_tokens: int = 512,
                 prefetch_max_bytes: int = 512 << 20, prefetch_threaded: bool = False):
        if role not in P.ROLES:
            raise ValueError(f"role={role!r} must be one of {P.ROLES}")
        if kv_verify not in VERIFY_MODES:
            raise ValueError(f"kv_verify={kv_verify!r} must be one of {VERIFY_MODES}")
        if kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport={kv_transport!r} must be one of {KV_TRANSPORTS}")
        self.kv_verify, self.kv_transport = kv_verify, kv_transport
        self.layerwise_min_tokens = layerwise_min_tokens
        self.prefetch_max_bytes, self.prefetch_threaded = prefetch_max_bytes, prefetch_threaded
        self.layers: LayerProgress | None = None   # prefill: publishes layer-wise progress
        self.prefetcher: Prefetcher | None = None  # decode over tcp: layer-wise fetches
        self.transport = ""          # the one in use once attached: shm, cuda_ipc or tcp
        self.checksum_failures = 0   # hand-offs refused: their blocks failed the checksum
        self.worker_id, self.role, self.clock = worker_id, role, clock
        self.incarnation = incarnation or uuid.uuid4().hex[:8]
        self.draining = False     # the gateway routes nothing new here; kept for status
        self.decode = engine
        self.store, self.prefill = None, None
        if store is not None:
            self.attach_store(store)
        if role == "prefill" and self.prefill is None:
            raise ValueError("role prefill needs a KV store whose pool it maps (prefill writes "
                             "into its blocks in place: the store's host, not --kv-transport tcp)")
        self.prefill_jobs: dict[str, PrefillJob] = {}
        self.decode_jobs: dict[str, DecodeJob] = {}
        # progress, read by the IO thread: when the running step began (None: between
        # steps), and what it should take at the measured seconds per token
        self.step_started: float | None = None
        self.step_expected_s = 0.0
        self.s_per_token = STARTING_S_PER_TOKEN
        self._handlers = {P.PrefillRequest: self._on_prefill, P.DecodeRequest: self._on_decode,
                          P.KVPrefetch: self._on_prefetch,
                          P.Abort: self._on_abort, P.SetRole: self._on_set_role,
                          P.Drain: self._on_drain, P.StatusRequest: self._on_status}

    def attach_store(self, store: KVStorePort, info: P.KVPoolInfo | None = None) -> None:
        """Map the store's pool and build the prefill engine over it (same model); or, with
        kv_transport tcp (forced, or auto where the pool cannot be mapped: another host),
        take hand-offs over the wire and prefill nothing."""
        info = info or store.pool_info()
        mc, eng = self.decode.model.config, self.decode
        here = eng.model.device
        want = (mc.num_layers, mc.num_kv_heads, mc.head_dim, eng.config.block_size)
        have = (info.num_layers, info.num_kv_heads, info.head_dim, info.block_size)
        if want != have:
            tp, pp = self.shape
            group = f" (a TP={tp} x PP={pp} group reads its ranks' slices of the whole " \
                    f"model's blocks)" if tp * pp > 1 else ""
            raise ValueError(f"KV-store pool (layers, kv heads, head dim, block size)={have} "
                             f"does not fit this model {want}{group}")
        backend = info.handle.backend
        if self.kv_transport not in ("auto", "tcp", backend):
            raise ValueError(f"--kv-transport {self.kv_transport} cannot reach a pool in "
                             f"{backend} (use auto, tcp or {backend})")
        dtype = eng.model.dtype
        if dtypes.to_torch(info.dtype) != dtype:
            raise ValueError(f"KV-store pool dtype {info.dtype} differs from the model's {dtype}: "
                             f"start both with one --dtype")
        pool = generations = None
        if self.kv_transport != "tcp":
            if (backend == "cuda_ipc") != (here.type == "cuda"):
                where = "GPU memory" if backend == "cuda_ipc" else "host shared memory"
                raise ValueError(f"the KV-store pool is in {where} but this worker runs on "
                                 f"{here}: start workers and the store on one kind of device "
                                 f"(--device cuda for both, or cpu for both), or take hand-offs "
                                 f"over the wire with --kv-transport tcp")
            try:
                pool, generations = open_pool(info)
            except (FileNotFoundError, ValueError) as e:
                if self.kv_transport != "auto":
                    raise
                log.warning("cannot map the store's pool (%s): KV hand-offs over tcp", e)
        if self.layers is not None:   # a re-attach: the old pool's publisher goes
            self.layers.close()
            self.layers = None
        if pool is None:   # over the wire: decode only
            self.store, self.pool_info, self.pool, self.generations = store, info, None, None
            self.transport, self.prefill = "tcp", None
            self.prefetcher = Prefetcher(info, self.prefetch_max_bytes,
                                         threaded=self.prefetch_threaded)
            return
        self.transport = backend
        self.store, self.pool_info, self.pool, self.generations = store, info, pool, generations
        group = eng.group
        if group is None:
            cache, runner = StoreKVCache(pool), None
        else:   # every rank maps the pool and writes its own (layers, heads) slice
            cache, runner = group.attach_pool(info, pool), group.runner("prefill")
        self.prefill = LLMEngine(eng.model, eng.config, tuple(eng.eos_token_ids), eng.tokenizer,
                                 block_manager=LeasedBlockManager(info.num_blocks, info.block_size),
                                 kv_cache=cache, runner=runner)
        progress = open_progress(info)
        # one process sees its own layers finish; a group's ranks each write a slice, so a
        # group publishes at commit only (no PrefillStarted)
        if progress is not None and group is None and self.layerwise_min_tokens > 0:
            self.layers = LayerProgress(eng.model, progress, info.block_size)
            self.prefill.step_observer = self.layers.step

    def _same_epoch(self, pool_name: str) -> list[P.Msg] | None:
        """The store's pool is `pool_name` now: re-attach if the store came back with a
        new one (the prompts held here belonged to the old one and end with an error).
        None when pool_name is not the store's current pool either (a stale handle)."""
        if pool_name == self.pool_info.handle.base:
            return []
        info = self.store.pool_info()
        if info.handle.base != pool_name:
            return None
        old = self.pool_info
        log.warning("the KV store restarted (pool %s -> %s, epoch %d): re-attaching",
                    old.handle.base[:32], pool_name[:32], info.epoch)
        dropped = list(self.prefill_jobs)
        for rid in dropped:
            self.prefill_jobs.pop(rid)
            self.prefill.abort(rid)
        self.attach_store(self.store, info)
        if self.transport != "tcp":
            close_pool(old)   # unmapped once the old engine's views are gone
        return [P.ErrorReply(code="unavailable", request_id=rid,
                             message="KV store unavailable: it restarted during the prefill")
                for rid in dropped]

    # -- messages in ----------------------------------------------------------------------
    def handle(self, msg: P.Msg) -> list[P.Msg]:
        """Apply one message from the gateway; returns what to send back. Never raises for
        a bad or failing request: it is answered with ErrorReply naming the request."""
        rid = getattr(msg, "request_id", None)
        handler = self._handlers.get(type(msg))
        if handler is None:
            return [P.ErrorReply(code="bad_request", request_id=rid,
                                 message=f"a worker does not handle {type(msg).__name__}")]
        try:
            return handler(msg)
        except Exception as e:  # a bad request must not take the worker down
            return [self._error(rid, e)]

    def _error(self, rid: str | None, e: Exception) -> P.ErrorReply:
        if isinstance(e, KVChecksumError):
            code, msg = "kv_corrupt", str(e)
        elif isinstance(e, KVStoreError):
            code = "unavailable" if e.code == "timeout" else e.code
            msg = f"KV store unavailable: {e.message}" if code == "unavailable" else e.message
        elif isinstance(e, StaleBlockError):
            code, msg = "stale_kv", str(e)
        elif isinstance(e, ValueError):
            code, msg = "bad_request", str(e)
        else:
            log.exception("request %s failed", rid)
            code, msg = "internal", f"{type(e).__name__}: {e}"
        log.warning("request %s: %s (%s)", rid, code, msg)
        return P.ErrorReply(code=code, message=msg, request_id=rid)

    def _on_prefill(self, req: P.PrefillRequest) -> list[P.Msg]:
        if self.prefill is None:
            raise ValueError(f"worker {self.worker_id} has no KV store, so it cannot prefill")
        want = params_from_spec(req.sampling)
        params = dataclasses.replace(want, max_tokens=1, n=1)   # prefill samples token 1 only
        params.validate()
        self.prefill.check_prompt(req.prompt_ids, params)
        lease = PrefillLease.acquire(self.store, req.request_id, req.prompt_ids, self.worker_id)
        try:
            msgs = self._same_epoch(lease.pool) if lease.pool else []
            if msgs is None:
                raise StaleBlockError(f"the store answered from pool {lease.pool!r}, which "
                                      f"is not its current one")
            self._verified(req.request_id, lambda: lease.verify_cached(
                self.pool, self.pool_info.block_size, self.kv_verify))
            self.prefill.block_manager.assign(req.request_id, lease.block_ids, lease.cached_tokens)
            self.prefill.add_request(req.request_id, req.prompt_ids, params)
        except BaseException:
            self.prefill.block_manager.unassign(req.request_id)
            self._quietly(lease.release, req.request_id)
            raise
        self.prefill_jobs[req.request_id] = PrefillJob(req, want, lease, self.clock())
        uncached = len(req.prompt_ids) - lease.cached_tokens
        if self.layers is not None and uncached >= self.layerwise_min_tokens:
            self.layers.track(req.request_id, lease.block_ids,
                              lease.cached_tokens // self.pool_info.block_size,
                              len(req.prompt_ids))
            msgs.append(P.PrefillStarted(request_id=req.request_id, lease_id=lease.lease_id,
                                         kv=lease.kv_ref(self.pool_info, len(req.prompt_ids)),
                                         num_cached_tokens=lease.cached_tokens))
        return msgs

    def _on_prefetch(self, msg: P.KVPrefetch) -> list[P.Msg]:
        """Start fetching a prefilling request's KV layer by layer (decode over tcp); a
        worker that maps the pool, or has no room for it, waits for the DecodeRequest."""
        if self.prefetcher is None:
            return []
        if not self.prefetcher.start(msg):
            log.info("request %s: no staging room for a layer-wise fetch (%d MB held)",
                     msg.request_id, self.prefetcher.bytes_held >> 20)
        return []

    def _on_decode(self, req: P.DecodeRequest) -> list[P.Msg]:
        params = params_from_spec(req.sampling)
        job = DecodeJob(req.request_id, self.clock(), dict(req.timings))
        if req.kv is None:   # colocated: the whole request runs here
            self.decode.add_request(req.request_id, req.prompt_ids, params)
            self.decode_jobs[req.request_id] = job
            return []
        if req.first_token is None or req.lease_id is None:
            raise ValueError("a decode hand-off needs first_token and lease_id")
        if self.store is None:
            raise ValueError(f"worker {self.worker_id} has no KV store to take a hand-off from")
        if not self.decode.can_add_prefilled(len(req.prompt_ids)):
            # not claimed: the gateway may hand the lease to another decode worker
            return [P.ErrorReply(code="no_blocks", request_id=req.request_id,
                                 message=f"decode worker {self.worker_id} has no room")]
        msgs = self._same_epoch(req.kv.handle.base)
        if msgs is None:
            raise StaleBlockError(f"request {req.request_id}: KV blocks live in pool "
                                  f"{req.kv.handle.base!r}, which the store no longer serves "
                                  f"(it restarted)")
        claim = DecodeClaim.claim(self.store, self.pool_info, req.request_id, req.lease_id, req.kv,
                                  self.worker_id, self.kv_verify)
        t_copy = self.clock()
        try:
            staged = None
            if self.prefetcher is not None:   # fetched layer by layer while it prefilled?
                staged = self.prefetcher.take(req.request_id, req.lease_id, req.kv, self.store)
            if staged is not None:
                load = lambda dst: claim.load_staged(self.decode.kv_cache, self.pool_info,  # noqa: E731
                                                     staged.staging, dst)
            elif self.pool is None:   # tcp: the blocks come over the wire
                load = lambda dst: claim.fetch_into(self.decode.kv_cache, self.store,  # noqa: E731
                                                    self.pool_info, dst)
            else:
                load = lambda dst: claim.copy_into(self.decode.kv_cache, self.pool,  # noqa: E731
                                                   self.generations, dst)
            self._verified(req.request_id, lambda: self.decode.add_prefilled(
                req.request_id, req.prompt_ids, req.first_token, params, load))
        finally:
            self._quietly(claim.release, req.request_id)
        job.timings["kv_handoff"] = self.clock() - t_copy
        self.decode_jobs[req.request_id] = job
        return msgs

    def _verified(self, rid: str, fn: Callable[[], object]) -> None:
        """Run fn; on a KVChecksumError the bad blocks leave the store's prefix index (no
        later prompt reuses them), the failure is counted, and the error goes on up (the
        gateway prefills the prompt again)."""
        try:
            fn()
        except KVChecksumError as e:
            self.checksum_failures += 1
            self._quietly(lambda: self.store.evict(rid, e.block_ids), rid)
            raise

    def _on_abort(self, msg: P.Abort) -> list[P.Msg]:
        self.abort(msg.request_id, msg.reason)
        return []

    def _on_set_role(self, msg: P.SetRole) -> list[P.Msg]:
        if msg.role == "prefill" and self.prefill is None:
            raise ValueError(f"role prefill needs a KV store; worker {self.worker_id} has none")
        log.info("role %s -> %s", self.role, msg.role)
        self.role = msg.role
        return [self.heartbeat()]   # announce the new role now

    def _on_drain(self, msg: P.Drain) -> list[P.Msg]:
        log.info("draining %s", "on: no new requests" if msg.enable else "off")
        self.draining = msg.enable
        return []

    def _on_status(self, msg: P.StatusRequest) -> list[P.Msg]:
        return [P.StatusReply(service="worker", data=self.status())]

    # -- steps ------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.decode.has_unfinished() or (self.prefill is not None
                                                and self.prefill.has_unfinished())

    def step(self) -> list[P.Msg]:
        """One prefill step and one decode step, each if it has work; the messages they
        produce. A failing engine step fails that engine's requests, not the worker."""
        engines = [e for e in (self.prefill, self.decode) if e is not None and e.has_unfinished()]
        tokens_before = sum(_tokens_done(e) for e in engines)
        budget = sum(min(e.config.max_num_batched_tokens,
                         e.scheduler.num_queued_tokens + len(e.scheduler.running)) for e in engines)
        self.step_expected_s = max(budget, 1) * self.s_per_token
        self.step_started = t0 = self.clock()
        out: list[P.Msg] = []
        try:
            if self.prefill is not None and self.prefill.has_unfinished():
                out += self._guarded(self._step_prefill, self.prefill_jobs)
            if self.decode.has_unfinished():
                out += self._guarded(self._step_decode, self.decode_jobs)
        finally:
            self.step_started = None
        done = sum(_tokens_done(e) for e in engines) - tokens_before
        if done:   # seconds per token, smoothed: what the next step's expectation uses
            self.s_per_token += 0.2 * ((self.clock() - t0) / done - self.s_per_token)
        return out

    def _guarded(self, step: Callable[[], list[P.Msg]], jobs: dict) -> list[P.Msg]:
        try:
            return step()
        except Exception as e:
            log.exception("engine step failed; failing its %d requests", len(jobs))
            failed = list(jobs)
            for rid in failed:
                self.abort(rid, "engine step failed")
            return [P.ErrorReply(code="internal", request_id=rid,
                                 message=f"engine step failed: {type(e).__name__}: {e}")
                    for rid in failed]

    def _step_prefill(self) -> list[P.Msg]:
        msgs = self._drop_stale_prefills()
        t0 = self.clock()
        outputs = self.prefill.step()
        for rid, job in self.prefill_jobs.items():
            seqs = self.prefill.requests.get(rid)
            if job.t_start is None and (not seqs or seqs[0].num_computed_tokens
                                        > job.lease.cached_tokens):
                job.t_start = t0
        for out in outputs:
            job = self.prefill_jobs.pop(out.request_id, None)
            if job is not None:
                try:
                    msgs.append(self._prefill_done(job, out, t0))
                except Exception as e:
                    self._quietly(job.lease.release, out.request_id)
                    msgs.append(self._error(out.request_id, e))
                finally:
                    if self.layers is not None:
                        self.layers.untrack(out.request_id)
        return msgs

    def _drop_stale_prefills(self) -> list[P.Msg]:
        """Before writing: a prompt whose store blocks were handed to someone else (its
        lease expired, or the gateway gave us up for dead) is dropped, not computed."""
        msgs = []
        for rid, job in list(self.prefill_jobs.items()):
            try:
                job.lease.check(self.generations, "before the prefill step")
            except StaleBlockError as e:
                self.prefill_jobs.pop(rid)
                self.prefill.abort(rid)
                if self.layers is not None:
                    self.layers.untrack(rid)
                msgs.append(self._error(rid, e))
        return msgs

    def _prefill_done(self, job: PrefillJob, out, t0: float) -> P.PrefillDone:
        req, lease = job.req, job.lease
        if self.pool.is_cuda:   # every KV write into the GPU pool done before anyone is told
            torch.cuda.current_stream(self.pool.device).synchronize()
        lease.check(self.generations, "after the prefill step")
        lease.hash_blocks(self.pool, len(req.prompt_ids), self.pool_info.block_size)
        written = time.time()
        if self.layers is not None and req.request_id in self.layers.prompts:
            written = self.layers.finish(req.request_id, lease.block_ids[:len(lease.checksums)])
        lease.commit(req.prompt_ids, written)
        first = out.new_token_ids[0]
        reason = self.decode.finish_reason_for(first, job.params, 1, len(req.prompt_ids) + 1)
        if reason is not None:   # nothing left for decode: the blocks stay only as cache
            lease.release()
        lp = out.new_logprobs[0] if out.new_logprobs else None
        return P.PrefillDone(
            request_id=req.request_id, first_token=first, lease_id=lease.lease_id,
            kv=lease.kv_ref(self.pool_info, len(req.prompt_ids)),
            num_cached_tokens=lease.cached_tokens,
            num_computed_tokens=len(req.prompt_ids) - lease.cached_tokens,
            first_logprobs=logprobs_to_wire(lp) if lp and job.params.logprobs is not None else None,
            finish_reason=reason,
            timings={"prefill_queue": (job.t_start or t0) - job.t_recv,
                     "prefill_compute": self.clock() - (job.t_start or t0)})

    def _step_decode(self) -> list[P.Msg]:
        t0 = self.clock()
        for job in self.decode_jobs.values():
            if not job.started:
                job.started = True
                job.timings["decode_queue"] = t0 - job.t_recv
        msgs = []
        for out in self.decode.step():
            job = self.decode_jobs.get(out.request_id)
            timings = {}
            if job is not None and job.timings:
                timings, job.timings = job.timings, {}
            lps = [logprobs_to_wire(r) for r in out.new_logprobs] if out.new_logprobs else None
            msgs.append(P.TokenBatch(request_id=out.request_id, ids=out.new_token_ids,
                                     logprobs=lps, finish_reason=out.finish_reason,
                                     timings=timings))
            if out.finished:
                self.decode_jobs.pop(out.request_id, None)
        return msgs

    # -- aborts and reports ---------------------------------------------------------------
    def abort(self, request_id: str, reason: str = "") -> None:
        """Drop a request wherever it is; its local blocks and store lease are given back."""
        job = self.prefill_jobs.pop(request_id, None)
        if job is not None:
            self.prefill.abort(request_id)
            self._quietly(job.lease.release, request_id)
        if self.layers is not None:
            self.layers.untrack(request_id)
        if self.prefetcher is not None:
            self.prefetcher.cancel(request_id)
        if self.decode_jobs.pop(request_id, None) is not None:
            self.decode.abort(request_id)
        log.info("request %s aborted (%s)", request_id, reason)

    def abort_all(self, reason: str) -> None:
        for rid in list(self.prefill_jobs) + list(self.decode_jobs):
            self.abort(rid, reason)

    def lease_ids(self) -> list[int]:
        """The store leases this worker holds: its queued and running prompts'. Whoever
        renews them may run on another thread (a long step must not let them expire)."""
        return [j.lease.lease_id for j in self.prefill_jobs.values()]

    def register(self, model: str, devices: list[str]) -> P.Register:
        eng = self.decode
        return P.Register(worker_id=self.worker_id, role=self.role, model=model, devices=devices,
                          max_batch_tokens=eng.config.max_num_batched_tokens,
                          total_blocks=eng.block_manager.num_blocks,
                          free_blocks=eng.block_manager.num_free_blocks,
                          block_size=eng.config.block_size, max_seqs=eng.config.max_num_seqs,
                          incarnation=self.incarnation, tp=self.shape[0], pp=self.shape[1],
                          kv_transport=self.transport)

    @property
    def shape(self) -> tuple[int, int]:
        """(tp, pp) of this worker's group; (1, 1) for one process."""
        return self.decode.group.shape if self.decode.group is not None else (1, 1)

    def tick(self) -> None:
        """Between steps: a group checks its ranks and keeps idle followers' waits short
        (GroupError when a rank is gone: the worker then exits as a whole)."""
        if self.decode.group is not None:
            self.decode.group.tick()

    def heartbeat(self) -> P.Heartbeat:
        s = self.decode.scheduler
        queued = s.num_queued_tokens + sum(len(j.req.prompt_ids) for j in self.prefill_jobs.values())
        return P.Heartbeat(worker_id=self.worker_id, role=self.role,
                           free_blocks=self.decode.block_manager.num_free_blocks,
                           running=len(s.running), waiting=len(s.waiting), queued_tokens=queued,
                           prefill_steps=self.prefill.stats.steps if self.prefill else 0,
                           decode_steps=self.decode.stats.steps,
                           ranks_alive=([r["alive"] for r in self.decode.group.rank_health()]
                                        if self.decode.group else []))

    def status(self) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "draining": self.draining,
                "decode": self.decode.idle_counts(), "prefill_jobs": len(self.prefill_jobs),
                "decode_jobs": len(self.decode_jobs), "kv_verify": self.kv_verify,
                "kv_checksum_failures": self.checksum_failures,
                "kv_transport": self.transport, "tp": self.shape[0], "pp": self.shape[1],
                "kv_prefetch": dict(self.prefetcher.stats, held_mb=self.prefetcher.bytes_held >> 20)
                if self.prefetcher else None,
                "ranks": self.decode.group.rank_health() if self.decode.group else []}

    def progress(self, now: float) -> tuple[float, float]:
        """(busy_s, expected_s) of the running step, (0, 0) between steps; safe to call
        from another thread."""
        started = self.step_started
        if started is None:
            return 0.0, 0.0
        return max(now - started, 0.0), self.step_expected_s

    @staticmethod
    def _quietly(fn: Callable[[], None], rid: str | None) -> None:
        """A store call whose failure must not fail the caller (a lease that is not given
        back expires by its TTL)."""
        try:
            fn()
        except KVStoreError as e:
            log.warning("request %s: store call failed (%s); its lease will expire", rid, e)
