"""Wire protocol: every message round-trips; every malformed input is refused."""
import pickle

import msgspec
import pytest
import torch

from shared import protocol as p
from shared.buffers import tcp
from shared.buffers.handle import BufferHandle

SHM = BufferHandle(backend="shm", base="duet-pool", offset=4096, nbytes=64, dtype="float16", shape=[2, 16])
KV = p.KVRef(handle=SHM, block_ids=[3, 7], generations=[1, 4], num_tokens=20)
SAMPLING = p.SamplingSpec(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=1234,
                          presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1,
                          max_tokens=64, stop_token_ids=[2, 7], ignore_eos=True, logprobs=3, n=2)
LOGPROBS = p.TokenLogprobs(logprob=-0.25, top_ids=[5, 9], top_logprobs=[-0.25, -1.5])

SAMPLES = [
    p.ErrorReply(code="no_blocks", message="need 4 blocks, 1 free", request_id="r1"),
    p.Ack(request_id="r1"),
    p.StatusRequest(),
    p.StatusReply(service="kvstore", data={"free": 3, "leases": [1, 2], "ok": True, "nested": {"x": 1.5}}),
    p.Register(worker_id="pf-0", role="prefill", model="smollm2-135m", devices=["GPU-1234"], tp=2, pp=1,
               max_batch_tokens=8192, block_size=16, total_blocks=1000, free_blocks=999),
    p.Heartbeat(worker_id="dc-0", role="decode", free_blocks=10, running=3, waiting=1, queued_tokens=480,
                prefill_steps=4, decode_steps=9, busy_s=0.25, expected_s=0.5),
    p.Ping(sender="gateway"),
    p.Goodbye(worker_id="dc-0"),
    p.SetRole(role="both"),
    p.Drain(enable=False),
    p.PrefillRequest(request_id="r1", prompt_ids=[1, 2, 3], sampling=SAMPLING, arrival_ts=1700000000.25),
    p.PrefillDone(request_id="r1", first_token=42, first_logprobs=LOGPROBS, kv=KV, lease_id=9,
                  num_cached_tokens=16, num_computed_tokens=4, timings={"queue": 0.001, "compute": 0.02}),
    p.DecodeRequest(request_id="r1", prompt_ids=[1, 2, 3], first_token=42, kv=KV, lease_id=9,
                    sampling=SAMPLING, timings={"prefill": 0.03}),
    p.TokenBatch(request_id="r1", ids=[5, 6], logprobs=[LOGPROBS, LOGPROBS], finish_reason="length",
                 timings={"decode": 0.01}),
    p.Abort(request_id="r1", reason="client disconnected"),
    p.KVPoolQuery(),
    p.KVPoolInfo(handle=SHM, num_blocks=100, num_layers=30, block_size=16, num_kv_heads=3, head_dim=64,
                 dtype="bfloat16"),
    p.KVLookup(request_id="r1", token_ids=list(range(40))),
    p.KVLookupReply(request_id="r1", lease_id=9, block_ids=[3, 7], generations=[1, 4], num_tokens=32),
    p.KVAcquire(request_id="r1", token_ids=[5, 6, 7], holder="prefill-0"),
    p.KVAllocate(request_id="r1", num_blocks=2, lease_id=9),
    p.KVLease(request_id="r1", lease_id=9, block_ids=[3, 7, 8], generations=[1, 4, 0],
              num_cached_tokens=16, pool="duet-kv-1-00001-abcdef"),
    p.KVCommit(request_id="r1", lease_id=9, block_ids=[3, 7], token_ids=list(range(32))),
    p.KVClaim(request_id="r1", lease_id=9, holder="decode-0"),
    p.KVDropHolder(holder="prefill-0"),
    p.KVEvict(request_id="r1", block_ids=[4, 5]),
    p.KVRead(request_id="r1", lease_id=9, block_ids=[0, 1]),
    p.KVRead(request_id="r1", lease_id=9, block_ids=[0, 1], from_layers=[0, 12]),
    p.KVBlocks(request_id="r1", block_ids=[0, 1], generations=[3, 3]),
    p.KVBlocks(request_id="r1", block_ids=[0, 1], generations=[3, 3], upto_layers=[30, 12]),
    p.PrefillStarted(request_id="r1", kv=KV, lease_id=9, num_cached_tokens=16),
    p.KVPrefetch(request_id="r1", kv=KV, lease_id=9),
    p.KVRelease(request_id="r1", lease_id=9),
    p.KVRenew(request_id="r1", lease_ids=[9, 10]),
    p.KVStats(),
    p.KVStatsReply(total_blocks=100, free_blocks=90, cached_blocks=5, leased_blocks=5, leases=2,
                   expired_leases=1, lookup_tokens=400, hit_tokens=128),
    p.TokenizeRequest(request_id="r1", messages=[p.ChatMessage(role="user", content="hi")],
                      add_generation_prompt=True),
    p.TokenizeReply(request_id="r1", ids=[1, 2]),
    p.DetokenizeRequest(request_id="r1", ids=[1, 2], skip_special_tokens=False),
    p.DetokenizeReply(request_id="r1", text="héllo ✓"),
]


def test_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(p.MESSAGES)
    assert len(p.TAGS) == len(p.MESSAGES)  # tags are unique


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = p.encode(msg)
    assert len(frames) == 1
    back = p.decode(frames)
    assert type(back) is type(msg)
    assert back == msg


def test_defaults_round_trip():
    msg = p.DecodeRequest(request_id="r2", prompt_ids=[1], sampling=p.SamplingSpec())
    back = p.decode(p.encode(msg))
    assert back == msg and back.kv is None and back.sampling.top_p == 1.0


def test_tensor_frames_round_trip_without_copy():
    logits = torch.arange(24, dtype=torch.float32).reshape(2, 12)
    kv = torch.randn(3, 4).to(torch.bfloat16)
    frames: list = []
    meta = p.tensor_to_frames(logits, frames)
    handle = tcp.export(kv, frames)
    msg = p.DecodeRequest(request_id="r1", prompt_ids=[1], sampling=p.SamplingSpec(),
                          kv=p.KVRef(handle=handle, block_ids=[0], generations=[0], num_tokens=3))
    wire = p.encode(msg, frames)
    assert len(wire) == 3
    back = p.decode(wire)
    assert len(back.frames) == 2
    got = p.frames_to_tensor(meta, back.frames)
    assert torch.equal(got, logits)
    assert got.data_ptr() == logits.data_ptr()  # a view of the sender's memory
    got_kv = tcp.open(back.kv.handle, back.frames)
    assert got_kv.dtype == torch.bfloat16 and torch.equal(got_kv, kv)


def test_msg_frames_attribute_is_sent():
    msg = p.Ack(request_id="x")
    msg.frames = [b"abc"]
    assert p.decode(p.encode(msg)).frames[0].tobytes() == b"abc"
    assert p.Ack().frames == ()  # class default untouched


# ------------------------------------------------------------ malformed input

def header(version, message, sizes=()):
    return msgspec.msgpack.encode([version, message, list(sizes)])


def reject(frames, *words, **kw):
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames, **kw)
    for word in words:
        assert word in str(err.value), str(err.value)
    return err.value


def test_rejects_garbage_bytes():
    reject([b"\xc1\xff garbage"], "malformed header")
    reject([b""], "malformed header")
    reject([pickle.dumps({"t": "ack"})], "malformed header")  # never unpickled


def test_rejects_empty_and_shapeless_headers():
    reject([], "empty message")
    reject([msgspec.msgpack.encode({"v": 1})], "malformed header", "array")
    reject([msgspec.msgpack.encode([1, {"t": "ack"}])], "malformed header")


def test_rejects_unknown_tag_and_missing_tag():
    reject([header(1, {"t": "zz", "request_id": "r1"})], "unknown message type 'zz'")
    reject([header(1, {"request_id": "r1"})], "no type tag")
    reject([header(1, [1, 2, 3])], "not a map")


def test_rejects_wrong_field_type():
    msg = msgspec.to_builtins(SAMPLES[4])  # Register
    msg["tp"] = "two"
    reject([header(1, msg)], "invalid Register message", "$.tp", "int")
    msg = msgspec.to_builtins(SAMPLES[10])  # PrefillRequest
    msg["sampling"]["temperature"] = "hot"
    reject([header(1, msg)], "invalid PrefillRequest message", "$.sampling.temperature")


def test_rejects_missing_and_unknown_fields():
    msg = msgspec.to_builtins(SAMPLES[5])  # Heartbeat
    del msg["worker_id"]
    reject([header(1, msg)], "invalid Heartbeat message", "worker_id")
    msg = msgspec.to_builtins(SAMPLES[5])
    msg["sneaky"] = 1
    reject([header(1, msg)], "unknown field", "sneaky")


def test_rejects_out_of_range_values():
    msg = msgspec.to_builtins(SAMPLES[5])
    msg["role"] = "boss"
    reject([header(1, msg)], "invalid Heartbeat message", "boss")
    msg = msgspec.to_builtins(SAMPLES[5])
    msg["free_blocks"] = -1
    reject([header(1, msg)], ">= 0", "free_blocks")
    bad_handle = msgspec.to_builtins(SAMPLES[16])  # KVPoolInfo
    bad_handle["handle"]["nbytes"] = 63
    reject([header(1, bad_handle)], "nbytes 63 does not match")
    bad_handle["handle"]["nbytes"] = 64
    bad_handle["handle"]["dtype"] = "object"
    reject([header(1, bad_handle)], "object")


def test_rejects_inconsistent_messages():
    both = {"t": "tokz", "request_id": "r1", "text": "hi", "messages": [{"role": "user", "content": "x"}]}
    reject([header(1, both)], "exactly one of text or messages")
    lease = {"t": "kvlease", "request_id": "r1", "lease_id": 1, "block_ids": [1], "generations": []}
    reject([header(1, lease)], "invalid KVLease")


def test_error_carries_request_id_when_readable():
    err = reject([header(1, {"t": "abort", "request_id": "r9", "reason": 5})], "invalid Abort message")
    assert err.request_id == "r9"


def test_rejects_other_versions():
    good = msgspec.to_builtins(SAMPLES[1])
    reject([header(p.PROTOCOL_VERSION + 1, good)], f"protocol version {p.PROTOCOL_VERSION + 1} not supported")
    reject([header(0, {"t": "future-thing"})], "protocol version 0")
    reject([header("1", good)], "malformed header")


def test_rejects_oversize_frames():
    big = p.encode(p.KVLookup(request_id="r1", token_ids=list(range(1000))))
    reject(big, "frame 0", "over the 1000-byte limit", max_frame_bytes=1000)
    huge = bytearray(p.DEFAULT_MAX_FRAME_BYTES + 1)
    msg = p.Ack()
    reject(p.encode(msg, [huge]), "frame 1", f"over the {p.DEFAULT_MAX_FRAME_BYTES}-byte limit")
    reject([p.encode(msg)[0]] + [b"x"] * (p.MAX_PAYLOAD_FRAMES + 1), "payload frames, over the limit")


def test_rejects_truncated_tensor_frames():
    frames: list = []
    meta = p.tensor_to_frames(torch.ones(4, 8), frames)
    wire = p.encode(p.Ack(request_id="r1"), frames)
    reject([wire[0], bytes(wire[1])[:100]], "payload frame 0 has 100 bytes, header says 128")
    reject(wire[:1], "announces 1 payload frames, got 0")
    reject(wire + [b"extra"], "announces 1 payload frames, got 2")
    with pytest.raises(p.ProtocolError, match="has 100 bytes; float32"):
        p.frames_to_tensor(meta, [bytes(wire[1])[:100]])
    with pytest.raises(p.ProtocolError, match="tensor frame 3 missing"):
        p.frames_to_tensor(p.TensorFrame(dtype="float32", shape=[1], frame=3), frames)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError, match="SamplingSpec"):
        p.encode(p.SamplingSpec())
