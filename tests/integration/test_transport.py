"""Transport over real ZeroMQ sockets: envelopes, hostile frames, liveness, CURVE."""
import threading
import time

import msgspec
import pytest
import torch
import zmq

from shared import protocol as p
from shared import transport as t

WAIT_MS = 3000  # generous for a loaded 2-core box; tests finish far sooner


@pytest.fixture
def ctx():
    context = t.make_context()
    yield context
    t.close_context(context)


def recv(sock, timeout_ms=WAIT_MS):
    """recv_msg with a deadline; fails the test instead of hanging."""
    assert sock.poll(timeout_ms), "nothing arrived"
    return t.recv_msg(sock)


def test_router_dealer_round_trip(ctx, tmp_path):
    router = t.bind_router(ctx, f"ipc://{tmp_path}/gw.sock")
    dealer = t.connect_dealer(ctx, t.endpoint(router), "pf-0")
    reg = p.Register(worker_id="pf-0", role="prefill", model="m", devices=["cpu"],
                     max_batch_tokens=2048, total_blocks=64, free_blocks=64)
    assert t.send_msg(dealer, reg)
    identity, got = recv(router)
    assert identity == b"pf-0" and got == reg
    assert t.send_msg(router, p.SetRole(role="decode"), identity)
    identity, got = recv(dealer)
    assert identity is None and got == p.SetRole(role="decode")


def test_payload_frames_arrive_as_views(ctx):
    router = t.bind_router(ctx, "tcp://127.0.0.1:*")
    dealer = t.connect_dealer(ctx, t.endpoint(router), "dc-0")
    frames: list = []
    meta = p.tensor_to_frames(torch.arange(50_000, dtype=torch.int32), frames)
    assert t.send_msg(dealer, p.StatusReply(service="x", data={"meta": msgspec.to_builtins(meta)}), frames=frames)
    _, got = recv(router)
    tensor = p.frames_to_tensor(msgspec.convert(got.data["meta"], p.TensorFrame), got.frames)
    assert torch.equal(tensor, torch.arange(50_000, dtype=torch.int32))
    frame = got.frames[0]
    assert tensor.data_ptr() == torch.frombuffer(frame, dtype=torch.uint8).data_ptr()


def test_send_to_unknown_peer_returns_false(ctx):
    router = t.bind_router(ctx, "tcp://127.0.0.1:*")
    assert t.send_msg(router, p.Ping(), b"nobody") is False


def _serve(router, stop, served):
    """A minimal service loop: Ack every valid message until stopped."""
    while not stop.is_set():
        if not router.poll(20):
            continue
        item = t.recv_msg(router, max_frame_bytes=4096)
        if item is None:
            continue
        identity, msg = item
        served.append(type(msg).__name__)
        t.send_msg(router, p.Ack(request_id=getattr(msg, "request_id", "")), identity)


HOSTILE = [
    ([b"\xc1\xc1\xc1"], "malformed header"),
    ([b""], "malformed header"),
    ([msgspec.msgpack.encode([1, {"t": "nope"}, []])], "unknown message type 'nope'"),
    ([msgspec.msgpack.encode([1, {"t": "abort", "request_id": "r7", "reason": 3}, []])], "invalid Abort"),
    ([msgspec.msgpack.encode([1, {"t": "hb", "worker_id": "w"}, []])], "missing required field"),
    ([msgspec.msgpack.encode([99, {"t": "ping"}, []])], "protocol version 99"),
    ([msgspec.msgpack.encode([1, {"t": "ping"}, [8]])], "announces 1 payload frames, got 0"),
    ([msgspec.msgpack.encode([1, {"t": "ping"}, []]), b"x" * 5000], "over the 4096-byte limit"),
]


def test_hostile_frames_get_error_replies_and_loop_keeps_serving(ctx):
    router = t.bind_router(ctx, "tcp://127.0.0.1:*")
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.identity = b"attacker"
    raw.connect(t.endpoint(router))
    stop, served = threading.Event(), []
    server = threading.Thread(target=_serve, args=(router, stop, served), daemon=True)
    server.start()
    try:
        for frames, words in HOSTILE:
            raw.send_multipart(frames)
            _, reply = recv(raw)
            assert isinstance(reply, p.ErrorReply) and reply.code == "bad_message"
            assert words in reply.message, reply.message
        raw.send_multipart(p.encode(p.Abort(request_id="r8")))
        _, reply = recv(raw)
        assert reply == p.Ack(request_id="r8")
        assert served == ["Abort"]
    finally:
        stop.set()
        server.join(5)
        raw.close(0)


def test_error_reply_names_request_id(ctx):
    router = t.bind_router(ctx, "tcp://127.0.0.1:*")
    raw = t.connect_dealer(ctx, t.endpoint(router), "x")
    raw.send_multipart([msgspec.msgpack.encode([1, {"t": "abort", "request_id": "r7", "reason": 3}, []])])
    assert recv(router) is None
    _, reply = recv(raw)
    assert reply.request_id == "r7" and "reason" in reply.message


def test_liveness_purges_silent_peer(ctx):
    router = t.bind_router(ctx, "tcp://127.0.0.1:*")
    chatty = t.connect_dealer(ctx, t.endpoint(router), "chatty")
    silent = t.connect_dealer(ctx, t.endpoint(router), "silent")
    peers = t.PeerTable(timeout_s=0.3)

    def beat(sock, name):
        t.send_msg(sock, p.Heartbeat(worker_id=name, role="decode", free_blocks=1, running=0,
                                     waiting=0, queued_tokens=0))

    def drain():
        while router.poll(10):
            item = t.recv_msg(router)
            if item is not None:
                peers.seen(item[0], item[1])

    beat(chatty, "chatty")
    beat(silent, "silent")
    deadline = time.monotonic() + WAIT_MS / 1000
    while len(peers) < 2 and time.monotonic() < deadline:
        drain()
    assert set(peers) == {b"chatty", b"silent"}
    assert peers.purge() == []
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        beat(chatty, "chatty")
        drain()
        time.sleep(0.05)
    gone = peers.purge()
    assert [identity for identity, _ in gone] == [b"silent"]
    assert gone[0][1].worker_id == "silent"  # its last heartbeat comes back with it
    assert list(peers) == [b"chatty"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_liveness_counts_down_and_backs_off():
    clock = FakeClock()
    live = t.Liveness(interval_s=1.0, liveness=3, backoff_s=0.5, max_backoff_s=4.0, clock=clock)
    assert live.alive and live.remaining == 3 and not live.heartbeat_due()
    clock.now += 1.0
    assert live.remaining == 2 and live.heartbeat_due()
    live.sent()
    assert not live.heartbeat_due() and live.poll_timeout_ms() == 1000
    clock.now += 2.0
    assert live.remaining == 0 and not live.alive
    assert [live.next_backoff() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    live.heard()
    assert live.remaining == 3 and live.next_backoff() == 0.5
    with pytest.raises(ValueError, match="interval_s=0"):
        t.Liveness(interval_s=0)


def test_peer_table_keeps_info_and_order():
    clock = FakeClock()
    peers = t.PeerTable(timeout_s=2.0, clock=clock)
    assert peers.seen(b"a", "reg-a") and peers.seen(b"b", "reg-b")
    clock.now += 1.5
    assert not peers.seen(b"a")  # heartbeat without new info keeps the old
    assert peers.info(b"a") == "reg-a"
    clock.now += 1.0
    assert peers.purge() == [(b"b", "reg-b")]
    assert peers.forget(b"a") == "reg-a" and len(peers) == 0
    with pytest.raises(KeyError, match="b'zz'"):
        peers.info(b"zz")


# ------------------------------------------------------------ CURVE

def test_curve_admits_only_clients_with_keys(ctx, tmp_path):
    keys = t.generate_keys(tmp_path / "keys")
    router = t.bind_router(ctx, "tcp://127.0.0.1:*", curve=t.CurveConfig.from_dir(keys, "server"))
    addr = t.endpoint(router)

    plain = t.connect_dealer(ctx, addr, "plain")
    # a refused client's pipe may be torn down before its send: a DEALER with no pipe
    # blocks, so these sends time out (send_msg then returns False) instead of hanging
    plain.sndtimeo = 1000
    t.send_msg(plain, p.Ping(sender="plain"))
    stranger_keys = t.CurveConfig.from_dir(t.generate_keys(tmp_path / "other"), "client")
    stranger = t.CurveConfig(role="client", public_key=stranger_keys.public_key,
                             secret_key=stranger_keys.secret_key,
                             server_key=t.CurveConfig.from_dir(keys, "client").server_key,
                             key_dir=stranger_keys.key_dir)
    unknown = t.connect_dealer(ctx, addr, "stranger", curve=stranger)
    unknown.sndtimeo = 1000
    t.send_msg(unknown, p.Ping(sender="stranger"))
    assert not router.poll(500)  # neither the keyless nor the unknown client got through

    member = t.connect_dealer(ctx, addr, "member", curve=t.CurveConfig.from_dir(keys, "client"))
    t.send_msg(member, p.Ping(sender="member"))
    identity, msg = recv(router)
    assert identity == b"member" and msg == p.Ping(sender="member")
    assert t.send_msg(router, p.Ack(request_id="hi"), identity)
    assert recv(member)[1] == p.Ack(request_id="hi")
    assert not router.poll(200)  # still nothing from the others


def test_curve_config_names_missing_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="server.key_secret"):
        t.CurveConfig.from_dir(tmp_path, "server")
    with pytest.raises(ValueError, match="'admin'"):
        t.CurveConfig.from_dir(tmp_path, "admin")
