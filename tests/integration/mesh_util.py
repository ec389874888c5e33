"""Start a real Duet mesh (separate processes over real sockets) for integration tests."""
from __future__ import annotations

import json
import time
import urllib.request

from tools.up import Mesh, free_port, start_mesh  # noqa: F401  (tests import them from here)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def kv_stats(mesh: Mesh) -> dict:
    from services.kvstore.client import KVStoreClient
    from shared.transport import close_context, make_context
    ctx = make_context()
    try:
        with KVStoreClient(ctx, mesh.addr["kvstore"], "test-probe", curve=mesh.client_curve()) as kv:
            return kv.status()
    finally:
        close_context(ctx)


def wait_idle(mesh, timeout=20):
    """Every pool back to idle: no live leases in the store, no running work anywhere."""
    deadline = time.monotonic() + timeout
    while True:
        st = kv_stats(mesh)
        health = get_json(mesh.url + "/health")
        busy = [w for w in health["workers"] if w["running"] or w["waiting"] or w["inflight"]]
        full = all(w["free_blocks"] == w["total_blocks"] for w in health["workers"])
        if not st["ledger"] and not busy and full and not health["inflight"]:
            return st, health
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle: ledger={st['ledger']} workers={health['workers']}")
        time.sleep(0.2)
