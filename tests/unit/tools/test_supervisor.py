"""The supervisor with real child processes: restarts with backoff, a crash loop marked
failed while the others run, counts on its metrics port, a clean stop."""
from __future__ import annotations

import sys
import time
import urllib.request

from services.admin.sources import summarize_services
from tools.supervisor import Supervisor
from tools.up import free_port

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]


def poll_until(sup, cond, timeout=20):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, sup.status()
        sup.poll()
        time.sleep(0.05)


def test_restarts_count_and_a_crash_loop_is_marked_failed():
    events = []
    sup = Supervisor(max_crashes=3, window_s=30, on_event=events.append, backoff_s=(0.1, 0.2))
    port = free_port()
    sup.serve_metrics(port)
    try:
        steady = sup.add("steady", SLEEPER)
        sup.add("crasher", CRASHER)
        first = steady.pid
        steady.proc.kill()
        poll_until(sup, lambda: steady.restarts == 1 and steady.state == "running")
        assert steady.pid != first
        poll_until(sup, lambda: sup.children["crasher"].state == "failed")
        status = {s["service"]: s for s in sup.status()}
        assert status["crasher"]["restarts"] == 2 and status["crasher"]["last_exit"] == 3
        assert status["steady"]["state"] == "running" and status["steady"]["last_exit"] == -9
        assert any("crasher exited with code 3 3 times" in e and "FAILED" in e for e in events)
        sup.poll()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            rows = {row["service"]: row for row in summarize_services(r.read().decode())}
        assert rows == {"steady": {"service": "steady", "up": True, "restarts": 1},
                        "crasher": {"service": "crasher", "up": False, "restarts": 2}}
    finally:
        sup.stop(grace_s=5)
    assert all(c.proc.poll() is not None for c in sup.children.values())
