"""A real worker process against a ROUTER this test owns as its gateway: it registers,
heart-beats, answers hostile frames with errors it can read, serves a request, and says
goodbye on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from shared import protocol as P
from shared.engine.sampling_params import SamplingParams
from shared.transport import bind_router, recv_msg, send_msg
from shared.wire import spec_from_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeGateway:
    def __init__(self, addr):
        self.ctx = zmq.Context()
        self.sock = bind_router(self.ctx, addr)
        self.heartbeats = 0
        self.last_ping = 0.0

    def recv(self, want=None, timeout=60.0, request_id=None):
        """The next message (of type `want`), pinging the worker so it stays connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self.last_ping > 0.2 and getattr(self, "ident", None):
                send_msg(self.sock, P.Ping(sender="test"), self.ident)
                self.last_ping = time.monotonic()
            if not self.sock.poll(100):
                continue
            got = recv_msg(self.sock)
            if got is None:
                continue
            ident, msg = got
            if isinstance(msg, P.Heartbeat):
                self.heartbeats += 1
            if (want is None or isinstance(msg, want)) and (
                    request_id is None or getattr(msg, "request_id", None) == request_id):
                return ident, msg
        raise AssertionError(f"no {want.__name__ if want else 'message'} within {timeout}s")

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def worker(smollm2_dir, tmp_path):
    addr = f"ipc://{tmp_path}/gw.sock"
    gw = FakeGateway(addr)
    log = open(tmp_path / "worker.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--role", "both", "--model", str(smollm2_dir),
         "--dtype", "float32", "--kvstore-addr", "", "--gateway-addr", addr,
         "--worker-id", "w-test", "--heartbeat", "0.2", "--num-kv-blocks", "64",
         "--threads", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        ident, reg = gw.recv(P.Register, timeout=120)
        gw.ident = ident
        yield gw, proc, reg
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        gw.close()
        log.seek(0)
        print(log.read()[-3000:])


def test_worker_registers_rejects_hostile_frames_serves_and_says_goodbye(worker, smollm2_engine):
    gw, proc, reg = worker
    assert (reg.worker_id, reg.role, reg.total_blocks, reg.block_size) == ("w-test", "both", 64, 16)
    for frames, why in (([b"\xff\x00garbage"], "malformed header"),
                        ([b"\x93\x01\x81\xa1t\xa3zzz\x90"], "unknown message type 'zzz'")):
        gw.sock.send_multipart([gw.ident, *frames])
        _, err = gw.recv(P.ErrorReply)
        assert err.code == "bad_message" and why in err.message
    send_msg(gw.sock, P.KVStats(), gw.ident)
    _, err = gw.recv(P.ErrorReply)
    assert err.code == "bad_request" and "does not handle KVStats" in err.message
    hot = P.SamplingSpec(temperature=9.0, max_tokens=4)
    send_msg(gw.sock, P.DecodeRequest(request_id="hot", prompt_ids=[1, 2, 3], sampling=hot), gw.ident)
    _, err = gw.recv(P.ErrorReply, request_id="hot")
    assert err.code == "bad_request" and "temperature=9.0" in err.message

    ids = smollm2_engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = smollm2_engine.generate([ids], params)[0][0]
    send_msg(gw.sock, P.DecodeRequest(request_id="ok", prompt_ids=ids,
                                      sampling=spec_from_params(params)), gw.ident)
    got, reason = [], None
    while reason is None:
        _, batch = gw.recv(P.TokenBatch, request_id="ok")
        got += batch.ids
        reason = batch.finish_reason
    assert got == want and reason == "length"
    _, hb = gw.recv(P.Heartbeat)
    assert hb.decode_steps >= 12 and hb.running == 0 and hb.free_blocks == 64

    proc.send_signal(signal.SIGTERM)
    _, bye = gw.recv(P.Goodbye, timeout=30)
    assert bye.worker_id == "w-test"
    assert proc.wait(30) == 0
