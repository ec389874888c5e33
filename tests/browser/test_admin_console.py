"""The admin console (services/admin) against the real mesh, over HTTP and in a real
headless Chromium driven by Playwright: workers, the KV pool and its lease ledger, TTFT by
stage, role flips and drains done by clicking."""
from __future__ import annotations

import os
import shutil
import threading
import time

import openai
import pytest
import requests
import zmq

from services.kvstore.client import KVStoreClient
from tests.integration.mesh_util import start_mesh, wait_idle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def disagg(smollm2_dir, tmp_path_factory):
    """1 prefill + 1 decode worker, kvstore, tokenizer, gateway and the admin console, as
    separate processes. Tests that flip roles or drain workers put them back."""
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("admin-logs"), prefill=1, decode=1,
                      queue_timeout_s=3)
    yield mesh
    mesh.stop()


def complete(mesh, prompt="The capital of France is", max_tokens=6) -> str:
    c = openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0, timeout=120)
    return c.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens,
                                temperature=0).choices[0].text


def workers(mesh) -> dict[str, dict]:
    """By id, from /health (503 while no worker set can serve, e.g. one drained: still a body)."""
    r = requests.get(mesh.url + "/health", timeout=10)
    return {w["worker_id"]: w for w in r.json()["workers"]}


def test_status_api_reads_every_service(disagg):
    complete(disagg)
    st = requests.get(disagg.admin_url + "/api/status", timeout=10).json()
    assert {w["worker_id"]: w["role"] for w in st["gateway"]["workers"]} == {
        "prefill-0": "prefill", "decode-0": "decode"}
    assert st["gateway"]["mode"] == "disaggregated"
    kv = st["kvstore"]
    assert kv["stats"]["total_blocks"] == 512 and kv["pool"]["backend"] == "shm"
    assert kv["pool"]["shape"][0] == 512 and kv["dtype"] == "float32"
    assert st["tokenizer"]["vocab_size"] == 49152
    m = st["metrics"]
    assert m["finished"] >= 1 and m["generation_tokens"] >= 6 and m["ttft"]["count"] >= 1
    stages = {r["stage"]: r for r in m["ttft_stages"]}
    # the disaggregated path's stages, in the order a request meets them
    want = ["gateway_queue", "tokenize", "prefill_queue", "prefill_compute", "kv_handoff",
            "decode_queue"]
    assert [s for s in want if s in stages] == want, list(stages)
    assert all(stages[s]["count"] >= 1 and stages[s]["mean_s"] >= 0 for s in want)
    assert stages["prefill_compute"]["p50_s"] > 0
    wait_idle(disagg)


def test_actions_are_validated_and_forwarded(disagg):
    u = disagg.admin_url + "/api/workers"
    r = requests.post(u + "/decode-0/role", data={"role": "both"})   # a form, not JSON
    assert r.status_code == 415 and "JSON" in r.json()["error"]["message"]
    r = requests.post(u + "/decode-0/role", json={"role": "chef"})
    assert r.status_code == 400 and "chef" in r.json()["error"]["message"]
    r = requests.post(u + "/nobody/role", json={"role": "decode"})
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]
    r = requests.post(u + "/decode-0/drain", json={"enable": "yes"})
    assert r.status_code == 400 and "yes" in r.json()["error"]["message"]
    r = requests.post(u + "/decode-0/reboot", json={})
    assert r.status_code == 404 and "reboot" in r.json()["error"]["message"]
    # through the gateway's own admin API too: JSON objects only (a cross-site form or
    # text body cannot drain a worker), the field required, its type checked
    g = disagg.url + "/admin/workers"
    assert requests.post(g + "/nobody/drain", json={"enable": True}).status_code == 404
    r = requests.post(g + "/decode-0/drain", data="enable=true",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = requests.post(g + "/decode-0/drain", data="{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = requests.post(g + "/decode-0/drain", json={})
    assert r.status_code == 400 and "'enable'" in r.json()["error"]["message"]
    r = requests.post(g + "/decode-0/drain", json=[1])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = requests.post(g + "/decode-0/role", json={"role": 3})
    assert r.status_code == 400 and "role=3" in r.json()["error"]["message"]
    assert workers(disagg)["decode-0"]["role"] == "decode"
    assert not any(w["draining"] for w in workers(disagg).values())


def test_console_refuses_foreign_hosts_origins_and_framing(disagg):
    """DNS rebinding (a foreign Host), cross-origin POSTs and framing are refused."""
    u = disagg.admin_url
    r = requests.get(u + "/api/status", headers={"Host": "evil.example:8001"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    r = requests.post(u + "/api/workers/decode-0/drain", json={"enable": True},
                      headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    assert not workers(disagg)["decode-0"]["draining"]
    r = requests.get(u + "/")
    assert r.status_code == 200 and r.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_all_workers_drained_waits_then_is_503_and_not_ready(disagg):
    drain = lambda on: [requests.post(f"{disagg.url}/admin/workers/{wid}/drain",  # noqa: E731
                                      json={"enable": on}).status_code
                        for wid in ("prefill-0", "decode-0")]
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}
    try:
        assert drain(True) == [200, 200]
        health = requests.get(disagg.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["ok"] is False
        # a request waits in the gateway's queue: served once a worker takes requests again
        waited = {}
        t = threading.Thread(target=lambda: waited.update(
            r=requests.post(disagg.url + "/v1/completions", json=body, timeout=30)))
        t.start()
        time.sleep(1.0)
        assert requests.get(disagg.url + "/health", timeout=10).json()["queued"] == 1
        assert drain(False) == [200, 200]
        t.join(30)
        assert waited["r"].status_code == 200 and waited["r"].json()["choices"][0]["text"]
        # past the queue timeout (3 s here): a 503 that says when to retry and why
        assert drain(True) == [200, 200]
        t0 = time.monotonic()
        r = requests.post(disagg.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and time.monotonic() - t0 >= 2.5
        assert int(r.headers["Retry-After"]) >= 1
        assert "drained: decode-0, prefill-0" in r.json()["error"]["message"]
    finally:
        drain(False)
    assert requests.get(disagg.url + "/health", timeout=10).status_code == 200
    wait_idle(disagg)


def test_duet_worker_drain_command(disagg):
    from click.testing import CliRunner

    from tools.cli import main
    run = CliRunner().invoke
    r = run(main, ["worker", "drain", "decode-0", "--url", disagg.url])
    assert r.exit_code == 0 and "decode-0 draining" in r.output
    try:
        assert workers(disagg)["decode-0"]["draining"] is True
    finally:
        r = run(main, ["worker", "drain", "decode-0", "--off", "--url", disagg.url])
    assert r.exit_code == 0 and "decode-0 serving" in r.output
    assert workers(disagg)["decode-0"]["draining"] is False
    r = run(main, ["worker", "drain", "nobody", "--url", disagg.url])
    assert r.exit_code != 0 and "nobody" in r.output


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("DUET_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
        pytest.skip("no Chromium here (apt-get install -y chromium); CI installs it")
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    yield b
    b.close()
    pw.stop()


def test_console_in_a_real_browser(disagg, browser):
    from playwright.sync_api import expect
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(disagg.admin_url)
    row = lambda wid: page.locator(f'#workers tr[data-worker="{wid}"]')  # noqa: E731
    cell = lambda wid, col: row(wid).locator(f'td[data-col="{col}"]')   # noqa: E731
    expect(cell("prefill-0", "role")).to_have_text("prefill")
    expect(cell("decode-0", "role")).to_have_text("decode")
    expect(page.locator("#gw-state")).to_have_text("ready")
    expect(page.locator("#gw-mode")).to_have_text("disaggregated")
    expect(page.locator("#kv-total")).to_have_text("512")
    expect(page.locator("#kv-idle")).to_have_text("idle")
    # every supervised process, up, with its restart count
    svc = lambda name: page.locator(f'#services tr[data-service="{name}"] td')  # noqa: E731
    for name in ("kvstore", "tokenizer", "gateway", "prefill-0", "decode-0"):
        expect(svc(name).nth(1)).to_have_text("up")
        expect(svc(name).nth(2)).to_have_text("0")

    # a live lease shows in the ledger with its blocks, and leaves it when released
    ctx = zmq.Context()
    try:
        with KVStoreClient(ctx, disagg.addr["kvstore"], "console-test",
                           curve=disagg.client_curve()) as kv:
            lease = kv.allocate("console-probe", 3)
            try:
                ledger_row = page.locator('#ledger tr[data-request="console-probe"]')
                expect(ledger_row).to_have_count(1)
                expect(ledger_row.locator("td").nth(0)).to_have_text(str(lease.lease_id))
                expect(ledger_row.locator("td").nth(2)).to_have_text("3")
                expect(page.locator("#kv-leased")).to_have_text("3")
                expect(page.locator("#kv-idle")).to_have_text("busy")
            finally:
                kv.release("console-probe", lease.lease_id)
            expect(ledger_row).to_have_count(0)
            expect(page.locator("#ledger-empty")).to_be_visible()
            expect(page.locator("#kv-leased")).to_have_text("0")
    finally:
        ctx.destroy(linger=0)

    try:
        # flip decode-0 to 'both', then drain prefill-0: requests are served colocated
        row("decode-0").locator("select.role-select").select_option("both")
        row("decode-0").locator("button.apply-role").click()
        expect(cell("decode-0", "role")).to_have_text("both")
        assert workers(disagg)["decode-0"]["role"] == "both"
        row("prefill-0").locator("button.drain-toggle").click()
        expect(cell("prefill-0", "state")).to_have_text("draining")
        expect(row("prefill-0").locator("button.drain-toggle")).to_have_text("resume")
        assert workers(disagg)["prefill-0"]["draining"] is True
        expect(page.locator("#gw-mode")).to_have_text("colocated")
        assert complete(disagg, "Paris is the capital of")
        # the drained prefill worker took nothing new
        assert workers(disagg)["prefill-0"]["inflight"] == 0

        # the TTFT table has the stages of the requests served so far
        expect(page.locator('#ttft tr[data-stage="prefill_compute"]')).to_have_count(1)
        expect(page.locator('#ttft tr[data-stage="total"] td').nth(1)).not_to_have_text("0")
        expect(page.locator("#m-finished")).not_to_have_text("0")
        # put the mesh back, by clicking
        row("prefill-0").locator("button.drain-toggle").click()
        expect(cell("prefill-0", "state")).to_have_text("serving")
        row("decode-0").locator("select.role-select").select_option("decode")
        row("decode-0").locator("button.apply-role").click()
        expect(cell("decode-0", "role")).to_have_text("decode")
    finally:   # whatever happened above, the next tests get the mesh as it was
        requests.post(disagg.url + "/admin/workers/prefill-0/drain", json={"enable": False})
        requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "decode"})
    expect(page.locator("#gw-mode")).to_have_text("disaggregated")
    assert {w: (v["role"], v["draining"]) for w, v in workers(disagg).items()} == {
        "prefill-0": ("prefill", False), "decode-0": ("decode", False)}
    expect(page.locator("#banner")).to_be_hidden()
    expect(page.locator("#action-error")).to_be_hidden()
    assert errors == []
    page.close()
    wait_idle(disagg)


def test_console_shows_a_failed_action(disagg, browser):
    """An action the gateway refuses (here: on a worker it no longer knows, as from a page
    left open while that worker went away) shows the gateway's message, and it stays
    there while the page keeps polling."""
    from playwright.sync_api import expect
    page = browser.new_page()
    page.goto(disagg.admin_url)
    expect(page.locator('#workers tr[data-worker="decode-0"]')).to_have_count(1)
    # act on a worker id the gateway does not know, as a stale page would
    page.evaluate("""() => act("gone-7", "role", {role: "decode"}, document.createElement("button"))""")
    expect(page.locator("#action-error")).to_be_visible()
    expect(page.locator("#action-error")).to_contain_text("no worker 'gone-7'")
    polls = int(page.locator("body").get_attribute("data-polls"))
    expect(page.locator("body")).not_to_have_attribute("data-polls", str(polls))  # polled again
    expect(page.locator("#action-error")).to_contain_text("gone-7")
    expect(page.locator("#banner")).to_be_hidden()
    page.close()


def test_console_charts_and_topology(disagg, browser):
    """The charts move while a load runs, the topology shows each worker's role and shape
    and changes when a role flips, the tokenizer is a table; a screenshot is kept
    (results/tmp/console.png)."""
    from pathlib import Path

    from playwright.sync_api import expect
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(disagg.admin_url)
    topo = lambda wid: page.locator(f'#topology g[data-worker="{wid}"]')  # noqa: E731
    expect(topo("prefill-0")).to_have_attribute("data-role", "prefill")
    expect(topo("decode-0")).to_have_attribute("data-role", "decode")
    expect(topo("decode-0")).to_contain_text("TP1×PP1")
    expect(page.locator('#topology g[data-node="kvstore"]')).to_contain_text("blocks in use")
    expect(page.locator('#tokenizer tr[data-key="vocab_size"] td')).to_have_text("49152")
    stop = threading.Event()

    def load():
        while not stop.is_set():
            complete(disagg, "Tell me about the sea.", max_tokens=24)
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        page.wait_for_function("() => parseFloat(document.querySelector('#chart-tok .now')"
                               ".textContent) > 0", timeout=60000)
        page.wait_for_function("() => Number(document.querySelector('#chart-ttft')"
                               ".dataset.points || 0) > 0", timeout=60000)
        page.wait_for_function("() => document.querySelector('#topology text[data-rate=\"decode-0\"]')"
                               ".textContent.includes('steps/s')", timeout=30000)
        page.wait_for_function("() => document.querySelector('#topology text[data-handoffs=\"decode-0\"]')"
                               ".textContent.includes('hand-offs/s')", timeout=30000)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert int(page.locator("#chart-kv").get_attribute("data-points")) > 0
    requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "both"})
    try:
        expect(topo("decode-0")).to_have_attribute("data-role", "both", timeout=15000)
        expect(topo("decode-0")).to_contain_text("both")
        shot = Path(__file__).resolve().parents[2] / "results" / "tmp" / "console.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    finally:
        requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "decode"})
    expect(topo("decode-0")).to_have_attribute("data-role", "decode", timeout=15000)
    assert errors == []
    page.close()
    wait_idle(disagg)
