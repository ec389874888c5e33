"""Per-API-key limits through a real mesh: a greedy key gets 429s with Retry-After past
its concurrency limit, and a second key's request is not queued behind its backlog."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.integration.mesh_util import start_mesh, wait_idle


@pytest.fixture(scope="module")
def keyed(smollm2_dir, tmp_path_factory):
    # one worker running 2 sequences at once: the mesh's capacity is 2
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("keys"), colocated=True,
                      api_keys="greedy-key,polite-key", max_concurrency_per_key=4,
                      max_num_seqs=2)
    yield mesh
    mesh.stop()


def ask(mesh, key, prompt, out, tokens=24):
    first = None   # when its first token arrived
    with requests.post(mesh.url + "/v1/completions", timeout=120, stream=True,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "smollm2", "prompt": prompt, "max_tokens": tokens,
                             "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        if r.status_code != 200:
            out[prompt] = (r.status_code, r.headers.get("Retry-After"), r.json(), None)
            return
        for line in r.iter_lines():
            if line.startswith(b"data: {") and first is None:
                first = time.monotonic()
        out[prompt] = (200, None, None, first)


def test_a_greedy_key_gets_429s_and_does_not_starve_another(keyed):
    out = {}
    greedy = [f"greedy request {i}:" for i in range(10)]
    threads = []
    for p in greedy:            # in order: 1-2 run, 3-4 queue, 5-10 refused
        threads.append(threading.Thread(target=ask, args=(keyed, "greedy-key", p, out)))
        threads[-1].start()
        time.sleep(0.15)
    polite = threading.Thread(target=ask, args=(keyed, "polite-key", "polite request:", out))
    polite.start()
    for t in threads + [polite]:
        t.join(120)
    refused = [p for p in greedy if out[p][0] == 429]
    served = [p for p in greedy if out[p][0] == 200]
    assert len(served) == 4 and len(refused) == 6, {p: out[p][0] for p in greedy}
    for p in refused:
        status, retry, body, _ = out[p]
        assert int(retry) >= 1 and body["error"]["type"] == "rate_limit_error"
        assert "greedy" not in body["error"]["message"]       # the key itself is never echoed
        assert "already has 4 requests running" in body["error"]["message"]
    assert out["polite request:"][0] == 200
    # the polite key's request, queued last, took its turn before the greedy key's last
    # queued one: turns go round the keys, not first come, first served
    last_greedy = max(served, key=greedy.index)
    assert out["polite request:"][3] < out[last_greedy][3]
    r = requests.post(keyed.url + "/v1/completions", json={"model": "smollm2", "prompt": "x"},
                      headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    wait_idle(keyed)
