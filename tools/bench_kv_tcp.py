"""The tcp KV hand-off on loopback against raw ZeroMQ moving the same bytes, and the shm copy.

    python tools/bench_kv_tcp.py [--blocks 64] [--iters 20] [--json results/bench_kv_tcp.json]

A real KV store (KVStoreService, SmolLM2-135M's pool layout in bf16) serves on
tcp://127.0.0.1 from a thread of this process; the reader is a KVStoreClient, as a decode
worker on another host uses. One hand-off = claim a lease of --blocks blocks (64 blocks of
16 tokens: a 1k-token prompt), read them MAX_READ_BLOCKS at a time as frames sent from the
pool's pages, and copy each into a local paged cache (DecodeClaim.fetch_into, checksums
verified as by default). Rows:
  raw zmq          ROUTER -> DEALER on the same loopback, the same frames (one request per
                   32 blocks, replies sent copy=False from one buffer): the wire's ceiling
  tcp read         the store's KVRead replies alone (frames received, not copied)
  tcp hand-off     fetch_into: read + checksum + copy into the local cache
  shm hand-off     copy_into from the mapped pool (same host): the zero-copy path
GB/s counts the KV bytes moved once. Medians over --iters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import zmq  # noqa: E402


def median_s(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_zmq(block_bytes: int, blocks: int, per_read: int, iters: int) -> float:
    """Seconds to move `blocks` frames of block_bytes with the store's request pattern."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    payload = memoryview(bytearray(os.urandom(block_bytes)))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not router.poll(100):
                continue
            ident, req = router.recv_multipart()
            n = int(req)
            router.send_multipart([ident, b"h"] + [payload] * n, copy=False)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def handoff():
        left = blocks
        while left:
            n = min(per_read, left)
            dealer.send(str(n).encode())
            frames = dealer.recv_multipart(copy=False)
            assert len(frames) == n + 1
            left -= n

    try:
        return median_s(handoff, iters)
    finally:
        stop.set()
        t.join()
        dealer.close(0)
        router.close(0)
        ctx.term()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", default="results/bench_kv_tcp.json")
    a = ap.parse_args()
    from services.kvstore.client import KVStoreClient
    from services.kvstore.config import KVStoreConfig
    from services.kvstore.layout import block_checksums, open_pool
    from services.kvstore.service import KVStoreService
    from services.kvstore.store import MAX_READ_BLOCKS
    from services.worker.handoff import DecodeClaim
    from shared import protocol as P
    from shared.engine.kv_cache import LocalKVCache
    from shared.models.config import ModelConfig
    from shared.models.hub import resolve_model
    from shared.transport import close_context, make_context
    from tools.up import free_port

    model_dir = str(resolve_model(a.model))
    mc = ModelConfig.from_dir(model_dir)
    cfg = KVStoreConfig(model_dir=model_dir, bind=f"tcp://127.0.0.1:{free_port()}",
                        dtype="bfloat16", num_blocks=a.blocks * 2)
    service = KVStoreService(cfg)
    server = threading.Thread(target=service.run, daemon=True)
    server.start()
    ctx = make_context()
    try:
        kv = KVStoreClient(ctx, service.address, "bench", timeout_s=30)
        info = kv.pool_info()
        pool, generations = open_pool(info)
        pool.copy_(torch.randn(pool.shape, dtype=torch.float32).to(pool.dtype))
        lease = kv.acquire("bench", list(range(1, a.blocks * 16)), "bench")
        blocks = lease.block_ids[:a.blocks]
        sums = block_checksums(pool, blocks)
        kv.commit("bench", lease.lease_id, blocks, list(range(1, a.blocks * 16)), sums)
        ref = P.KVRef(handle=info.handle, block_ids=blocks, generations=lease.generations[:a.blocks],
                      num_tokens=a.blocks * 16, checksums=sums)
        claim = DecodeClaim.claim(kv, info, "bench", lease.lease_id, ref, "bench")
        cache = LocalKVCache(mc, a.blocks, 16, pool.dtype)
        dst = list(range(a.blocks))
        block_bytes = pool[0].numel() * pool.element_size()
        total = block_bytes * a.blocks

        def tcp_read():
            for s in range(0, a.blocks, MAX_READ_BLOCKS):
                got = kv.read("bench", lease.lease_id, blocks[s:s + MAX_READ_BLOCKS])
                assert len(got.frames) == len(blocks[s:s + MAX_READ_BLOCKS])

        rows = {
            "raw zmq": raw_zmq(block_bytes, a.blocks, MAX_READ_BLOCKS, a.iters),
            "tcp read": median_s(tcp_read, a.iters),
            "tcp hand-off": median_s(lambda: claim.fetch_into(cache, kv, info, dst), a.iters),
            "shm hand-off": median_s(lambda: claim.copy_into(cache, pool, generations, dst),
                                     a.iters),
        }
        # the local cache holds exactly the pool's blocks after a tcp hand-off
        claim.fetch_into(cache, kv, info, dst)
        for i, b in enumerate(blocks[:4]):
            assert torch.equal(cache.tensor[:, :, i], pool[b])
        kv.release("bench", lease.lease_id)
        kv.close()
    finally:
        close_context(ctx)
        service.stop()
        server.join()
        service.close()
    res = {"blocks": a.blocks, "block_bytes": block_bytes, "bytes": total,
           "threads": torch.get_num_threads(),
           "rows": {k: {"ms": v * 1e3, "GBps": total / v / 1e9} for k, v in rows.items()}}
    print(f"KV hand-off of {a.blocks} blocks x {block_bytes / 2**10:.0f} KiB = "
          f"{total / 2**20:.1f} MiB (SmolLM2-135M, bf16), loopback, median of {a.iters}:")
    print(f"  {'path':<14} {'ms':>8} {'GB/s':>7}  vs raw zmq")
    raw = rows["raw zmq"]
    for k, v in rows.items():
        print(f"  {k:<14} {v * 1e3:8.2f} {total / v / 1e9:7.2f}  {raw / v:8.2f}x")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
