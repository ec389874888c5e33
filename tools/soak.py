"""Soak: mixed load on a supervised mesh while a chaos loop kills a random worker.

    python tools/soak.py [--minutes 30] [--chaos-every 180] [--clients 6]
                         [--json results/soak.json]

Clients loop over a mix of streaming and non-streaming requests, short and long prompts,
and aborts (a streaming client that leaves after a few chunks, a non-streaming one that
gives up). Every --chaos-every seconds one worker (prefill or decode) gets SIGKILL; the
supervisor restarts it. At the end: requests by outcome, errors by cause, TTFT p50/p99
during faults (from a kill until 10 s after the worker is back) and outside them, each
service's RSS over time, and the leases left in the store once the load stopped
(must be 0). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHORT = ["Hello! Who are you?", "Name three rivers.", "2 + 2 =", "Write a haiku about tea.",
         "What is the capital of France?", "Translate 'good morning' to Spanish."]
LONG = "Summarize the following notes. " + "The committee met to discuss the budget, " \
       "the schedule and the new library wing. " * 30


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cause(message: str) -> str:
    """An error message, with the specifics taken out, so errors group by cause."""
    m = re.sub(r"\b(cmpl|chatcmpl)-[0-9a-f]+\S*", "<request>", message)
    m = re.sub(r"\b(prefill|decode|both)-\d+\b", "<worker>", m)
    m = re.sub(r"\d+(\.\d+)?s\b", "<n>s", m)
    return m[:120]


class Load:
    def __init__(self, url: str, clients: int, seed: int = 0):
        self.url, self.clients = url, clients
        self.rng = random.Random(seed)
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def one(self, rng: random.Random) -> dict:
        stream = rng.random() < 0.5
        prompt = rng.choice(SHORT) if rng.random() < 0.7 else LONG
        max_tokens = rng.choice([8, 16, 32, 64])
        abort = rng.random() < 0.1
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.7, "seed": rng.randrange(1 << 30), "stream": stream}
        rec = {"t": time.monotonic(), "stream": stream, "long": prompt is LONG, "abort": abort}
        t0 = time.monotonic()
        try:
            return self._send(body, stream, abort, rec, t0)
        finally:
            rec["t_end"] = time.monotonic()

    def _send(self, body, stream, abort, rec, t0) -> dict:
        try:
            if stream:
                with requests.post(self.url + "/v1/completions", json=body, stream=True,
                                   timeout=120) as r:
                    rec["status"] = r.status_code
                    if r.status_code != 200:
                        rec["outcome"], rec["error"] = "error", r.json()["error"]["message"]
                        return rec
                    chunks = 0
                    for line in r.iter_lines():
                        if not line.startswith(b"data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            rec["outcome"], rec["error"] = "error", chunk["error"]["message"]
                            return rec
                        if chunks == 0:
                            rec["ttft"] = time.monotonic() - t0
                        chunks += 1
                        if abort and chunks >= 3:
                            rec["outcome"] = "aborted"
                            return rec
                    rec["outcome"] = "ok"
            else:
                r = requests.post(self.url + "/v1/completions", json=body,
                                  timeout=0.3 if abort else 120)
                rec["status"] = r.status_code
                if r.status_code == 200:   # a non-streaming reply shows no TTFT
                    rec["outcome"] = "ok"
                else:
                    rec["outcome"], rec["error"] = "error", r.json()["error"]["message"]
        except requests.Timeout:
            rec["outcome"] = "aborted" if abort else "error"
            rec.setdefault("error", "client timeout")
        except requests.RequestException as e:
            rec["outcome"], rec["error"] = "error", f"connection: {type(e).__name__}"
        return rec

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            rec = self.one(rng)
            with self.lock:
                self.results.append(rec)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.client, args=(self.rng.randrange(1 << 30),),
                                    daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        return threads


def run_soak(mesh, minutes: float, chaos_every_s: float, clients: int, seed: int = 0) -> dict:
    """Load `mesh` (started and supervised) for `minutes`, killing a random worker every
    chaos_every_s; the report as a dict."""
    rng = random.Random(seed)
    load = Load(mesh.url, clients, seed)
    t_start = time.monotonic()
    end = t_start + minutes * 60
    threads = load.start()
    faults, rss = [], {}
    next_kill, next_sample = t_start + chaos_every_s, t_start
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_sample:
            for c in mesh.supervisor.children.values():
                mb = rss_mb(c.pid) if c.pid else None
                if mb is not None:
                    rss.setdefault(c.name, []).append((round(now - t_start, 1), round(mb, 1)))
            next_sample = now + 15
        if chaos_every_s and now >= next_kill:
            names = [n for n in mesh.supervisor.children if n.startswith(("prefill", "decode"))]
            victim = rng.choice(names)
            old = mesh.pid(victim)
            os.kill(old, signal.SIGKILL)
            fault = {"worker": victim, "killed_at": round(now - t_start, 1)}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and (mesh.pid(victim) == old or victim not in {
                    w["worker_id"] for w in _workers(mesh)}):
                time.sleep(0.2)
            fault["back_after_s"] = round(time.monotonic() - now, 1)
            faults.append(fault)
            next_kill = now + chaos_every_s
        time.sleep(0.5)
    load.stop.set()
    for t in threads:
        t.join(180)
    settle = time.monotonic()
    try:
        mesh.wait_idle(timeout_s=120)
    except AssertionError as e:
        print(f"soak: {e}", file=sys.stderr)
    leaked = len(mesh.kv_status()["ledger"])
    return report(load.results, faults, rss, t_start, leaked, time.monotonic() - settle,
                  minutes, chaos_every_s, clients, mesh)


def _workers(mesh) -> list[dict]:
    try:
        return requests.get(mesh.url + "/health", timeout=5).json()["workers"]
    except (requests.RequestException, ValueError, KeyError):
        return []


def report(results, faults, rss, t_start, leaked, settle_s, minutes, chaos_every_s, clients,
           mesh) -> dict:
    windows = [(f["killed_at"], f["killed_at"] + f["back_after_s"] + 10) for f in faults]

    def in_fault(rec):   # the request was alive at some point of a fault window
        t0, t1 = rec["t"] - t_start, rec["t_end"] - t_start
        return any(t0 <= b and t1 >= a for a, b in windows)
    outcomes, causes = {}, {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        if r["outcome"] == "error":
            key = ("during faults" if in_fault(r) else "outside faults") + ": " + cause(r["error"])
            causes[key] = causes.get(key, 0) + 1
    ttft_in = [r["ttft"] for r in results if "ttft" in r and in_fault(r)]
    ttft_out = [r["ttft"] for r in results if "ttft" in r and not in_fault(r)]
    restarts = {c["service"]: c["restarts"] for c in mesh.supervisor.status()}
    return {"minutes": minutes, "chaos_every_s": chaos_every_s, "clients": clients,
            "requests": len(results), "outcomes": outcomes, "errors_by_cause": causes,
            "errors_outside_faults": sum(v for k, v in causes.items()
                                         if k.startswith("outside")),
            "ttft_faults": {"n": len(ttft_in), "p50": pct(ttft_in, 50), "p99": pct(ttft_in, 99)},
            "ttft_steady": {"n": len(ttft_out), "p50": pct(ttft_out, 50),
                            "p99": pct(ttft_out, 99)},
            "faults": faults, "restarts": restarts, "rss_mb": rss, "leaked_leases": leaked,
            "idle_after_s": round(settle_s, 1)}


def print_report(rep: dict) -> None:
    print(f"\nsoak: {rep['minutes']:g} min, {rep['clients']} clients, a worker killed every "
          f"{rep['chaos_every_s']:g} s ({len(rep['faults'])} kills)")
    print(f"requests {rep['requests']}: " + ", ".join(f"{k} {v}" for k, v in
                                                        sorted(rep["outcomes"].items())))
    for k, v in sorted(rep["errors_by_cause"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:5d}  {k}")
    for label, key in (("steady", "ttft_steady"), ("faults", "ttft_faults")):
        t = rep[key]
        print(f"TTFT {label:7s} n={t['n']:5d}  p50 {t['p50']:.3f} s  p99 {t['p99']:.3f} s")
    print("RSS (MB): first -> last (max), per service")
    for name, series in sorted(rep["rss_mb"].items()):
        mbs = [mb for _, mb in series]
        print(f"  {name:10s} {mbs[0]:8.1f} -> {mbs[-1]:8.1f}  ({max(mbs):.1f}), "
              f"restarts {rep['restarts'].get(name, 0)}")
    print(f"leaked leases after the load: {rep['leaked_leases']} "
          f"(pools idle {rep['idle_after_s']} s after it stopped)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--chaos-every", type=float, default=180, help="seconds; 0: no kills")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default="results/soak.json")
    a = ap.parse_args()
    from shared.config import EngineConfig
    from shared.models.hub import resolve_model
    from tools.up import start_mesh
    mesh = start_mesh(resolve_model("smollm2"), tempfile.mkdtemp(prefix="soak-"),
                      dtype=EngineConfig(dtype=a.dtype).resolved_dtype(), prefill=1, decode=2)
    try:
        rep = run_soak(mesh, a.minutes, a.chaos_every, a.clients)
    finally:
        mesh.stop()
    print_report(rep)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
