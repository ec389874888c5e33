"""The whole mesh as real processes: `duet up` (disaggregated and colocated) driven by
the official openai client, checked against the in-process engine."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest
import requests
import torch
import zmq

from shared.engine.sampling_params import SamplingParams
from tests.integration.mesh_util import free_port, get_json, kv_stats, start_mesh, wait_idle
from tools.up import Mesh

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three laws of robotics are"


@pytest.fixture(scope="module")
def disagg(smollm2_dir, tmp_path_factory):
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("disagg-logs"), prefill=1, decode=1,
                      kv_metrics_port=free_port())
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def coloc(smollm2_dir, tmp_path_factory):
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("coloc-logs"), colocated=True)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def disagg_tcp(smollm2_dir, tmp_path_factory):
    """Decode takes hand-offs over the wire, as a decode worker on another host must."""
    mesh = start_mesh(smollm2_dir, tmp_path_factory.mktemp("tcp-logs"), prefill=1, decode=1,
                      kv_transport="tcp")
    yield mesh
    mesh.stop()


def client(mesh):
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0, timeout=120)


def engine_text(engine, ids, max_tokens):
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))[0][0]
    return engine.tokenizer.decode(out), out


def test_greedy_through_mesh_equals_engine_and_colocated(disagg, coloc, smollm2_engine):
    tok = smollm2_engine.tokenizer
    want_chat, _ = engine_text(smollm2_engine, tok.apply_chat_template(CHAT), 24)
    want_plain, want_ids = engine_text(smollm2_engine, tok.encode(PROMPT), 24)
    for mesh in (disagg, coloc):
        c = client(mesh)
        r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want_chat
        stream = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want_chat
        r = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, temperature=0)
        assert r.choices[0].text == want_plain
        assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
        assert r.usage.completion_tokens == len(want_ids)
        stream = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24,
                                      temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want_plain
    wait_idle(disagg)


def test_concurrent_streams_finish_with_right_usage(disagg, smollm2_engine):
    tok = smollm2_engine.tokenizer
    prompts = [f"Give me fact number {i} about owls:" for i in range(6)]
    want = {p: engine_text(smollm2_engine, tok.encode(p), 16) for p in prompts}
    got, errors = {}, []

    def one(p):
        try:
            r = client(disagg).completions.create(model="smollm2", prompt=p, max_tokens=16, temperature=0)
            got[p] = r
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    for p in prompts:
        assert got[p].choices[0].text == want[p][0]
        assert got[p].usage.completion_tokens == len(want[p][1])
        assert got[p].usage.prompt_tokens == len(tok.encode(p))
    wait_idle(disagg)


def test_shared_prefix_is_served_from_the_store(disagg, smollm2_engine):
    tok = smollm2_engine.tokenizer
    prefix = "You are a meticulous assistant who answers with care and precision. " * 4
    a, b = prefix + "Name a planet.", prefix + "Name a colour."
    shared = len(tok.encode(prefix)) // 16 * 16 - 16     # full blocks surely shared
    before = kv_stats(disagg)["stats"]
    c = client(disagg)
    c.completions.create(model="smollm2", prompt=a, max_tokens=8, temperature=0)
    r = c.completions.create(model="smollm2", prompt=b, max_tokens=8, temperature=0)
    after = kv_stats(disagg)["stats"]
    assert after["hit_tokens"] - before["hit_tokens"] >= shared
    assert r.choices[0].text == engine_text(smollm2_engine, tok.encode(b), 8)[0]
    wait_idle(disagg)


def _maps(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if "/dev/shm/" in line}


def _worker(mesh, worker_id):
    return next(w for w in get_json(mesh.url + "/health")["workers"] if w["worker_id"] == worker_id)


def test_decode_reads_the_pages_prefill_wrote(disagg, smollm2_engine):
    """Zero-copy: prefill, decode and the store map one segment; the prompt's KV sits in the
    store's blocks, K and V of every layer, exactly as the engine computes it; and the
    prefill worker never ran its private engine, so the bytes were written in place."""
    import torch
    from services.kvstore.client import KVStoreClient
    from services.kvstore.layout import open_pool
    from shared.transport import close_context, make_context

    procs = {p.duet_name: p.pid for p in disagg.procs}
    seg_prefill, seg_decode = _maps(procs["prefill-0"]), _maps(procs["decode-0"])
    seg_store = _maps(procs["kvstore"])
    common = seg_prefill & seg_decode & seg_store
    assert common, (seg_prefill, seg_decode, seg_store)

    tok = smollm2_engine.tokenizer
    ids = tok.encode("Zero copy means the bytes never move: " * 6)
    steps_before = _worker(disagg, "prefill-0")["prefill_steps"]
    client(disagg).completions.create(model="smollm2", prompt=tok.decode(ids), max_tokens=2, temperature=0)
    ctx = make_context()
    try:
        with KVStoreClient(ctx, disagg.addr["kvstore"], "zc-probe", curve=disagg.client_curve()) as kv:
            pool, _ = open_pool(kv.pool_info())
            hit = kv.lookup("zc", ids + [0])          # the store knows every full block
            try:
                assert hit.num_tokens == len(ids) // 16 * 16 and len(hit.block_ids) >= 3
                eng = smollm2_engine
                eng.block_manager.reset_prefix_cache()
                eng.add_request("zc-ref", ids, SamplingParams(temperature=0, max_tokens=2))
                seq = eng.requests["zc-ref"][0]
                eng.step()   # the whole prompt fits one step; the seq is still running
                for i, block in enumerate(hit.block_ids):
                    ref = eng.kv_cache.tensor[:, :, seq.block_table[i]]   # [L, 2, bs, H, D]
                    torch.testing.assert_close(pool[block], ref, atol=1e-5, rtol=1e-5)
                eng.abort("zc-ref")
            finally:
                kv.release("zc", hit.lease_id)
    finally:
        close_context(ctx)
    wait_idle(disagg)
    deadline = time.monotonic() + 5      # the next heartbeat carries the step counts
    while _worker(disagg, "prefill-0")["prefill_steps"] == steps_before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _worker(disagg, "prefill-0")["decode_steps"] == 0     # its own cache: never used
    assert _worker(disagg, "decode-0")["prefill_steps"] == 0


def test_tcp_handoff_gives_the_text_of_shm_and_colocated(disagg_tcp, smollm2_engine):
    """--kv-transport tcp: the decode worker reads its blocks from the store as ZeroMQ
    frames (a 600-token prompt takes two reads of at most 32 blocks); the text is the
    engine's, which test_greedy_through_mesh_equals_engine_and_colocated shows shm and
    colocated give too."""
    tok = smollm2_engine.tokenizer
    long = "Over the wire, every block travels as one frame from the pool's own pages. " * 38
    before = kv_stats(disagg_tcp)["stats"]["read_blocks"]
    c = client(disagg_tcp)
    want_chat, _ = engine_text(smollm2_engine, tok.apply_chat_template(CHAT), 24)
    r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want_chat
    for prompt, n in ((PROMPT, 24), (long, 8)):
        ids = tok.encode(prompt)
        r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=n, temperature=0)
        assert r.choices[0].text == engine_text(smollm2_engine, ids, n)[0]
    assert len(tok.encode(long)) > 33 * 16
    after = kv_stats(disagg_tcp)["stats"]["read_blocks"]
    assert after - before >= 34 + 3           # every block of every hand-off came as a frame
    wait_idle(disagg_tcp)


def test_layerwise_tcp_handoff_fetches_layer_0_while_prefill_computes(disagg_tcp,
                                                                      smollm2_engine):
    """A 2k-token prompt handed over tcp layer by layer: the store's timeline of its lease
    shows the decode worker fetching the first block's layer 0 before prefill wrote its
    last layer, and most of the KV crossing before the commit; the text is the engine's."""
    tok = smollm2_engine.tokenizer
    ids = tok.encode("Layer by layer, the cache leaves before the prompt is done. " * 200)[:2000]
    want = engine_text(smollm2_engine, ids, 8)[0]
    r = client(disagg_tcp).completions.create(model="smollm2", prompt=ids, max_tokens=8,
                                              temperature=0)
    assert r.choices[0].text == want
    wait_idle(disagg_tcp)
    [line] = [h for h in kv_stats(disagg_tcp)["handoffs"] if h["blocks"] == 125]
    layers = smollm2_engine.model.config.num_layers
    assert line["layers_read"] == 125 * layers              # every slice once, none twice
    assert 0 < line["first_read_ts"] < line["written_ts"] <= line["committed_ts"]
    early = line["layers_read_before_commit"] / line["layers_read"]
    assert early > 0.5, line                                 # the bulk crossed during prefill
    print(f"\n2k-token prompt: layer 0 fetched {line['written_ts'] - line['first_read_ts']:.2f}s "
          f"before the last layer was written; {early:.0%} of the KV crossed before the commit")


def _metric(mesh, name: str) -> float:
    with urllib.request.urlopen(mesh.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_flipped_byte_in_the_store_is_caught_and_the_prompt_prefilled_again(disagg,
                                                                               smollm2_engine):
    """Flip one byte of a committed (cached) block in the shared pool: the checksum catches
    it before anyone computes on it, the bad block leaves the prefix cache, the request
    still gets the reference text, and duet_kv_checksum_failures_total moves."""
    from services.kvstore.client import KVStoreClient
    from services.kvstore.layout import open_pool
    from shared.transport import close_context, make_context

    tok = smollm2_engine.tokenizer
    text = "Checksums guard every block of the key-value cache against silent rot. " * 3
    ids = tok.encode(text)
    want = engine_text(smollm2_engine, ids, 8)[0]
    c = client(disagg)
    assert c.completions.create(model="smollm2", prompt=text, max_tokens=8,
                                temperature=0).choices[0].text == want
    wait_idle(disagg)
    ctx = make_context()
    try:
        with KVStoreClient(ctx, disagg.addr["kvstore"], "rot-probe", curve=disagg.client_curve()) as kv:
            pool, _ = open_pool(kv.pool_info())
            hit = kv.lookup("rot", ids + [0])
            kv.release("rot", hit.lease_id)
            assert len(hit.block_ids) >= 3
            bad = hit.block_ids[1]
            raw = pool[bad].view(torch.uint8).view(-1)
            raw[4321] ^= 0x01                        # one bit of one byte
    finally:
        close_context(ctx)
    before = _metric(disagg, "duet_kv_checksum_failures_total")
    r = c.completions.create(model="smollm2", prompt=text, max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    assert _metric(disagg, "duet_kv_checksum_failures_total") == before + 1
    st, _ = wait_idle(disagg)
    # the prefix cache now stops before the bad block, and a third request is served normally
    assert c.completions.create(model="smollm2", prompt=text, max_tokens=8,
                                temperature=0).choices[0].text == want
    assert _metric(disagg, "duet_kv_checksum_failures_total") == before + 1
    wait_idle(disagg)


def test_every_metric_the_grafana_dashboard_queries_exists(disagg):
    """deploy/grafana/duet-dashboard.json queries only metrics the mesh exports: the
    gateway's /metrics, the store's --metrics-port and the supervisor's port."""
    import json
    import re
    from pathlib import Path
    dash = json.loads((Path(__file__).parents[2] / "deploy/grafana/duet-dashboard.json").read_text())
    queried = {name for p in dash["panels"] for t in p["targets"]
               for name in re.findall(r"\bduet_[a-z_]+", t["expr"])}
    assert len(queried) >= 15
    client(disagg).completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0)
    exported = set()
    for url in (disagg.url, f"http://127.0.0.1:{disagg.kv_metrics_port}", disagg.supervisor_url):
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            exported |= {line.split("{")[0].split(" ")[0] for line in r.read().decode().splitlines()
                         if line.startswith("duet_")}
    assert sorted(queried - exported) == []
    wait_idle(disagg)


def test_hostile_frames_are_rejected_and_services_keep_serving(disagg):
    """From a peer that holds the mesh's client keys (so its frames get through CURVE):
    each bad frame gets an ErrorReply naming the problem, and the services keep serving."""
    from shared import protocol as P
    from shared.transport import recv_msg, send_msg
    garbage = [([b"\xff\x00garbage"], "malformed header"),
               ([b"\x93\x01\x81\xa1t\xa3zzz\x90"], "unknown message type 'zzz'"),
               ([b""] * 3, "malformed header")]
    wrong = {"gateway": (P.Heartbeat(worker_id="x", role="both", free_blocks=1, running=0,
                                     waiting=0, queued_tokens=0), "not_found", "register first"),
             "kvstore": (P.TokenizeRequest(request_id="t1", text="hi"), "bad_request",
                         "does not serve TokenizeRequest"),
             "tokenizer": (P.KVStats(), "bad_request", "does not handle KVStats")}
    ctx = zmq.Context()
    try:
        for name in ("gateway", "kvstore", "tokenizer"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            disagg.client_curve().apply(s, ctx)
            s.connect(disagg.addr[name])
            for frames, why in garbage:
                s.send_multipart(frames)
                assert s.poll(5000), f"{name} did not answer {frames!r}"
                _, reply = recv_msg(s)
                assert isinstance(reply, P.ErrorReply) and reply.code == "bad_message", reply
                assert why in reply.message, (name, reply.message)
            msg, code, why = wrong[name]
            send_msg(s, msg)
            assert s.poll(5000), f"{name} did not answer {type(msg).__name__}"
            _, reply = recv_msg(s)
            assert (reply.code, why in reply.message) == (code, True), (name, reply)
            s.close()
    finally:
        ctx.term()
    r = client(disagg).completions.create(model="smollm2", prompt="Still alive?", max_tokens=4,
                                          temperature=0)
    assert r.choices[0].text
    wait_idle(disagg)


def test_client_disconnect_mid_stream_frees_blocks(disagg):
    body = {"model": "smollm2", "prompt": "Count to one thousand: 1, 2, 3,", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(disagg.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
    wait_idle(disagg)


def test_bad_http_bodies_get_openai_errors(disagg):
    u = disagg.url + "/v1/completions"
    r = requests.post(u, data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(u, json={"model": "smollm2", "prompt": "x", "temperature": 9})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = requests.post(u, json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    r = requests.post(u, json={"model": "smollm2", "prompt": "word " * 9000, "max_tokens": 4})
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"]


def test_role_flip_at_run_time(disagg):
    r = requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "both"})
    assert r.status_code == 200
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            roles = {w["worker_id"]: w["role"] for w in get_json(disagg.url + "/health")["workers"]}
            if roles.get("decode-0") == "both":
                break
            time.sleep(0.1)
        assert roles["decode-0"] == "both"
        r = client(disagg).completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0)
        assert r.choices[0].text
    finally:
        requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "decode"})
    r = requests.post(disagg.url + "/admin/workers/nobody/role", json={"role": "decode"})
    assert r.status_code == 404
    r = requests.post(disagg.url + "/admin/workers/decode-0/role", json={"role": "chef"})
    assert r.status_code == 400 and "chef" in r.json()["error"]["message"]


def test_mesh_is_authenticated_by_default(coloc, tmp_path):
    """`duet up` without --curve-dir makes this run's own CURVE keys: the mesh serves, a
    peer without them cannot register as a worker, and --insecure is the only way out."""
    from shared import protocol as P
    from shared.transport import send_msg
    assert coloc.curve_dir and coloc.curve_dir.startswith(coloc.run_dir)
    r = client(coloc).completions.create(model="smollm2", prompt="Secure hello", max_tokens=4,
                                         temperature=0)
    assert r.choices[0].text
    ctx = zmq.Context()
    try:
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.IDENTITY, b"rogue")
        rogue.connect(coloc.addr["gateway"])
        send_msg(rogue, P.Register(worker_id="rogue", role="decode", model="x", devices=["cpu"],
                                   max_batch_tokens=1, total_blocks=1, free_blocks=1))
        time.sleep(1.5)
        ids = {w["worker_id"] for w in get_json(coloc.url + "/health")["workers"]}
        assert ids == {"both-0"}
        rogue.close()
    finally:
        ctx.term()
    with pytest.raises(ValueError, match="--insecure and --curve-dir"):
        Mesh(insecure=True, curve_dir=str(tmp_path))


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}}}


def _valid_person(text: str) -> dict:
    """PERSON's checks by hand: exactly its keys, each of its type."""
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "city"}, obj
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)
    assert obj["city"] in ("Paris", "Rome", "Oslo")
    return obj


@pytest.mark.parametrize("mode", ["disagg", "coloc"])
def test_json_schema_output_validates_in_a_mixed_batch(mode, request):
    """A json_schema request's output is JSON that validates, streaming and not, while
    unconstrained requests run in the same batches (disaggregated: prefill samples token 1
    under the grammar, decode resumes it)."""
    mesh = request.getfixturevalue(mode)
    c = client(mesh)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                  "schema": PERSON}}
    msgs = [{"role": "user", "content": "Invent a person. Answer in JSON."}]
    out = {}

    def constrained(key, stream):
        kw = dict(model="smollm2", messages=msgs, max_tokens=80, temperature=0.7, seed=7,
                  response_format=fmt)
        if stream:
            out[key] = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(stream=True, **kw) if ch.choices)
        else:
            r = c.chat.completions.create(**kw)
            out[key] = r.choices[0].message.content
            out[key + "-finish"] = r.choices[0].finish_reason

    def free(key):
        r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40,
                                      temperature=0)
        out[key] = r.choices[0].message.content

    threads = [threading.Thread(target=constrained, args=("plain", False)),
               threading.Thread(target=constrained, args=("stream", True)),
               threading.Thread(target=free, args=("free1",)),
               threading.Thread(target=free, args=("free2",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _valid_person(out["plain"])
    _valid_person(out["stream"])
    assert out["plain-finish"] == "stop"
    assert out["free1"] == out["free2"] and not out["free1"].startswith("{")
    choice = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8,
                                       temperature=1.0, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"type": "bogus"}}})
    assert e.value.status_code == 400 and "Invalid type: bogus" in str(e.value)
    wait_idle(mesh)


def test_tools_on_a_template_without_tool_support_are_400(disagg):
    tool = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(openai.BadRequestError) as e:
        client(disagg).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4,
                                               tools=[tool])
    assert "chat template has no tool support" in str(e.value)
