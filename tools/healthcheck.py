"""A container's health, for Docker's HEALTHCHECK: `python -m tools.healthcheck`.

One image runs every service; $DUET_SERVICE says which this container is, and the same
$DUET_* variables the compose file passes to the service say where it listens:
  gateway    its HTTP server answers /metrics (200 without any worker registered)
  kvstore    a status request over its (CURVE) socket is answered
  tokenizer  likewise
  admin      its page answers 200
  prefill, decode, worker   the gateway's /health lists this container's worker id
Exit 0: healthy; 1: not (the reason on stderr).
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _curve():
    key_dir = os.environ.get("DUET_CURVE_DIR")
    if not key_dir:
        return None
    from shared.transport import CurveConfig
    return CurveConfig.from_dir(key_dir, "client")


def check(service: str) -> str | None:
    """None when healthy, else why not."""
    host = "127.0.0.1"
    if service == "gateway":
        code, _ = _http(f"http://{host}:{_env('DUET_PORT', '8000')}/metrics")
        return None if code == 200 else f"gateway /metrics answered {code}"
    if service == "admin":
        code, _ = _http(f"http://{host}:{_env('DUET_ADMIN_PORT', '8001')}/")
        return None if code == 200 else f"admin console answered {code}"
    if service in ("kvstore", "tokenizer"):
        from shared.transport import close_context, make_context
        ctx = make_context()
        try:
            if service == "kvstore":
                from services.kvstore.client import KVStoreClient
                addr = f"tcp://{host}:{_env('DUET_KVSTORE_PORT', '5551')}"
                with KVStoreClient(ctx, addr, f"health-{os.getpid()}", curve=_curve(),
                                   timeout_s=3) as kv:
                    kv.status()
            else:
                from services.tokenizer.client import TokenizerClient
                addr = f"tcp://{host}:{_env('DUET_TOKENIZER_PORT', '5552')}"
                tok = TokenizerClient(ctx, addr, timeout_s=3, curve=_curve())
                try:
                    tok.status()
                finally:
                    tok.close()
            return None
        except Exception as e:
            return f"{service} at {addr}: {type(e).__name__}: {e}"
        finally:
            close_context(ctx)
    if service in ("prefill", "decode", "worker", "both"):
        from shared.container import default_worker_id
        role = "both" if service == "worker" else service
        wid = os.environ.get("DUET_WORKER_ID") or default_worker_id(role)
        code, body = _http(f"http://{host}:{_env('DUET_PORT', '8000')}/health")
        try:
            ids = [w["worker_id"] for w in json.loads(body).get("workers", [])]
        except (ValueError, AttributeError):
            return f"gateway /health answered {code} without a worker list"
        return None if wid in ids else f"worker {wid} is not registered with the gateway"
    return f"DUET_SERVICE={service!r} is not a service this check knows"


def main() -> int:
    service = os.environ.get("DUET_SERVICE", "")
    why = check(service)
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
