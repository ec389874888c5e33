"""The layer-wise KV hand-off over tcp: a long prompt's KV leaves prefill's host layer by
layer while prefill still computes the layers after, so its transfer hides behind its own
prefill (as Mooncake does) instead of following it.

Prefill side, LayerProgress: for each prompt it tracks (one PrefillStarted told the
gateway its blocks), after every layer of every prefill step it writes into the pool's
progress array (KVPoolInfo.progress, host shm) how many layers each block the step
finished now holds; at commit, num_layers for all of them. The store serves only written
layers (KVRead.from_layers). Steps without per-layer hooks (a CUDA graph, the fused decode
stack of a one-token chunk) publish at commit only: later, never wrong.

Decode side, Prefetcher: the gateway sends KVPrefetch to the decode worker it means to
hand the request to; a thread of that worker (with its own store client) polls the store
for the layers written since its last read and copies them into a staging tensor in the
store's layout. When the DecodeRequest comes (prefill committed, so every layer is
written), the worker takes the job, waits for its last layers, verifies the blocks'
checksums against the committed ones and copies them into its paged cache. A job that
failed (the lease went away, a block was recycled) or is not there falls back to the
plain tcp read (DecodeClaim.fetch_into).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from services.kvstore.layout import StaleBlockError
from services.kvstore.port import KVStoreError, KVStorePort
from services.kvstore.store import MAX_POLL_BLOCKS, MAX_READ_BLOCKS
from shared import protocol as P
from shared.buffers import dtypes, tcp
from shared.engine.block_manager import blocks_for

log = logging.getLogger("duet.worker")
PREFETCH_TTL_S = 120.0   # a job nobody took (its request went elsewhere, or died): dropped
POLL_MIN_S, POLL_MAX_S = 0.002, 0.05   # a job with nothing new waits this long, doubling


class LayerProgress:
    """Publishes, after each layer of each prefill step, which blocks of the tracked prompts
    are written through that layer. `model`'s layers get forward hooks; they act only
    inside step() (the model is shared with the decode engine)."""

    def __init__(self, model, progress: torch.Tensor, block_size: int):
        self.progress, self.block_size = progress, block_size
        self.num_layers = len(model.layers)
        self.sync = model.device.type == "cuda"   # a layer's writes land before it is told
        self.prompts: dict[str, tuple[list[int], int]] = {}   # request -> (blocks, prompt len)
        self.last_layer_ts: dict[str, float] = {}
        self._step: tuple[torch.Tensor, list[str]] | None = None
        self._hooks = [layer.register_forward_hook(self._after_layer) for layer in model.layers]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def track(self, request_id: str, block_ids: list[int], cached_blocks: int,
              prompt_len: int) -> None:
        """Before anyone reads them: the fresh blocks hold no layer yet, the cached prefix
        every layer (it was committed)."""
        fresh = block_ids[cached_blocks:blocks_for(prompt_len, self.block_size)]
        if fresh:
            self.progress[torch.tensor(fresh, dtype=torch.int64)] = 0
        if cached_blocks:
            self.progress[torch.tensor(block_ids[:cached_blocks], dtype=torch.int64)] = self.num_layers
        self.prompts[request_id] = (list(block_ids), prompt_len)

    def untrack(self, request_id: str) -> None:
        self.prompts.pop(request_id, None)
        self.last_layer_ts.pop(request_id, None)

    def finish(self, request_id: str, block_ids: list[int]) -> float:
        """At commit: every block of the prompt holds every layer. When its last layer
        was written (time.time())."""
        if block_ids:
            self.progress[torch.tensor(block_ids, dtype=torch.int64)] = self.num_layers
        written = self.last_layer_ts.pop(request_id, None) or time.time()
        self.prompts.pop(request_id, None)
        return written

    @contextmanager
    def step(self, batch):
        """Around one prefill step: the blocks of tracked prompts that it completes (all of
        their tokens written once a layer has run), published layer by layer."""
        done, ending = [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            tracked = self.prompts.get(seq.request_id)
            if tracked is None:
                continue
            blocks, prompt_len = tracked
            c0, c1 = seq.num_computed_tokens, seq.num_computed_tokens + n
            last = blocks_for(prompt_len, self.block_size) if c1 >= prompt_len \
                else c1 // self.block_size
            done += blocks[c0 // self.block_size:last]
            if c1 >= prompt_len:
                ending.append(seq.request_id)
        self._step = (torch.tensor(done, dtype=torch.int64), ending) if done or ending else None
        try:
            yield
        finally:
            self._step = None

    def _after_layer(self, module, inputs, output) -> None:
        if self._step is None:
            return
        idx, ending = self._step
        if self.sync:
            torch.cuda.current_stream().synchronize()
        if idx.numel():
            self.progress[idx] = module.index + 1
        if module.index == self.num_layers - 1:
            now = time.time()
            for rid in ending:
                self.last_layer_ts[rid] = now


@dataclass
class PrefetchJob:
    request_id: str
    lease_id: int
    kv: P.KVRef
    staging: torch.Tensor                  # [n, num_layers, 2, block_size, kv_heads, head_dim]
    have: list[int]                        # per block: layers fetched so far
    created: float
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None
    fetched_early: int = 0                 # (block, layer) slices fetched before take()
    taken: bool = False
    wait_s: float = POLL_MIN_S
    next_poll: float = 0.0

    @property
    def complete(self) -> bool:
        return all(h == self.staging.shape[1] for h in self.have)


class Prefetcher:
    """The decode side's layer-wise fetches. start(), cancel() and take() are called by
    the engine thread; poll() by whoever fetches: the worker's prefetch thread, or take()
    itself where there is none (tests of the core)."""

    def __init__(self, info: P.KVPoolInfo, max_bytes: int, clock=time.monotonic,
                 threaded: bool = False):
        self.info, self.max_bytes, self.clock, self.threaded = info, max_bytes, clock, threaded
        self.jobs: dict[str, PrefetchJob] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()          # a new job: the fetching thread stops idling
        self.stats = {"started": 0, "refused": 0, "used": 0, "failed": 0, "expired": 0}

    @property
    def bytes_held(self) -> int:
        with self.lock:
            return sum(j.staging.numel() * j.staging.element_size() for j in self.jobs.values())

    def start(self, msg: P.KVPrefetch) -> bool:
        """Begin fetching a prefilling request's blocks; False (nothing held) when its
        staging would pass max_bytes."""
        n = blocks_for(msg.kv.num_tokens, self.info.block_size)
        i = self.info
        shape = [n, i.num_layers, 2, i.block_size, i.num_kv_heads, i.head_dim]
        nbytes = n * i.num_layers * 2 * i.block_size * i.num_kv_heads * i.head_dim \
            * dtypes.to_torch(i.dtype).itemsize
        self.cancel(msg.request_id)   # a request prefilled again: its new lease replaces
        if self.bytes_held + nbytes > self.max_bytes:
            self.stats["refused"] += 1
            return False
        job = PrefetchJob(msg.request_id, msg.lease_id, msg.kv,
                          torch.empty(shape, dtype=dtypes.to_torch(i.dtype)), [0] * n,
                          self.clock())
        with self.lock:
            self.jobs[msg.request_id] = job
        self.stats["started"] += 1
        self.wake.set()
        return True

    def cancel(self, request_id: str) -> None:
        with self.lock:
            job = self.jobs.pop(request_id, None)
        if job is not None:
            job.done.set()

    def take(self, request_id: str, lease_id: int, kv: P.KVRef, store: KVStorePort,
             timeout_s: float = 10.0) -> PrefetchJob | None:
        """The finished job for this hand-off (every layer fetched), or None: never
        started, failed, for another lease or other blocks, or not done in timeout_s.
        Either way the job is no longer held."""
        with self.lock:
            job = self.jobs.get(request_id)
            if job is not None:
                job.taken = True
        if job is None:
            return None
        n = len(job.have)
        if job.lease_id != lease_id or list(kv.block_ids[:n]) != list(job.kv.block_ids[:n]) \
                or list(kv.generations[:n]) != list(job.kv.generations[:n]):
            self.cancel(request_id)
            return None
        deadline = self.clock() + timeout_s
        while not job.done.is_set() and self.clock() < deadline:
            if self.threaded:
                self.wake.set()
                job.done.wait(0.05)
            else:
                self.poll(store)
        self.cancel(request_id)
        if job.error is not None or not job.complete:
            self.stats["failed"] += 1
            log.warning("request %s: layer-wise prefetch %s; reading its KV whole",
                        request_id, job.error or "not done in time")
            return None
        self.stats["used"] += 1
        return job

    def poll(self, store: KVStorePort) -> bool:
        """One round: read what each due job's blocks gained since its last read. True
        when any layer arrived."""
        now = self.clock()
        with self.lock:
            jobs = [j for j in self.jobs.values() if not j.done.is_set()]
        got = False
        for job in jobs:
            if now - job.created > PREFETCH_TTL_S and not job.taken:
                self.stats["expired"] += 1
                self.cancel(job.request_id)
                continue
            if job.next_poll > now and not job.taken:
                continue
            try:
                n = self._fetch(job, store)
            except (KVStoreError, StaleBlockError, ValueError) as e:
                job.error = e
                job.done.set()
                continue
            got = got or n > 0
            if job.complete:
                job.done.set()
            job.wait_s = POLL_MIN_S if n else min(job.wait_s * 2, POLL_MAX_S)
            job.next_poll = now + job.wait_s
        return got

    def next_due(self) -> float | None:
        """Seconds until the earliest job is due a read (a taken one: now); None with no
        job."""
        now = self.clock()
        with self.lock:
            due = [now if j.taken else j.next_poll for j in self.jobs.values()
                   if not j.done.is_set()]
        return max(min(due) - now, 0.0) if due else None

    def _fetch(self, job: PrefetchJob, store: KVStorePort) -> int:
        """Ask the store about the job's blocks that lack layers (one request when nothing
        is new), from the layer each has, until a reply no longer fills its frames; how
        many (block, layer) slices came."""
        L = self.info.num_layers
        got, full = 0, True
        while full:
            part = [i for i, h in enumerate(job.have) if h < L][:MAX_POLL_BLOCKS]
            if not part:
                break
            ids = [job.kv.block_ids[i] for i in part]
            reply = store.read(job.request_id, job.lease_id, ids, [job.have[i] for i in part])
            want = [job.kv.generations[i] for i in part]
            if list(reply.generations) != want:
                raise StaleBlockError(f"KV blocks recycled during the layer-wise read (block, "
                                      f"expected, found): {list(zip(ids, want, reply.generations))[:4]}")
            full = len(reply.frames) == MAX_READ_BLOCKS
            frames = iter(reply.frames)
            for i, upto in zip(part, reply.upto_layers):
                lo = job.have[i]
                if upto <= lo:
                    continue
                view = tcp.from_frame(next(frames), self.info.dtype,
                                      [upto - lo, *job.staging.shape[2:]])
                job.staging[i, lo:upto].copy_(view)
                job.have[i] = upto
                got += upto - lo
        if not job.taken:
            job.fetched_early += got
        return got
