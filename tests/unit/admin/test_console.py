"""The admin console's own logic: Prometheus text to the numbers it shows, its token,
and a mesh whose services are down (the page still answers, naming what is down)."""
from __future__ import annotations

import socket

import pytest
from prometheus_client import generate_latest

from services.admin.app import create_app
from services.admin.sources import Sources, _quantile, summarize_metrics
from services.gateway.http_metrics import GatewayMetrics


def test_summarize_metrics_from_the_gateways_registry():
    m = GatewayMetrics(ttft_target_s=1.0, tpot_target_s=0.1)
    for s in (0.04, 0.06, 0.09, 0.12):                 # all in the (0.025, 0.05] .. (0.1, 0.15] buckets
        m.observe_stages({"prefill_compute": s, "tokenize": 0.002})
    m.ttft.observe(0.3)
    m.ttft.observe(2.5)
    m.request_done(True, 0.3, 0.05)                     # meets both targets
    m.request_done(True, 2.5, 0.05)                     # TTFT over target
    m.request_done(False, None, None)                   # failed
    m.generation_tokens.inc(40)
    m.prompt_tokens.inc(12)
    out = summarize_metrics(generate_latest(m.registry).decode())
    assert out["finished"] == 3 and out["goodput"] == 1
    assert out["goodput_ratio"] == pytest.approx(1 / 3)
    assert out["generation_tokens"] == 40 and out["prompt_tokens"] == 12
    # stages in request order, whatever order they were first observed in
    assert [r["stage"] for r in out["ttft_stages"]] == ["tokenize", "prefill_compute"]
    pc = out["ttft_stages"][1]
    assert pc["count"] == 4 and pc["mean_s"] == pytest.approx(0.0775)
    # rank 2 of 4 is the second observation's bucket (0.05, 0.075]: interpolated inside it
    assert 0.05 < pc["p50_s"] <= 0.075
    assert 0.1 < pc["p90_s"] <= 0.15
    assert out["ttft"]["count"] == 2 and out["ttft"]["mean_s"] == pytest.approx(1.4)
    assert out["itl"] == {"count": 0, "mean_s": None, "p50_s": None, "p90_s": None}


def test_quantile_edges():
    b = [(0.1, 0.0), (0.2, 4.0), (float("inf"), 4.0)]
    assert _quantile(b, 4, 0.5) == pytest.approx(0.15)  # half way through (0.1, 0.2]
    assert _quantile(b, 0, 0.5) is None
    # everything past the last finite bound reports that bound, not infinity
    assert _quantile([(0.1, 0.0), (float("inf"), 2.0)], 2, 0.9) == 0.1


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again: nothing listens there


def test_console_answers_when_the_mesh_is_down_and_checks_its_token(tmp_path):
    port = _dead_port()
    sources = Sources(f"http://127.0.0.1:{port}", kvstore_addr=f"ipc://{tmp_path}/none.sock",
                      tokenizer_addr=f"ipc://{tmp_path}/none2.sock", timeout_s=0.3)
    try:
        client = create_app(sources, token="s3cret").test_client()
        page = client.get("/")
        assert page.status_code == 200 and b"const NEEDS_TOKEN = true" in page.data
        assert client.get("/api/status").status_code == 401
        assert client.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.get("/api/status", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        st = r.get_json()
        assert "Connection refused" in st["gateway"]["error"]
        assert "error" in st["metrics"] and "error" in st["kvstore"] and "error" in st["tokenizer"]
        r = client.post("/api/workers/decode-0/role", json={"role": "both"},
                        headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 502 and f"127.0.0.1:{port}" in r.get_json()["error"]["message"]
    finally:
        sources.close()


def test_sources_reject_a_bad_gateway_url():
    with pytest.raises(ValueError, match="gateway_url='localhost:8000'"):
        Sources("localhost:8000")


def test_token_and_host_checks_never_crash(tmp_path):
    sources = Sources(f"http://127.0.0.1:{_dead_port()}", timeout_s=0.3)
    try:
        client = create_app(sources, token="s3cret", allowed_hosts=("duet.internal",)).test_client()
        auth = {"Authorization": "Bearer s3cret"}
        # a non-ASCII token is simply wrong, not a server error
        r = client.get("/api/status", headers={"Authorization": "Bearer s3crét"})
        assert r.status_code == 401
        assert client.get("/api/status", headers={**auth, "Host": "duet.internal:8001"}).status_code == 200
        r = client.get("/api/status", headers={**auth, "Host": "rebound.example"})
        assert r.status_code == 403 and "rebound.example" in r.get_json()["error"]["message"]
    finally:
        sources.close()


def test_a_bad_key_dir_is_reported_on_every_read(tmp_path):
    sources = Sources(f"http://127.0.0.1:{_dead_port()}", kvstore_addr=f"ipc://{tmp_path}/kv.sock",
                      curve_dir=str(tmp_path / "no-keys"), timeout_s=0.3)
    try:
        for _ in range(2):   # the same clear error the second time, not a half-built client
            err = sources.snapshot()["kvstore"]["error"]
            assert err.startswith("FileNotFoundError") and "no-keys" in err
    finally:
        sources.close()
