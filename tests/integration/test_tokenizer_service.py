"""The tokenizer service as a real subprocess over real ZeroMQ sockets."""
import json
import shutil
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from services.tokenizer.client import TokenizerClient, TokenizerError
from services.tokenizer.service import TokenizerService
from shared import protocol as p
from shared import transport as t
from shared.tokenization import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there ✓"}]


def start_service(model_dir, addr):
    proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--model", str(model_dir),
                             "--bind", addr, "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "tokenizer ready on ..." once bound
    if "ready" not in line:
        proc.kill()
        raise AssertionError(f"tokenizer did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop_service(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def ctx():
    context = t.make_context()
    yield context
    t.close_context(context)


@pytest.fixture
def service(smollm2_dir, tmp_path):
    addr = f"ipc://{tmp_path}/tok.sock"
    proc = start_service(smollm2_dir, addr)
    yield addr
    assert stop_service(proc) == 0


@pytest.fixture
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


def test_ids_equal_in_process_tokenizer(ctx, service, tok):
    client = TokenizerClient(ctx, service, timeout_s=10)
    for text in ("Hello, world!", "  naïve café ✓ 日本語", ""):
        assert client.tokenize(text) == tok.encode(text)
    assert client.tokenize(messages=CHAT) == tok.apply_chat_template(CHAT)
    assert (client.tokenize(messages=CHAT, add_generation_prompt=False)
            == tok.apply_chat_template(CHAT, add_generation_prompt=False))
    ids = tok.encode("Round trip ✓")
    assert client.detokenize(ids) == "Round trip ✓"
    assert client.status()["tokenize"] == 5
    client.close()


def raw_request(sock, message: dict):
    """Send a hand-built message (bypassing the structs' own checks); return the reply."""
    sock.send_multipart([msgspec.msgpack.encode([p.PROTOCOL_VERSION, message, []])])
    assert sock.poll(5000), "no reply"
    return t.recv_msg(sock)[1]


def test_hostile_frames_rejected_and_service_keeps_serving(ctx, service, tok):
    sock = t.connect_dealer(ctx, service, "hostile")
    sock.send_multipart([b"\xc1 not msgpack"])
    assert sock.poll(5000)
    bad = t.recv_msg(sock)[1]
    assert isinstance(bad, p.ErrorReply) and bad.code == "bad_message"
    for message, fragment in [
        ({"t": "tokz", "request_id": "r1"}, "exactly one of text or messages"),
        ({"t": "tokz", "request_id": "r2", "text": "a", "messages": []}, "exactly one"),
        ({"t": "tokz", "request_id": "r3", "messages": [{"role": "user", "content": 5}]}, "str"),
        ({"t": "nope", "request_id": "r4"}, "unknown message type 'nope'"),
    ]:
        reply = raw_request(sock, message)
        assert isinstance(reply, p.ErrorReply), reply
        assert fragment in reply.message and reply.request_id == message["request_id"], reply
    reply = raw_request(sock, {"t": "tokz", "request_id": "r5", "messages": []})
    assert isinstance(reply, p.ErrorReply) and reply.code == "bad_request"
    assert "messages is empty" in reply.message and reply.request_id == "r5"
    reply = raw_request(sock, {"t": "hb", "worker_id": "w", "role": "decode", "free_blocks": 0,
                               "running": 0, "waiting": 0, "queued_tokens": 0})
    assert isinstance(reply, p.ErrorReply) and "does not handle Heartbeat" in reply.message
    client = TokenizerClient(ctx, service, timeout_s=10)
    assert client.tokenize("still here") == tok.encode("still here")
    with pytest.raises(TokenizerError, match="exactly one"):
        client.tokenize()
    client.close()


def test_round_robin_over_two_services(ctx, smollm2_dir, tmp_path, tok):
    addrs = [f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"]
    procs = [start_service(smollm2_dir, a) for a in addrs]
    try:
        client = TokenizerClient(ctx, addrs, timeout_s=10)
        time.sleep(0.3)  # let the DEALER connect to both before spreading requests
        for i in range(8):
            assert client.tokenize(f"text {i}") == tok.encode(f"text {i}")
        counts = []
        for a in addrs:
            one = TokenizerClient(ctx, a, timeout_s=10)
            counts.append(one.status()["tokenize"])
            one.close()
        assert sum(counts) == 8 and min(counts) > 0, counts
        client.close()
    finally:
        assert [stop_service(pr, signal.SIGINT) for pr in procs] == [0, 0]


def test_timeout_raises(ctx, tmp_path):
    sock = t.bind_router(ctx, f"ipc://{tmp_path}/silent.sock")  # a service that never answers
    client = TokenizerClient(ctx, f"ipc://{tmp_path}/silent.sock", timeout_s=0.3)
    with pytest.raises(TokenizerError, match="no reply") as e:
        client.tokenize("x")
    assert e.value.code == "timeout"
    client.close()
    sock.close()


def test_template_error_is_a_bad_request(smollm2_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(smollm2_dir / name, model / name)
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    service = TokenizerService(model, f"ipc://{tmp_path}/t.sock")
    try:
        reply = service.handle(p.TokenizeRequest(request_id="q", messages=[
            p.ChatMessage(role="system", content="s")]))
        assert isinstance(reply, p.ErrorReply) and reply.code == "bad_request"
        assert "no system role" in reply.message and reply.request_id == "q"
        ok = service.handle(p.TokenizeRequest(request_id="q2", messages=[
            p.ChatMessage(role="user", content="u")]))
        assert isinstance(ok, p.TokenizeReply) and ok.ids == Tokenizer(model).encode("x", False)
    finally:
        service.close()


def test_sigterm_exits_cleanly(smollm2_dir, tmp_path):
    proc = start_service(smollm2_dir, f"ipc://{tmp_path}/s.sock")
    start = time.monotonic()
    assert stop_service(proc) == 0 and time.monotonic() - start < 5
