"""Start a real Duet mesh (separate processes over real sockets) for integration tests."""
from __future__ import annotations

import json
import socket
import urllib.request

from tools.up import Mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mesh(model_dir, log_dir, **kw) -> Mesh:
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_blocks", 512)
    kw.setdefault("worker_blocks", 512)
    kw.setdefault("heartbeat_s", 0.5)
    mesh = Mesh(model=str(model_dir), port=free_port(), log_dir=str(log_dir), **kw)
    try:
        mesh.start()
        mesh.wait_ready(timeout_s=180)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def kv_stats(mesh: Mesh) -> dict:
    from services.kvstore.client import KVStoreClient
    from shared.transport import close_context, make_context
    ctx = make_context()
    try:
        with KVStoreClient(ctx, mesh.addr["kvstore"], "test-probe") as kv:
            return kv.status()
    finally:
        close_context(ctx)
