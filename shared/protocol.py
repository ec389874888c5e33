"""Every Duet wire message, and the codec that puts them on ZeroMQ frames.

One message is a list of frames:

    [header, payload_0, payload_1, ...]
    header = msgpack [PROTOCOL_VERSION, message, [len(payload_0), ...]]

`message` is a msgpack map whose "t" field names its type (a short tag). The
payload frames carry raw tensor bytes, referred to from inside the message by
index (a TensorFrame, or a BufferHandle with backend 'tcp'); on both sides they
are `msg.frames`. decode() validates everything before a service sees it and
raises ProtocolError naming the problem; nothing here ever uses pickle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Sequence, Union

import msgspec

from shared.buffers.handle import ITEMSIZE, BufferHandle, DType, numel

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 64 << 20  # any one frame, header or payload
MAX_PAYLOAD_FRAMES = 64

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]

# One vocabulary for the whole mesh: every service imports these, none spells them again.
ROLES = ("prefill", "decode", "both")
FINISH_REASONS = ("stop", "length", "abort", "error")
OK_FINISH_REASONS = ("stop", "length")
# Stages of time-to-first-token, in request order (the keys of every `timings` map). A
# disaggregated request's kv_handoff and decode_queue follow token 1 (they delay token 2).
TTFT_STAGES = ("gateway_queue", "tokenize", "prefill_queue", "prefill_compute",
               "kv_handoff", "decode_queue")
Role = Literal[ROLES]  # type: ignore[valid-type]
FinishReason = Literal[FINISH_REASONS]  # type: ignore[valid-type]


class ProtocolError(ValueError):
    """A message that cannot be accepted; str() says why, naming the value."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class Wire(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A typed struct nested inside messages (not sendable on its own)."""


class Msg(Wire, tag_field="t", dict=True):
    """Base of every message. `frames` holds the payload frames: set it (or
    pass frames= to encode) before sending; decode() fills it on receipt."""

    frames: ClassVar[Sequence[Any]] = ()


# ---------------------------------------------------------------- common

class ErrorReply(Msg, tag="err"):
    """Any request failed. code: 'bad_message' | 'bad_request' | 'not_found' |
    'no_blocks' | 'overloaded' | 'unavailable' | 'internal'."""

    code: str
    message: str
    request_id: str | None = None


class Ack(Msg, tag="ack"):
    """A request with nothing to return succeeded."""

    request_id: str = ""


class StatusRequest(Msg, tag="stq"):
    """Ask any service for its status (answered with StatusReply)."""


class StatusReply(Msg, tag="sts"):
    """A service's status: free-form, msgpack-able `data`."""

    service: str
    data: dict[str, Any] = {}


# ---------------------------------------------------------------- worker <-> gateway

class Register(Msg, tag="reg"):
    """Worker -> gateway on connect: who I am and what I can hold."""

    worker_id: str
    role: Role
    model: str
    devices: list[str]  # GPU UUIDs, or ["cpu"]
    max_batch_tokens: Positive
    total_blocks: NonNeg
    free_blocks: NonNeg
    tp: Positive = 1
    pp: Positive = 1
    block_size: Positive = 16
    max_seqs: Positive = 64      # sequences it runs at once: the gateway admits no more
    incarnation: str = ""        # this worker process's own: a restart under the same id has another
    kv_transport: str = ""       # how it takes hand-offs: shm, cuda_ipc or tcp ("": none yet)


class Heartbeat(Msg, tag="hb"):
    """Worker -> gateway every heartbeat interval, with its current load and how many
    steps each of its engines has run (progress, and which engine did the work)."""

    worker_id: str
    role: Role
    free_blocks: NonNeg
    running: NonNeg
    waiting: NonNeg
    queued_tokens: NonNeg
    prefill_steps: NonNeg = 0
    decode_steps: NonNeg = 0
    busy_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0      # the running step so far; 0: idle
    expected_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # what that step should take
    ranks_alive: list[bool] = []   # a TP/PP group: each rank's process alive (rank 0 first)


class Ping(Msg, tag="ping"):
    """Gateway -> worker heartbeat (workers detect a dead gateway by silence)."""

    sender: str = ""


class Goodbye(Msg, tag="bye"):
    """Worker -> gateway on orderly shutdown: stop routing to me."""

    worker_id: str


class SetRole(Msg, tag="role"):
    """Gateway/admin -> worker: switch role at run time (answered with Ack)."""

    role: Role


class Drain(Msg, tag="drain"):
    """Admin -> worker: stop (enable=True) or resume taking new requests."""

    enable: bool = True


# ---------------------------------------------------------------- requests

class SamplingSpec(Wire):
    """Sampling parameters, mirrored as sent; the engine validates ranges.
    top_k 0 and top_p 1.0 disable those filters; logprobs None = none."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    guided_kind: str | None = None     # structured output (shared/engine/guided.py)
    guided_spec: str | None = None


def _check_generations(msg: Any) -> None:
    if len(msg.block_ids) != len(msg.generations):
        raise ValueError(f"{len(msg.block_ids)} block_ids but {len(msg.generations)} generations")


class TokenLogprobs(Wire):
    """Log-probability of one sampled token plus its top alternatives."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []

    def __post_init__(self) -> None:
        if len(self.top_ids) != len(self.top_logprobs):
            raise ValueError(f"{len(self.top_ids)} top_ids but {len(self.top_logprobs)} top_logprobs")


class KVRef(Wire):
    """KV blocks of one request in the store's pool. `handle` names the whole
    pool [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]; block i
    of the request is pool block block_ids[i], valid while its generation
    still equals generations[i]. num_tokens: tokens whose KV is present.
    checksums[i]: block i's bytes hashed (layout.block_checksums) when its KV was written;
    the reader verifies before decoding from them (empty: nothing to verify)."""

    handle: BufferHandle
    block_ids: list[NonNeg]
    generations: list[NonNeg]
    num_tokens: NonNeg
    checksums: list[NonNeg] = []

    def __post_init__(self) -> None:
        _check_generations(self)


class PrefillRequest(Msg, tag="pre"):
    """Gateway -> prefill worker: compute the prompt's KV and sample token 1."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    arrival_ts: float  # time.time() when the gateway accepted the request


class PrefillStarted(Msg, tag="pstart"):
    """Prefill worker -> gateway, for a long prompt as soon as its lease is held: the blocks
    its KV will fill (kv.num_tokens: the whole prompt; no checksums yet). Each block's
    layers become readable as prefill finishes them (KVPoolInfo.progress), so a decode
    worker reading over tcp can fetch them while later layers compute (KVPrefetch)."""

    request_id: str
    kv: KVRef
    lease_id: NonNeg
    num_cached_tokens: NonNeg = 0


class KVPrefetch(Msg, tag="kvpre"):
    """Gateway -> decode worker (one reading over tcp): start fetching this prefilling
    request's blocks, layer by layer as they are written; its DecodeRequest follows."""

    request_id: str
    kv: KVRef
    lease_id: NonNeg


class PrefillDone(Msg, tag="pdone"):
    """Prefill worker -> gateway: token 1 and the leased KV blocks holding
    the prompt (num_cached_tokens came from the prefix cache)."""

    request_id: str
    first_token: int
    kv: KVRef
    lease_id: NonNeg
    num_cached_tokens: NonNeg
    num_computed_tokens: NonNeg
    first_logprobs: TokenLogprobs | None = None
    finish_reason: FinishReason | None = None  # set when token 1 already ends the request
    timings: dict[str, float] = {}


class DecodeRequest(Msg, tag="dec"):
    """Gateway -> decode worker: continue a request. kv None (and lease_id
    None) means no hand-off: the worker computes the prompt itself."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    first_token: int | None = None
    kv: KVRef | None = None
    lease_id: NonNeg | None = None
    timings: dict[str, float] = {}


class TokenBatch(Msg, tag="tok"):
    """Decode worker -> gateway: new tokens; finish_reason set on the last."""

    request_id: str
    ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    timings: dict[str, float] = {}


class Abort(Msg, tag="abort"):
    """Anyone -> anyone holding the request: drop it and free its blocks."""

    request_id: str
    reason: str = ""


# ---------------------------------------------------------------- KV store

class KVPoolQuery(Msg, tag="kvq"):
    """Ask the store for its pool (answered with KVPoolInfo)."""


class KVPoolInfo(Msg, tag="kvpool"):
    """The store's block pool: one handle, layout
    [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]. `epoch` is
    this store process's own: a restarted store has another, a fresh shm segment, and
    lease ids that never match the old ones. `generations`: where the generations array
    lives when it does not follow the pool in its shm segment (a GPU pool's, in host shm).
    """

    handle: BufferHandle
    num_blocks: Positive
    num_layers: Positive
    block_size: Positive
    num_kv_heads: Positive
    head_dim: Positive
    dtype: DType
    epoch: NonNeg = 0
    generations: BufferHandle | None = None
    progress: BufferHandle | None = None   # int32 [num_blocks]: layers written (layer-wise)


class KVLookup(Msg, tag="kvlook"):
    """Find the longest cached prefix of token_ids (answered with KVLookupReply)."""

    request_id: str
    token_ids: list[int]


class KVLookupReply(Msg, tag="kvhit"):
    """Cached prefix: full blocks pinned under a new lease (lease_id None and
    empty lists when nothing matched)."""

    request_id: str
    lease_id: NonNeg | None = None
    block_ids: list[NonNeg] = []
    generations: list[NonNeg] = []
    num_tokens: NonNeg = 0

    def __post_init__(self) -> None:
        _check_generations(self)


class KVAllocate(Msg, tag="kvalloc"):
    """Add num_blocks fresh blocks to lease_id, or to a new lease when None
    (answered with KVLease, or ErrorReply code 'no_blocks')."""

    request_id: str
    num_blocks: NonNeg
    lease_id: NonNeg | None = None


class KVAcquire(Msg, tag="kvacq"):
    """Prefill's one round trip: pin the longest cached prefix of token_ids and add
    fresh blocks for the rest of them, under one new lease held by `holder` (a worker
    id), answered with KVLease (num_cached_tokens set) or ErrorReply 'no_blocks'."""

    request_id: str
    token_ids: list[int]
    holder: str = ""


class KVLease(Msg, tag="kvlease"):
    """A lease's blocks, in request order (prefix hits first, covering
    num_cached_tokens tokens when the lease came from KVAcquire)."""

    request_id: str
    lease_id: NonNeg
    block_ids: list[NonNeg]
    generations: list[NonNeg]
    num_cached_tokens: NonNeg = 0
    pool: str = ""      # the pool's shm segment: which store epoch the blocks belong to
    checksums: list[NonNeg] = []   # of the cached prefix's blocks, as their writer committed

    def __post_init__(self) -> None:
        _check_generations(self)


class KVCommit(Msg, tag="kvcommit"):
    """The lease's blocks are written: index each full block under the
    chained hash of token_ids (the request's tokens from position 0)."""

    request_id: str
    lease_id: NonNeg
    block_ids: list[NonNeg]
    token_ids: list[int]
    checksums: list[NonNeg] = []   # block_ids[i]'s checksum; kept with the indexed blocks
    written_ts: float = 0.0        # time.time() its last layer was written (the ledger's)


class KVClaim(Msg, tag="kvclaim"):
    """Decode (worker `holder`) takes over a lease (answered with KVLease)."""

    request_id: str
    lease_id: NonNeg
    holder: str = ""


class KVDropHolder(Msg, tag="kvdrop"):
    """Gateway -> store: worker `holder` is gone; release every lease it holds -> Ack."""

    holder: str
    request_id: str = ""


class KVRelease(Msg, tag="kvrel"):
    """Return a lease's blocks to the pool (indexed ones stay cached)."""

    request_id: str
    lease_id: NonNeg


class KVRead(Msg, tag="kvread"):
    """Reader without the pool mapped (another host: --kv-transport tcp) -> store: send
    these blocks of a lease -> KVBlocks, one payload frame per block. from_layers (one per
    block, layer-wise): send only the layers from from_layers[i] up to what its writer has
    finished (KVBlocks.upto_layers), and no frame for a block with nothing new."""

    request_id: str
    lease_id: NonNeg
    block_ids: list[NonNeg]
    from_layers: list[NonNeg] = []

    def __post_init__(self) -> None:
        if self.from_layers and len(self.from_layers) != len(self.block_ids):
            raise ValueError(f"{len(self.from_layers)} from_layers for {len(self.block_ids)} blocks")


class KVBlocks(Msg, tag="kvblocks"):
    """Store -> reader: payload frame i holds block_ids[i]'s bytes, one whole block
    [num_layers, 2, block_size, kv_heads, head_dim] of the pool's dtype, sent from the
    pool's own memory; generations[i] as it was when sent. Layer-wise (the read had
    from_layers): upto_layers[i] is how many of block_ids[i]'s layers are written, and the
    frames are, in order, layers [from, upto) of each block whose upto passed its from."""

    request_id: str
    block_ids: list[NonNeg]
    generations: list[NonNeg]
    upto_layers: list[NonNeg] = []

    def __post_init__(self) -> None:
        _check_generations(self)


class KVEvict(Msg, tag="kvevict"):
    """Reader -> store: these blocks failed their checksum; take them out of the prefix
    index so no prompt reuses them (they are recycled once unpinned) -> Ack."""

    request_id: str
    block_ids: list[NonNeg]


class KVRenew(Msg, tag="kvrenew"):
    """Holder -> store: these leases are still in use (resets their TTL) -> Ack."""

    request_id: str = ""
    lease_ids: list[NonNeg] = []


class KVStats(Msg, tag="kvstats"):
    """Ask the store for its counters (answered with KVStatsReply)."""


class KVStatsReply(Msg, tag="kvstatsr"):
    """Store counters; idle means free_blocks + cached_blocks == total_blocks."""

    total_blocks: NonNeg
    free_blocks: NonNeg
    cached_blocks: NonNeg
    leased_blocks: NonNeg
    leases: NonNeg
    expired_leases: NonNeg = 0
    lookup_tokens: NonNeg = 0
    hit_tokens: NonNeg = 0
    read_blocks: NonNeg = 0        # blocks sent over the wire (KVRead: tcp hand-offs)
    evicted_blocks: NonNeg = 0     # blocks taken out of the prefix index (failed checksums)


# ---------------------------------------------------------------- tokenizer

class ChatMessage(Wire):
    """One chat turn, content already flattened to text."""

    role: str
    content: str
    tool_calls_json: str | None = None   # an assistant turn's calls (OpenAI's shape, JSON)
    tool_call_id: str | None = None      # a tool turn: the call it answers


class TokenizeRequest(Msg, tag="tokz"):
    """Encode exactly one of `text` or `messages` (via the chat template)."""

    request_id: str
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    tools_json: str | None = None        # OpenAI's tools, for templates that render them

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("exactly one of text or messages must be set")


class TokenizeReply(Msg, tag="tokzr"):
    request_id: str
    ids: list[int]


class DetokenizeRequest(Msg, tag="detok"):
    ids: list[int]
    request_id: str = ""
    skip_special_tokens: bool = True


class DetokenizeReply(Msg, tag="detokr"):
    text: str
    request_id: str = ""


# ---------------------------------------------------------------- tensors

class TensorFrame(Wire):
    """A tensor carried as payload frame `frame` (0 = first after the header)."""

    dtype: DType
    shape: list[NonNeg]
    frame: NonNeg


MESSAGES: tuple[type[Msg], ...] = (
    ErrorReply, Ack, StatusRequest, StatusReply,
    Register, Heartbeat, Ping, Goodbye, SetRole, Drain,
    PrefillRequest, PrefillStarted, PrefillDone, KVPrefetch, DecodeRequest, TokenBatch, Abort,
    KVPoolQuery, KVPoolInfo, KVLookup, KVLookupReply, KVAcquire, KVAllocate, KVLease,
    KVCommit, KVClaim, KVDropHolder, KVEvict, KVRead, KVBlocks, KVRelease, KVRenew, KVStats, KVStatsReply,
    TokenizeRequest, TokenizeReply, DetokenizeRequest, DetokenizeReply,
)
Message = Union[MESSAGES]  # type: ignore[valid-type]
TAGS: dict[str, type[Msg]] = {cls.__struct_config__.tag: cls for cls in MESSAGES}


# ---------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
_header = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw, list[NonNeg]])
_message = msgspec.msgpack.Decoder(Message)


def _buffer(frame: Any) -> memoryview:
    """Bytes of a frame: zmq.Frame (its .buffer), bytes, memoryview, ndarray."""
    return memoryview(getattr(frame, "buffer", frame)).cast("B")


def encode(msg: Msg, frames: Sequence[Any] | None = None) -> list[Any]:
    """Frames for `msg`: its header, then the payload frames (`frames`, else
    msg.frames) as given, uncopied. Send them with send_multipart(copy=False)."""
    if not isinstance(msg, MESSAGES):
        raise TypeError(f"cannot encode {type(msg).__name__}: not a protocol message")
    payload = list(msg.frames if frames is None else frames)
    sizes = [_buffer(f).nbytes for f in payload]
    return [_encoder.encode((PROTOCOL_VERSION, msg, sizes)), *payload]


def decode(frames: Sequence[Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Msg:
    """The message in `frames` (as from recv_multipart), fully validated.

    Raises ProtocolError, naming the problem, for: no frames, too many frames,
    a frame over max_frame_bytes, bytes that are not msgpack, a header that is
    not [version, message, sizes], another PROTOCOL_VERSION, an unknown type
    tag, a missing, extra or wrongly typed field, or payload frames whose count
    or sizes differ from the header (truncated). Payload lands in msg.frames.
    """
    if not frames:
        raise ProtocolError("empty message: no header frame")
    if len(frames) - 1 > MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"{len(frames) - 1} payload frames, over the limit of {MAX_PAYLOAD_FRAMES}")
    bufs = [_buffer(f) for f in frames]
    for i, buf in enumerate(bufs):
        if buf.nbytes > max_frame_bytes:
            raise ProtocolError(f"frame {i} is {buf.nbytes} bytes, over the {max_frame_bytes}-byte limit")
    try:
        version, raw, sizes = _header.decode(bufs[0])
    except msgspec.MsgspecError as e:
        raise ProtocolError(f"malformed header frame (want [version, message, sizes]): {e}") from None
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} not supported; this side speaks {PROTOCOL_VERSION}")
    try:
        msg = _message.decode(raw)
    except msgspec.MsgspecError as e:
        raise _explain(raw, e) from None
    payload = bufs[1:]
    if len(sizes) != len(payload):
        raise ProtocolError(
            f"{type(msg).__name__} header announces {len(sizes)} payload frames, got {len(payload)}",
            getattr(msg, "request_id", None))
    for i, (want, buf) in enumerate(zip(sizes, payload)):
        if buf.nbytes != want:
            raise ProtocolError(
                f"{type(msg).__name__} payload frame {i} has {buf.nbytes} bytes, header says {want}",
                getattr(msg, "request_id", None))
    if payload:
        msg.frames = payload
    return msg


def _explain(raw: msgspec.Raw, err: Exception) -> ProtocolError:
    """Turn a msgspec error into one that names the message type and field."""
    try:
        fields = msgspec.msgpack.decode(raw)
    except msgspec.MsgspecError:
        return ProtocolError(f"malformed message: {err}")
    if not isinstance(fields, dict):
        return ProtocolError(f"message is a {type(fields).__name__}, not a map with a type tag 't'")
    rid = fields.get("request_id")
    rid = rid if isinstance(rid, str) else None
    tag = fields.get("t")
    if tag is None:
        return ProtocolError("message has no type tag 't'", rid)
    if not isinstance(tag, str) or tag not in TAGS:
        return ProtocolError(f"unknown message type {str(tag)[:40]!r}", rid)
    return ProtocolError(f"invalid {TAGS[tag].__name__} message: {err}", rid)


def tensor_to_frames(tensor: "torch.Tensor", frames: list) -> TensorFrame:
    """Append a contiguous CPU tensor's bytes to `frames` (no copy); the
    returned TensorFrame refers to that frame. Do not modify the tensor
    until the message is sent."""
    from shared.buffers import dtypes, tcp

    frames.append(tcp.to_frame(tensor))
    return TensorFrame(dtype=dtypes.to_name(tensor.dtype), shape=list(tensor.shape), frame=len(frames) - 1)


def frames_to_tensor(meta: TensorFrame, frames: Sequence[Any]) -> "torch.Tensor":
    """The tensor `meta` describes, viewing its payload frame (no copy).
    ProtocolError when the frame is missing or its size does not match."""
    from shared.buffers import tcp

    if not 0 <= meta.frame < len(frames):
        raise ProtocolError(f"tensor frame {meta.frame} missing: message has {len(frames)} payload frames")
    want = numel(meta.shape) * ITEMSIZE[meta.dtype]
    have = _buffer(frames[meta.frame]).nbytes
    if have != want:
        raise ProtocolError(
            f"tensor frame {meta.frame} has {have} bytes; {meta.dtype}{meta.shape} needs {want}")
    return tcp.from_frame(frames[meta.frame], meta.dtype, meta.shape)
