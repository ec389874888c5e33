"""Faults with real processes: a worker killed under load. Every stream must end with
either the reference text or an error payload, never hang and never be silently cut."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import requests

from shared.engine.sampling_params import SamplingParams
from tests.integration.mesh_util import get_json, kv_stats, start_mesh, wait_idle


def references(engine, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy text from the in-process engine (one batched run)."""
    tok = engine.tokenizer
    outs = engine.generate([tok.encode(p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return {p: tok.decode(o[0]) for p, o in zip(prompts, outs)}


class Stream(threading.Thread):
    """One streaming /v1/completions request; text, error payload and [DONE] as seen."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.text, self.error, self.done, self.chunks = "", None, False, 0
        self.status = None

    def run(self):
        body = {"model": "smollm2", "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=180) as r:
            self.status = r.status_code
            if r.status_code != 200:
                self.error = r.json()["error"]["message"]
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    self.done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    self.error = chunk["error"]["message"]
                    continue
                self.text += chunk["choices"][0]["text"]
                self.chunks += 1


def metric(mesh, name: str) -> float:
    text = requests.get(mesh.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_for(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill_9_decode_worker_mid_stream(smollm2_dir, smollm2_engine, tmp_path):
    mesh = start_mesh(smollm2_dir, tmp_path, prefill=1, decode=2)
    try:
        procs = {p.duet_name: p for p in mesh.procs}
        prompts = [f"List every prime number, number {i}: 2, 3, 5," for i in range(4)]
        want = references(smollm2_engine, prompts, 40)
        streams = [Stream(mesh.url, p, 40) for p in prompts]
        for s in streams:
            s.start()

        def both_decoding():
            ws = get_json(mesh.url + "/health")["workers"]
            return all(w["inflight"] for w in ws if w["role"] == "decode") and \
                all(s.chunks >= 2 for s in streams)
        wait_for(both_decoding, 120, "both decode workers to stream")
        deaths = metric(mesh, "duet_broker_worker_deaths_total")
        victim = "decode-0"
        os.kill(procs[victim].pid, signal.SIGKILL)
        for s in streams:
            s.join(120)
            assert not s.is_alive(), "a stream hung after the kill"
        failed = [s for s in streams if s.error]
        for s in streams:
            if s.error:   # its tokens had reached the client: a clear error, not a cut stream
                assert f"worker {victim}" in s.error and s.text == want[s.prompt][:len(s.text)]
            else:
                assert s.done and s.text == want[s.prompt]
        assert failed and len(failed) < len(streams)    # the survivor's streams finished
        ids = {w["worker_id"] for w in get_json(mesh.url + "/admin/workers")["workers"]}
        assert ids == {"prefill-0", "decode-1"}
        assert metric(mesh, "duet_broker_worker_deaths_total") == deaths + 1
        # the survivor serves new requests; nothing leaked in the store
        after = Stream(mesh.url, "After the crash,", 4)
        after.run()
        assert after.done and after.text == references(smollm2_engine, ["After the crash,"], 4)[
            "After the crash,"]
        wait_idle(mesh, timeout=40)      # an unclaimed lease may need its TTL
    finally:
        mesh.stop()


def test_prefill_worker_killed_with_queued_prompts_is_redispatched(smollm2_dir, smollm2_engine,
                                                                    tmp_path):
    """No token of theirs had reached a client: every request moves to the surviving
    prefill worker and completes with the reference text."""
    mesh = start_mesh(smollm2_dir, tmp_path, prefill=2, decode=1)
    try:
        procs = {p.duet_name: p for p in mesh.procs}
        prompts = [f"Story {i}: " + "the quick brown fox jumps over the lazy dog " * 28
                   for i in range(6)]
        want = references(smollm2_engine, prompts, 8)
        streams = [Stream(mesh.url, p, 8) for p in prompts]
        for s in streams:
            s.start()

        def victim_queued():
            for w in get_json(mesh.url + "/health")["workers"]:
                if w["role"] == "prefill" and w["inflight"] >= 2:
                    return w["worker_id"]
        wait_for(victim_queued, 60, "a prefill worker with queued prompts")
        victim = victim_queued()
        before = get_json(mesh.url + "/health")["counters"]
        os.kill(procs[victim].pid, signal.SIGKILL)
        for s in streams:
            s.join(180)
            assert not s.is_alive(), "a stream hung after the kill"
        for s in streams:
            assert s.error is None and s.done, (s.prompt[:20], s.error)
            assert s.text == want[s.prompt]
        counters = get_json(mesh.url + "/health")["counters"]
        assert counters["redispatched"] - before["redispatched"] >= 1
        assert counters["worker_deaths"] == before["worker_deaths"] + 1
        wait_idle(mesh, timeout=40)
        assert not kv_stats(mesh)["ledger"]
    finally:
        mesh.stop()
