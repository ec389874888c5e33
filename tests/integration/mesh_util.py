"""Start a real Duet mesh (separate processes over real sockets) for integration tests."""
from __future__ import annotations

import json
import urllib.request

from tools.up import Mesh, free_port, start_mesh  # noqa: F401  (tests import them from here)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def kv_stats(mesh: Mesh) -> dict:
    return mesh.kv_status()


def wait_idle(mesh: Mesh, timeout=20):
    """Every pool back to idle: no live leases in the store, no running work anywhere."""
    return mesh.wait_idle(timeout)
