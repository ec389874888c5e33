"""The KV-store process: a KVStore (store.py) behind a ROUTER.

The segment's layout is in layout.py. KVPoolInfo.handle names the pool part;
StatusReply data also carries 'generations', the derived handle, for readers
that want it plainly.

Every request gets exactly one reply: its answer, or ErrorReply with the
request id ('bad_request', 'not_found', 'no_blocks', 'internal'). Frames that
fail protocol validation are answered by recv_msg with 'bad_message'. Neither
stops the loop. Unclaimed leases are expired every config.expire_interval_s.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from shared import transport
from shared.buffers.handle import ITEMSIZE, numel
from shared.buffers.shm import SHM_DIR
from shared.models.config import ModelConfig
from shared.protocol import (Ack, ErrorReply, KVAcquire, KVAllocate, KVClaim, KVCommit,
                             KVDropHolder, KVEvict, KVLookup, KVPoolQuery, KVRead, KVRelease, KVRenew, KVStats, Msg,
                             StatusReply, StatusRequest)
from services.kvstore.config import KVStoreConfig
from services.kvstore.layout import pool_shape, segment_nbytes
from services.kvstore.pool import PoolError
from services.kvstore.store import KVStore

log = logging.getLogger(__name__)

MAX_BATCH = 256  # messages served per wake-up before expiry gets a look-in


class KVStoreService:
    """A KVStore behind a ROUTER; run() serves until stop()."""

    def __init__(self, config: KVStoreConfig, ctx: zmq.Context | None = None):
        self.config = config
        model = ModelConfig.from_dir(config.model_dir)
        self.dtype = config.resolved_dtype()
        shape = pool_shape(config.num_blocks, model.num_layers, config.block_size,
                           model.num_kv_heads, model.head_dim)
        if config.device == "cpu":
            _check_shm_space(segment_nbytes(numel(shape) * ITEMSIZE[self.dtype], config.num_blocks),
                             config.num_blocks)
        self._own_ctx = ctx is None
        self.ctx = ctx
        self.sock: zmq.Socket | None = None
        self._metrics: _Metrics | None = None
        self._stop = threading.Event()
        self.store = KVStore(config.num_blocks, config.block_size, model.num_layers,
                             model.num_kv_heads, model.head_dim, self.dtype, config.lease_ttl_s,
                             device=config.device)
        try:
            self.ctx = ctx or transport.make_context()
            self.sock = _bind(self.ctx, config)
            self.address = transport.endpoint(self.sock)
            if config.metrics_port is not None:
                self._metrics = _Metrics(config.metrics_port)
        except BaseException:
            self.close()
            raise
        st = self.store
        self._handlers: dict[type, Callable[[Any], Msg]] = {
            KVPoolQuery: lambda m: st.info,
            KVAcquire: lambda m: st.acquire(m.request_id, m.token_ids, m.holder),
            KVLookup: lambda m: st.lookup(m.request_id, m.token_ids),
            KVAllocate: lambda m: st.allocate(m.request_id, m.num_blocks, m.lease_id),
            KVCommit: lambda m: _ack(m, st.commit(m.request_id, m.lease_id, m.block_ids,
                                                  m.token_ids, m.checksums, m.written_ts)),
            KVEvict: lambda m: _ack(m, self._evict(m)),
            KVRead: lambda m: st.read(m.request_id, m.lease_id, m.block_ids, m.from_layers),
            KVClaim: lambda m: st.claim(m.request_id, m.lease_id, m.holder),
            KVDropHolder: lambda m: _ack(m, self._drop_holder(m.holder)),
            KVRelease: lambda m: _ack(m, st.release(m.request_id, m.lease_id)),
            KVRenew: lambda m: _ack(m, st.renew(m.lease_ids)),
            KVStats: lambda m: st.stats(),
            StatusRequest: lambda m: StatusReply(service="kvstore",
                                                 data={"address": self.address, **st.status()}),
        }
        log.info("kvstore on %s: %d blocks of %d tokens, %s %s on %s, %s (%.2f MiB), lease ttl %gs",
                 self.address, config.num_blocks, config.block_size, self.dtype, shape,
                 config.device, st.segment.shm_name, st.segment.nbytes / 2**20, config.lease_ttl_s)

    def _evict(self, m: KVEvict) -> None:
        n = self.store.evict(m.request_id, m.block_ids)
        log.warning("request %s: blocks %s failed their checksum; %d taken out of the "
                    "prefix index", m.request_id, m.block_ids[:8], n)

    def _drop_holder(self, holder: str) -> None:
        n = self.store.drop_holder(holder)
        if n:
            log.warning("released %d leases of %s, which the gateway lost", n, holder)

    @property
    def pool(self):
        return self.store.pool

    @property
    def info(self):
        return self.store.info

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        """Serve requests and expire leases until stop() (or a signal handler
        calling it). Never raises for a bad request."""
        interval = self.config.expire_interval_s
        next_expire = time.monotonic() + interval
        while not self._stop.is_set():
            wait_ms = int(max(0.0, min(next_expire - time.monotonic(), 0.1)) * 1000)
            if self.sock.poll(wait_ms):
                self.serve_pending()
            if time.monotonic() >= next_expire:
                self.expire()
                next_expire = time.monotonic() + interval

    def stop(self) -> None:
        """Ask run() to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve_pending(self) -> int:
        """Answer the messages waiting on the socket (at most MAX_BATCH)."""
        served = 0
        while served < MAX_BATCH:
            try:
                item = transport.recv_msg(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                break
            served += 1
            if item is None:
                continue  # invalid: recv_msg logged it and sent the ErrorReply
            identity, msg = item
            transport.send_msg(self.sock, self.handle(msg), identity)
        self._update_metrics()
        return served

    def expire(self) -> int:
        n = self.store.expire()
        if n:
            self._update_metrics()
        return n

    def handle(self, msg: Msg) -> Msg:
        """The reply to one decoded request; refusals become ErrorReply."""
        rid = getattr(msg, "request_id", None)
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning("request %s: kvstore does not serve %s", rid, type(msg).__name__)
            return ErrorReply(code="bad_request", request_id=rid,
                              message=f"the kvstore does not serve {type(msg).__name__} messages")
        try:
            return handler(msg)
        except PoolError as e:
            log.info("request %s: %s refused (%s): %s", rid, type(msg).__name__, e.code, e.message)
            return ErrorReply(code=e.code, message=e.message, request_id=rid)
        except Exception as e:  # a bug must not take the store (and every lease) down
            log.exception("request %s: %s failed", rid, type(msg).__name__)
            return ErrorReply(code="internal", message=f"{type(e).__name__}: {e}", request_id=rid)

    # ---------------------------------------------------------------- lifetime

    def _update_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.update(self.pool.stats())

    def close(self) -> None:
        """Close the socket and metrics server; unlink the shm segment (views
        still open elsewhere stay valid until unmapped). Idempotent."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.sock is not None:
            self.sock.close(transport.LINGER_MS)
            self.sock = None
        if self._own_ctx and self.ctx is not None:
            transport.close_context(self.ctx)
            self.ctx = None
        if self.store is not None:
            self.store.close()
            log.info("kvstore closed; shm %s unlinked", self.store.segment.shm_name)
            self.store = None


def _ack(m: Msg, _done: None) -> Ack:
    return Ack(request_id=m.request_id)


def _check_shm_space(nbytes: int, num_blocks: int) -> None:
    """Fail now, naming sizes, rather than SIGBUS on first write to a tmpfs too small."""
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise ValueError(f"a pool of {num_blocks} blocks needs {nbytes / 2**20:.1f} MiB of shared memory "
                         f"but {SHM_DIR} has {free / 2**20:.1f} MiB free; lower num_blocks")


def _bind(ctx: zmq.Context, config: KVStoreConfig) -> zmq.Socket:
    if config.bind.startswith("ipc://"):
        Path(config.bind[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
    curve = transport.CurveConfig.from_dir(config.curve_dir, "server") if config.curve_dir else None
    return transport.bind_router(ctx, config.bind, curve)


class _Metrics:
    """Prometheus gauges and counters on their own registry and HTTP port."""

    def __init__(self, port: int):
        import prometheus_client as prom
        self.registry = prom.CollectorRegistry()
        gauge = lambda name, doc: prom.Gauge(name, doc, registry=self.registry)  # noqa: E731
        counter = lambda name, doc: prom.Counter(name, doc, registry=self.registry)  # noqa: E731
        self.gauges = {
            "free_blocks": gauge("duet_kv_free_blocks", "Blocks holding nothing, ready to hand out"),
            "leased_blocks": gauge("duet_kv_leased_blocks", "Blocks pinned by a live lease"),
            "cached_blocks": gauge("duet_kv_cached_blocks", "Unpinned blocks holding a cached prefix (evictable)"),
        }
        self.counters = {
            "lookup_tokens": counter("duet_kv_lookup_tokens", "Prompt tokens looked up in the prefix cache"),
            "hit_tokens": counter("duet_kv_hit_tokens", "Looked-up tokens served from the prefix cache"),
            "expired_leases": counter("duet_kv_expired_leases", "Leases released because nobody claimed them"),
        }
        self._seen = {k: 0 for k in self.counters}
        self.server, self.thread = prom.start_http_server(port, registry=self.registry)

    def update(self, stats: dict[str, int]) -> None:
        for key, g in self.gauges.items():
            g.set(stats[key])
        for key, c in self.counters.items():
            if stats[key] > self._seen[key]:
                c.inc(stats[key] - self._seen[key])
                self._seen[key] = stats[key]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
