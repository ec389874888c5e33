"""`docker compose up` for real, against this machine's Docker engine (make compose-test;
tools/compose_setup.sh installs and builds what is missing). One stack, brought up once,
driven the way a user drives it: the official openai client, `--scale`, a replica killed
under load, the monitoring profile, and `down -v` leaving nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from shared.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "duet-test"
URL = "http://127.0.0.1:8000"
ENV = dict(os.environ, COMPOSE_PROJECT_NAME=PROJECT, DUET_DTYPE="float32",
           DUET_WORKER_THREADS="1", DUET_KV_BLOCKS="512", DUET_WORKER_BLOCKS="512",
           DUET_PROMETHEUS_IMAGE="duet-prometheus:local", COMPOSE_PROFILES="cpu")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def compose(*args, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run(["docker", "compose", "-f", str(ROOT / "compose" / "compose.yaml"), *args],
                       capture_output=True, text=True, timeout=timeout, env=env or ENV)
    if check and p.returncode:
        raise AssertionError(f"docker compose {' '.join(args)} -> {p.returncode}\n"
                             f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def docker(*args, check=True) -> str:
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"docker {' '.join(args)}: {p.stderr[-2000:]}")
    return p.stdout


def health() -> dict:
    try:
        return requests.get(URL + "/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}


def wait_workers(roles: dict[str, int], timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    h = {}
    while time.monotonic() < deadline:
        h = health()
        have = [w["role"] for w in h.get("workers", [])]
        if all(have.count(r) == n for r, n in roles.items()):
            return h
        time.sleep(1)
    logs = compose("logs", "--tail", "40", check=False).stdout
    raise AssertionError(f"workers {roles} not registered within {timeout}s: {h}\n{logs[-6000:]}")


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("duet-kv-*")}


@pytest.fixture(scope="module")
def stack():
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.fail("no Docker engine: run tools/compose_setup.sh (make compose-test does)")
    compose("--profile", "cpu", "--profile", "monitoring", "down", "-v", "--remove-orphans")   # a clean state
    for port in (8000, 8001, 5550, 5551, 5552, 9101, 9090):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: the stack uses the README's default ports")
    before = shm_segments()
    t0 = time.monotonic()
    compose("up", "-d")
    wait_workers({"prefill": 1, "decode": 1})
    print(f"\ncompose up -> serving in {time.monotonic() - t0:.0f}s")
    yield before
    compose("--profile", "cpu", "--profile", "monitoring", "down", "-v", "--remove-orphans", check=False)


def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0, timeout=120)


def test_greedy_text_equals_the_engine_streaming_and_not(stack, smollm2_engine):
    tok = smollm2_engine.tokenizer
    want = tok.decode(smollm2_engine.generate([tok.apply_chat_template(CHAT)],
                                              SamplingParams(temperature=0, max_tokens=24))[0][0])
    c = client()
    got = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24,
                                       temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == want
    # the mesh is authenticated: the keys one-shot made them into the volume
    keys = compose("exec", "-T", "gateway", "ls", "/keys").stdout.split()
    assert {"server.key", "server.key_secret", "client.key", "client.key_secret"} <= set(keys)


def _count(i):
    return [{"role": "user", "content": f"Count from {i} to {i + 40}."}]


def _references(engine, n, max_tokens):
    """What the in-process fp32 engine answers to each of the streams' prompts."""
    tok = engine.tokenizer
    from shared.engine.sampling_params import SamplingParams
    outs = engine.generate([tok.apply_chat_template(_count(i)) for i in range(n)],
                           SamplingParams(temperature=0, max_tokens=max_tokens))
    return [tok.decode(o[0]) for o in outs]


def _stream(results, i, max_tokens=48):
    body = {"model": "smollm2", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": _count(i)}
    text, err = "", None
    try:
        with requests.post(URL + "/v1/chat/completions", json=body, stream=True, timeout=180) as r:
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    err = d["error"]
                elif d.get("choices"):
                    text += d["choices"][0]["delta"].get("content") or ""
    except requests.RequestException as e:
        err = str(e)
    results[i] = (text, err)


def test_scale_decode_to_two_both_serve(stack, smollm2_engine):
    compose("up", "-d", "--scale", "decode=2", "--no-recreate")
    wait_workers({"prefill": 1, "decode": 2})
    listed = json.loads(compose("exec", "-T", "gateway", "duet", "worker", "list",
                                "--url", URL).stdout)["workers"]
    decode_ids = sorted(w["worker_id"] for w in listed if w["role"] == "decode")
    containers = compose("ps", "-q", "decode").stdout.split()
    assert len(decode_ids) == 2 and len(containers) == 2
    # worker ids come from the containers
    assert sorted(i.split("-", 1)[1] for i in decode_ids) == sorted(c[:12] for c in containers)
    results = {}
    threads = [threading.Thread(target=_stream, args=(results, i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = _references(smollm2_engine, 6, 48)
    assert [results[i] for i in range(6)] == [(w, None) for w in want]
    steps = {w["worker_id"]: w["decode_steps"] for w in health()["workers"] if w["role"] == "decode"}
    assert all(n > 0 for n in steps.values()), steps


def test_kill_9_of_a_decode_replica_under_load(stack, smollm2_engine):
    wait_workers({"prefill": 1, "decode": 2})
    victim = compose("ps", "-q", "decode").stdout.split()[0]
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", victim))
    results = {}
    threads = [threading.Thread(target=_stream, args=(results, i, 96)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            w["running"] for w in health().get("workers", []) if w["role"] == "decode"):
        time.sleep(0.2)
    pid = int(docker("inspect", "-f", "{{.State.Pid}}", victim))
    os.kill(pid, signal.SIGKILL)        # the worker process itself dies, as in a crash
    for t in threads:
        t.join()
    # each stream: the whole reference answer (re-dispatched, or on the other replica), or
    # the reference's start and then a clear error
    want = _references(smollm2_engine, 6, 96)
    for i in range(6):
        text, err = results[i]
        if err is None:
            assert text == want[i], (i, text, want[i])
        else:
            assert want[i].startswith(text), (i, text, want[i])
            assert isinstance(err, dict) and err.get("message"), err
    # the restart policy brings the replica back, and it registers again
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if int(docker("inspect", "-f", "{{.RestartCount}}", victim)) > restarts:
            break
        time.sleep(1)
    assert int(docker("inspect", "-f", "{{.RestartCount}}", victim)) > restarts
    wait_workers({"prefill": 1, "decode": 2})
    kv = json.loads(compose("exec", "-T", "kvstore", "duet", "kv", "status", "--addr",
                            "tcp://127.0.0.1:5551", "--curve-dir", "/keys", "--json").stdout)
    deadline = time.monotonic() + 30
    while kv["stats"]["leases"] and time.monotonic() < deadline:   # expiring by TTL, if any
        time.sleep(1)
        kv = json.loads(compose("exec", "-T", "kvstore", "duet", "kv", "status", "--addr",
                                "tcp://127.0.0.1:5551", "--curve-dir", "/keys", "--json").stdout)
    assert kv["stats"]["leases"] == 0 and kv["stats"]["leased_blocks"] == 0, kv


def test_monitoring_profile_scrapes_gateway_and_store(stack):
    compose("--profile", "monitoring", "up", "-d", "prometheus")
    deadline = time.monotonic() + 120
    jobs = set()
    while time.monotonic() < deadline:
        try:
            r = requests.get("http://127.0.0.1:9090/api/v1/query",
                             params={"query": 'count by (job) ({__name__=~"duet_.+"})'}, timeout=5)
            jobs = {s["metric"]["job"] for s in r.json()["data"]["result"]}
        except (requests.RequestException, ValueError, KeyError):
            pass
        if {"duet-gateway", "duet-kvstore"} <= jobs:
            break
        time.sleep(2)
    assert {"duet-gateway", "duet-kvstore"} <= jobs


def test_gpu_profile_config_validates():
    p = compose("--profile", "gpu", "config", "--quiet", check=False)
    assert p.returncode == 0, p.stderr
    cfg = compose("--profile", "gpu", "config", "--format", "json").stdout
    svc = json.loads(cfg)["services"]
    assert "--device" in svc["decode-gpu"]["command"] and "cuda" in svc["decode-gpu"]["command"]
    assert svc["decode-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_down_v_leaves_nothing(stack):
    compose("--profile", "cpu", "--profile", "monitoring", "down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    assert docker("ps", "-aq", "--filter", label).split() == []
    assert docker("volume", "ls", "-q", "--filter", label).split() == []
    assert docker("network", "ls", "-q", "--filter", label).split() == []
    assert shm_segments() <= stack, shm_segments() - stack


def test_rebuild_after_a_code_change_reuses_the_torch_layer(tmp_path):
    """A one-line change in Duet's code: torch and the dependencies come from the cache."""
    ctx = tmp_path / "ctx"
    shutil.copytree(ROOT, ctx, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "results", "*.egg-info", ".whl", ".gpu_model"))
    with open(ctx / "shared" / "protocol.py", "a") as f:
        f.write(f"\n# rebuilt {time.time()}\n")
    t0 = time.monotonic()
    cli = "docker"
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode \
            and os.path.exists("/usr/bin/docker"):
        cli = "/usr/bin/docker"   # the engine's own CLI: BuildKit without buildx
    p = subprocess.run([cli, "build", "--progress=plain", "--network", "host",
                        "-f", "compose/Dockerfile", "--secret",
                        "id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt",
                        "--build-arg", "BASE_IMAGE=duet-base:bookworm", "-t", "duet:rebuild", "."],
                       cwd=ctx, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, DOCKER_BUILDKIT="1"))
    warm = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    log = (p.stderr + p.stdout).splitlines()

    def step(marker: str) -> str:   # BuildKit's plain log: "#7 [ 3/12] RUN ...", "#7 CACHED"
        ids = [line.split()[0] for line in log if marker in line and "[" in line]
        assert ids, f"no build step with {marker!r}"
        return ids[0]
    for marker in ("torch-*.whl", "install_requires"):   # torch, then the dependencies
        assert f"{step(marker)} CACHED" in log, (marker, "\n".join(log[-60:]))
    assert f"{step('pip install --no-deps --no-build-isolation /src')} CACHED" not in log
    print(f"\nwarm rebuild after a one-line change: {warm:.0f}s")
    docker("rmi", "duet:rebuild", check=False)
