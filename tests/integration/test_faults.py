"""Faults with real processes, under streaming load, on one supervised mesh (2 prefill + 2
decode workers): kill -9 of each kind of service in turn, a prefill worker killed with
queued prompts, SIGSTOP/SIGCONT, long prefill steps. Every stream ends with the reference
text or a clear error — never hangs, never is cut silently — the supervisor brings the
dead process back, and afterwards every pool is idle and no shm segment is orphaned."""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time

import pytest
import requests

from shared.buffers.shm import SHM_DIR
from shared.engine.sampling_params import SamplingParams
from tests.integration.mesh_util import get_json, kv_stats, start_mesh, wait_idle


@pytest.fixture(scope="module")
def mesh(smollm2_dir, tmp_path_factory):
    m = start_mesh(smollm2_dir, tmp_path_factory.mktemp("faults"), prefill=2, decode=2)
    yield m
    store = m.pid("kvstore")
    m.stop()
    no_orphaned_segments(store)


def references(engine, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy text from the in-process engine (one batched run)."""
    tok = engine.tokenizer
    outs = engine.generate([tok.encode(p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return {p: tok.decode(o[0]) for p, o in zip(prompts, outs)}


class Stream(threading.Thread):
    """One streaming /v1/completions request: its text, error payload, [DONE], or a
    broken connection, as a client sees them."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.text, self.error, self.done, self.chunks = "", None, False, 0
        self.status, self.broken = None, None

    def run(self):
        body = {"model": "smollm2", "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True,
                               timeout=180) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.error = r.json()["error"]["message"]
                    return
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    if line[6:] == b"[DONE]":
                        self.done = True
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]["message"]
                        continue
                    self.text += chunk["choices"][0]["text"]
                    self.chunks += 1
        except requests.RequestException as e:
            self.broken = repr(e)

    def outcome(self, want: str) -> str:
        """'ok' (the reference text), 'error' (a clear error; what came before it was
        the reference's start), or 'broken' (the connection itself died)."""
        assert not self.is_alive(), "a stream hung"
        if self.broken:
            assert self.want_prefix(want), (self.text, want)
            return "broken"
        if self.error:
            assert self.want_prefix(want), (self.text, want)
            return "error"
        assert self.done and self.text == want, (self.text, want)
        return "ok"

    def want_prefix(self, want: str) -> bool:
        return want.startswith(self.text)


def start_streams(mesh, prompts, max_tokens):
    streams = [Stream(mesh.url, p, max_tokens) for p in prompts]
    for s in streams:
        s.start()
    return streams


def finish(streams, timeout=180):
    for s in streams:
        s.join(timeout)


def wait_for(cond, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def workers(mesh) -> dict[str, dict]:
    try:
        return {w["worker_id"]: w for w in get_json(mesh.url + "/health")["workers"]}
    except OSError:
        return {}


def counters(mesh) -> dict:
    return get_json(mesh.url + "/health")["counters"]


def kill(mesh, name, sig=signal.SIGKILL) -> int:
    pid = mesh.pid(name)
    os.kill(pid, sig)
    return pid


def back(mesh, name, old_pid, timeout=60):
    """The supervisor started `name` again, and (a worker) it registered again."""
    wait_for(lambda: mesh.pid(name) != old_pid and mesh.supervisor.children[name].state
             == "running", timeout, f"{name} to be restarted")
    if name.startswith(("prefill", "decode")):
        wait_for(lambda: name in workers(mesh), timeout, f"{name} to register again")
    else:
        wait_for(lambda: len(workers(mesh)) == 4, timeout, "every worker to be registered")


def serving(mesh, engine, prompt="After the crash,"):
    s = Stream(mesh.url, prompt, 4)
    s.run()
    assert s.outcome(references(engine, [prompt], 4)[prompt]) == "ok"


def no_orphaned_segments(pid):
    assert not glob.glob(os.path.join(SHM_DIR, f"duet-kv-{pid}-*"))


def restarts(mesh, name) -> int:
    return mesh.supervisor.children[name].restarts


def test_kill_9_decode_worker_mid_stream(mesh, smollm2_engine):
    prompts = [f"List every prime number, number {i}: 2, 3, 5," for i in range(4)]
    want = references(smollm2_engine, prompts, 40)
    streams = start_streams(mesh, prompts, 40)
    wait_for(lambda: all(w["inflight"] for n, w in workers(mesh).items() if n.startswith("decode"))
             and all(s.chunks >= 2 for s in streams), 120, "both decode workers to stream")
    before = counters(mesh)
    pid = kill(mesh, "decode-0")
    finish(streams)
    outcomes = [s.outcome(want[s.prompt]) for s in streams]
    for s in streams:
        if s.error:   # its tokens had reached the client: a clear error naming the worker
            assert "worker decode-0" in s.error
    assert "error" in outcomes and "ok" in outcomes, outcomes   # decode-1's streams finished
    assert counters(mesh)["worker_deaths"] == before["worker_deaths"] + 1
    back(mesh, "decode-0", pid)
    assert restarts(mesh, "decode-0") == 1
    serving(mesh, smollm2_engine)
    wait_idle(mesh, timeout=40)


def test_prefill_worker_killed_with_queued_prompts_is_redispatched(mesh, smollm2_engine):
    """No token of theirs had reached a client: every request moves to the surviving
    prefill worker and completes with the reference text."""
    prompts = [f"Story {i}: " + "the quick brown fox jumps over the lazy dog " * 28
               for i in range(6)]
    want = references(smollm2_engine, prompts, 8)
    streams = start_streams(mesh, prompts, 8)
    victim = wait_for(lambda: next((n for n, w in workers(mesh).items()
                                    if n.startswith("prefill") and w["inflight"] >= 2), None),
                      60, "a prefill worker with queued prompts")
    before = counters(mesh)
    pid = kill(mesh, victim)
    finish(streams)
    assert [s.outcome(want[s.prompt]) for s in streams] == ["ok"] * 6
    after = counters(mesh)
    assert after["redispatched"] - before["redispatched"] >= 1
    assert after["worker_deaths"] == before["worker_deaths"] + 1
    back(mesh, victim, pid)
    wait_idle(mesh, timeout=40)
    assert not kv_stats(mesh)["ledger"]


def test_kill_9_the_kv_store_under_load(mesh, smollm2_engine):
    """Streams already decoding do not need the store; the others end with a clear
    error. The store comes back as a new epoch, the workers re-attach, the dead store's
    segment is gone."""
    prompts = [f"Count the stars, sky {i}: one, two," for i in range(4)]
    want = references(smollm2_engine, prompts, 40)
    streams = start_streams(mesh, prompts, 40)
    wait_for(lambda: all(s.chunks >= 3 for s in streams), 120, "every stream to decode")
    old_epoch = kv_stats(mesh)["epoch"]
    pid = kill(mesh, "kvstore")
    late = start_streams(mesh, ["A request while the store is down"], 8)
    finish(streams + late)
    assert [s.outcome(want[s.prompt]) for s in streams] == ["ok"] * 4
    [s] = late
    assert s.status in (200, 503) and (s.done or "KV store" in (s.error or "")), (s.status, s.error)
    back(mesh, "kvstore", pid)
    no_orphaned_segments(pid)
    assert kv_stats(mesh)["epoch"] != old_epoch
    serving(mesh, smollm2_engine, "The store came back and")
    wait_idle(mesh, timeout=40)


def test_kill_9_the_tokenizer_under_load(mesh, smollm2_engine):
    prompts = [f"Name a colour, then another, set {i}:" for i in range(3)]
    want = references(smollm2_engine, prompts, 24)
    streams = start_streams(mesh, prompts, 24)
    wait_for(lambda: all(s.chunks >= 1 for s in streams), 120, "every stream to start")
    pid = kill(mesh, "tokenizer")
    late = start_streams(mesh, ["Tokenized after the restart"], 4)
    finish(streams + late)
    assert [s.outcome(want[s.prompt]) for s in streams] == ["ok"] * 3
    assert late[0].outcome(references(smollm2_engine, ["Tokenized after the restart"], 4)[
        "Tokenized after the restart"]) == "ok"      # it waited for the restarted tokenizer
    back(mesh, "tokenizer", pid)
    wait_idle(mesh, timeout=40)


def test_kill_9_the_gateway_under_load(mesh, smollm2_engine):
    """Streams through a dead gateway break (nothing else can carry them); the workers
    drop their work, the gateway comes back, the workers register again, and it serves."""
    prompts = [f"Describe the weather, day {i}:" for i in range(3)]
    want = references(smollm2_engine, prompts, 40)
    streams = start_streams(mesh, prompts, 40)
    wait_for(lambda: all(s.chunks >= 2 for s in streams), 120, "every stream to decode")
    pid = kill(mesh, "gateway")
    finish(streams)
    assert {s.outcome(want[s.prompt]) for s in streams} == {"broken"}
    back(mesh, "gateway", pid)
    serving(mesh, smollm2_engine, "The gateway came back and")
    wait_idle(mesh, timeout=40)


def test_sigstop_then_sigcont_a_decode_worker(mesh, smollm2_engine):
    """Stopped: the gateway gives it up within the heartbeat timeout and its streams end
    clearly; continued: it registers again and serves."""
    prompts = [f"Spell the alphabet slowly, take {i}: a, b," for i in range(4)]
    want = references(smollm2_engine, prompts, 40)
    streams = start_streams(mesh, prompts, 40)
    wait_for(lambda: workers(mesh).get("decode-1", {}).get("inflight")
             and all(s.chunks >= 2 for s in streams), 120, "decode-1 to stream")
    pid = kill(mesh, "decode-1", signal.SIGSTOP)
    try:
        wait_for(lambda: "decode-1" not in workers(mesh), 30, "the gateway to give it up")
        finish(streams)
        outcomes = [s.outcome(want[s.prompt]) for s in streams]
        assert "error" in outcomes
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: "decode-1" in workers(mesh), 60, "decode-1 to register again")
    assert mesh.pid("decode-1") == pid          # the same process: it was slow, not dead
    for _ in range(3):
        serving(mesh, smollm2_engine, "Stopped, continued, and")
    wait_idle(mesh, timeout=40)


def test_long_prefill_steps_are_slow_not_dead(mesh, smollm2_engine):
    """Six 1k-token fp32 prompts on two one-thread prefill workers: steps far longer than
    the heartbeat timeout, yet no worker is declared dead and every request is served."""
    text = "In the long history of the city, merchants and scholars met by the river. "
    prompts = [f"Chronicle {i}: " + text * 64 for i in range(6)]
    assert all(1000 <= len(smollm2_engine.tokenizer.encode(p)) <= 1100 for p in prompts)
    before = counters(mesh)
    streams = start_streams(mesh, prompts, 2)
    finish(streams, timeout=300)
    for s in streams:
        assert s.status == 200 and s.done and not s.error, (s.status, s.error)
    assert counters(mesh)["worker_deaths"] == before["worker_deaths"]
    wait_idle(mesh, timeout=40)
