"""The KV store as a real process: zero-copy pool, leases, expiry, hostile frames, shutdown."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import msgspec
import pytest
import torch

from services.kvstore.client import KVStoreClient, KVStoreError
from services.kvstore.layout import check_generations, open_pool
from shared import protocol as p
from shared import transport as t
from shared.buffers.shm import SHM_DIR, ShmRegion
from tests.conftest import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TTL_S = 2.0
NUM_BLOCKS, BLOCK_SIZE = 16, 8
# tiny_hf_config: 2 layers, 2 KV heads, head_dim 64/4 = 16
SHAPE = [NUM_BLOCKS, 2, 2, BLOCK_SIZE, 2, 16]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """A `python -m services.kvstore` subprocess and a client to it."""

    def __init__(self, model_dir, workdir, *flags, curve=None):
        self.addr = f"ipc://{workdir}/kv-{len(os.listdir(workdir))}.sock"
        self.log = open(os.path.join(workdir, f"kv-{os.getpid()}-{time.monotonic_ns()}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.kvstore", "--model", str(model_dir), "--bind", self.addr,
             "--dtype", "float32", "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
             "--log-level", "DEBUG", *flags], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.ctx = t.make_context()
        self.client = KVStoreClient(self.ctx, self.addr, "test", curve=curve, timeout_s=0.5)
        self.info = self._wait_ready()
        self.client.timeout_s = 10.0

    def _wait_ready(self, limit_s=30.0):
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"kvstore exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return self.client.pool_info()
            except KVStoreError as e:
                assert e.code in ("timeout", "unavailable"), e
        pytest.fail(f"kvstore not ready in {limit_s}s:\n{self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    @property
    def shm_path(self):
        return os.path.join(SHM_DIR, self.info.handle.base)

    def stop(self, sig=signal.SIGTERM):
        self.client.close()
        t.close_context(self.ctx)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))[0]


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="duetkv-")  # short: ipc paths are limited to ~100 chars
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def store(model_dir, workdir):
    port = free_port()
    s = Store(model_dir, workdir, "--lease-ttl", str(TTL_S), "--metrics-port", str(port))
    s.metrics_port = port
    yield s
    code = s.stop()
    assert code == 0, s.output()
    assert not os.path.exists(s.shm_path), "shm segment left behind"


@pytest.fixture
def client(store):
    yield store.client
    st = store.client.stats()  # every test leaves the pool idle
    assert (st.leased_blocks, st.leases) == (0, 0), store.client.status()["ledger"]
    assert st.free_blocks + st.cached_blocks == st.total_blocks


def test_pool_info_describes_one_shm_segment(store, client):
    info = store.info
    assert (info.num_blocks, info.num_layers, info.block_size, info.num_kv_heads, info.head_dim) == \
        (NUM_BLOCKS, 2, BLOCK_SIZE, 2, 16)
    assert info.dtype == "float32" and info.handle.backend == "shm" and info.handle.shape == SHAPE
    pool, gens = open_pool(info)
    assert list(pool.shape) == SHAPE and gens.dtype == torch.int64 and list(gens.shape) == [NUM_BLOCKS]
    region = ShmRegion.attach(info.handle.base)
    for view in (pool, gens):
        assert region.contains(view.data_ptr(), view.numel() * view.element_size())
    status = client.status()
    assert status["generations"]["offset"] == gens.data_ptr() - region.address
    assert status["pool"] == msgspec.to_builtins(info.handle)


READER = textwrap.dedent("""
    import json, sys
    import torch
    from services.kvstore.client import KVStoreClient
    from services.kvstore.layout import check_generations, open_pool
    from shared import transport as t
    from shared.buffers.shm import ShmRegion
    addr, blocks, gens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    ctx = t.make_context()
    with KVStoreClient(ctx, addr, "reader", timeout_s=10) as c:
        info = c.pool_info()
    pool, generations = open_pool(info)
    region = ShmRegion.attach(info.handle.base)
    check_generations(generations, blocks, gens, "before")   # raises when stale
    seen = pool[blocks[0]].clone()
    check_generations(generations, blocks, gens, "after")
    pool[blocks[1]].fill_(3.5)  # written here, read back by the test process
    want = torch.arange(seen.numel(), dtype=torch.float32).view(seen.shape)
    print(json.dumps({"equal": bool(torch.equal(seen, want)), "fenced": True,
                      "inside": region.contains(pool.data_ptr(), pool.numel() * 4)}))
    t.close_context(ctx)
""")


def test_blocks_are_shared_zero_copy_with_another_process(store, client):
    pool, gens = open_pool(store.info)
    lease = client.allocate("zc-1", 2)
    assert client.claim("zc-1", lease.lease_id) == lease
    b0, b1 = lease.block_ids
    assert gens[b0].item() == lease.generations[0]
    pool[b0].copy_(torch.arange(pool[b0].numel(), dtype=torch.float32).view(pool[b0].shape))
    pool[b1].zero_()
    reader = subprocess.Popen([sys.executable, "-c", READER, store.addr,
                               json.dumps(lease.block_ids), json.dumps(lease.generations)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while reader.poll() is None:   # its holder renews it, as a worker's lease keeper does:
        client.renew([lease.lease_id])   # a lease untouched for TTL_S expires, claimed or not
        assert time.monotonic() < deadline, "the reader did not finish in 60 s"
        time.sleep(0.3)
    stdout, stderr = reader.communicate()
    assert reader.returncode == 0, stderr
    assert json.loads(stdout) == {"equal": True, "fenced": True, "inside": True}
    assert bool((pool[b1] == 3.5).all())
    client.release("zc-1", lease.lease_id)


def test_commit_then_lookup_hits_the_same_blocks(store, client):
    pool, gens = open_pool(store.info)
    prompt = list(range(50, 70))  # 2 full blocks + 4 tokens
    before = client.stats()
    lease = client.allocate("pf-1", 3)
    for i, b in enumerate(lease.block_ids):
        pool[b].fill_(float(i + 1))
    client.commit("pf-1", lease.lease_id, lease.block_ids, prompt)
    client.release("pf-1", lease.lease_id)
    hit = client.lookup("pf-2", prompt)
    assert hit.block_ids == lease.block_ids[:2] and hit.num_tokens == 16
    assert hit.generations == lease.generations[:2]
    check_generations(gens, hit.block_ids, hit.generations)
    assert [pool[b][0, 0, 0, 0, 0].item() for b in hit.block_ids] == [1.0, 2.0]
    miss = client.lookup("pf-3", list(range(1, 11)))
    assert (miss.lease_id, miss.block_ids, miss.num_tokens) == (None, [], 0)
    client.release("pf-2", hit.lease_id)
    after = client.stats()
    assert after.hit_tokens - before.hit_tokens == 16 and after.lookup_tokens - before.lookup_tokens == 30
    assert after.cached_blocks >= 2


def test_claim_release_and_errors_over_the_wire(store, client):
    lease = client.allocate("dc-1", 2)
    assert client.allocate("dc-1", 1, lease_id=lease.lease_id).lease_id == lease.lease_id
    claimed = client.claim("dc-1", lease.lease_id)
    assert len(claimed.block_ids) == 3 and claimed.block_ids[:2] == lease.block_ids
    ledger = client.status()["ledger"]
    assert [(x["lease_id"], x["request_id"], x["claimed"]) for x in ledger] == [(lease.lease_id, "dc-1", True)]
    client.release("dc-1", lease.lease_id)
    for op in (client.release, client.claim):
        with pytest.raises(KVStoreError, match=f"lease {lease.lease_id} is unknown") as e:
            op("dc-2", lease.lease_id)
        assert e.value.code == "not_found" and e.value.request_id == "dc-2"
    with pytest.raises(KVStoreError, match="needs 999 blocks") as e:
        client.allocate("dc-3", 999)
    assert e.value.code == "no_blocks" and client.stats().leases == 0


def test_unclaimed_lease_expires(store, client):
    before = client.stats().expired_leases
    lease = client.allocate("slow-decode", 2)
    deadline = time.monotonic() + TTL_S + 5
    while client.stats().leases and time.monotonic() < deadline:
        time.sleep(0.1)
    st = client.stats()
    assert st.leases == 0 and st.expired_leases == before + 1
    with pytest.raises(KVStoreError, match="unknown") as e:
        client.claim("slow-decode", lease.lease_id)
    assert e.value.code == "not_found"


def _raw(header):
    return [msgspec.msgpack.encode(header)]


HOSTILE = [
    ([b"\xc1 not msgpack"], "bad_message", None, "malformed header"),
    (_raw([1, {"t": "nope"}, []]), "bad_message", None, "unknown message type 'nope'"),
    (_raw([1, {"t": "kvalloc", "request_id": "h1", "num_blocks": "many"}, []]), "bad_message", "h1", "num_blocks"),
    (_raw([1, {"t": "kvalloc", "request_id": "h2", "num_blocks": -1}, []]), "bad_message", "h2", "num_blocks"),
    (_raw([1, {"t": "kvcommit", "request_id": "h3", "lease_id": 1, "block_ids": "x", "token_ids": []}, []]),
     "bad_message", "h3", "block_ids"),
    (_raw([1, {"t": "kvrel", "request_id": "h4", "lease_id": 99999}, []]), "not_found", "h4", "lease 99999"),
    (_raw([1, {"t": "kvlook", "request_id": "h5", "token_ids": [1, 2**40]}, []]), "bad_request", "h5", "token id"),
    (_raw([1, {"t": "ping"}, []]), "bad_request", None, "does not serve Ping"),
]


def test_hostile_frames_get_error_replies_and_the_store_keeps_serving(store, client):
    ctx = t.make_context()
    try:
        raw = t.connect_dealer(ctx, store.addr, "hostile")
        for frames, code, rid, text in HOSTILE:
            raw.send_multipart(frames)
            assert raw.poll(5000), f"no reply to {frames!r}"
            _, reply = t.recv_msg(raw)
            assert isinstance(reply, p.ErrorReply), reply
            assert (reply.code, reply.request_id) == (code, rid) and text in reply.message, reply
            assert client.stats().total_blocks == NUM_BLOCKS  # still answering
    finally:
        t.close_context(ctx)
    assert store.proc.poll() is None


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("duet_kv_")}


def test_metrics_endpoint_tracks_the_pool(store, client):
    lease = client.allocate("m-1", 3)
    client.stats()
    deadline, got = time.monotonic() + 5, {}
    while time.monotonic() < deadline:
        got = _scrape(store.metrics_port)
        if got.get("duet_kv_leased_blocks") == 3:
            break
        time.sleep(0.05)
    assert got["duet_kv_leased_blocks"] == 3
    assert got["duet_kv_free_blocks"] + got["duet_kv_cached_blocks"] == NUM_BLOCKS - 3
    for name in ("duet_kv_lookup_tokens_total", "duet_kv_hit_tokens_total", "duet_kv_expired_leases_total"):
        assert name in got
    client.release("m-1", lease.lease_id)


def test_curve_store_admits_keyed_clients_and_sigterm_unlinks_shm(model_dir, workdir):
    keys = t.generate_keys(os.path.join(workdir, "keys"))
    s = Store(model_dir, workdir, "--curve-dir", str(keys), curve=t.CurveConfig.from_dir(keys, "client"))
    try:
        assert os.path.exists(s.shm_path)
        s.client.allocate("left-behind", 2)  # a live lease must not block shutdown
        with KVStoreClient(s.ctx, s.addr, "nokeys", timeout_s=0.5) as stranger:
            with pytest.raises(KVStoreError) as e:
                stranger.stats()
            assert e.value.code == "timeout"
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0, s.output()
    assert not os.path.exists(s.shm_path)
