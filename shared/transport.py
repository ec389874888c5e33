"""ZeroMQ plumbing every service shares: sockets, framed messages, liveness, CURVE.

Servers bind a ROUTER; workers connect a DEALER whose identity is their id.
send_msg/recv_msg hide the envelope. A frame that fails protocol validation is
logged, answered with ErrorReply (on a ROUTER) and swallowed: recv_msg returns
None and the service loop goes on. Liveness and PeerTable implement the
Paranoid Pirate heartbeating of the ZeroMQ guide on either side.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from shared.protocol import DEFAULT_MAX_FRAME_BYTES, ErrorReply, Msg, ProtocolError, decode, encode

log = logging.getLogger(__name__)

LINGER_MS = 100  # how long close() may wait to flush; never hang a shutdown
_authenticators: dict[int, tuple[zmq.Context, ThreadAuthenticator, str]] = {}


# ---------------------------------------------------------------- sockets

def make_context(io_threads: int = 1) -> zmq.Context:
    """A fresh context (not the global one), so tests and services own theirs."""
    return zmq.Context(io_threads=io_threads)


def close_context(ctx: zmq.Context) -> None:
    """Stop the context's CURVE authenticator, close its sockets, terminate it."""
    entry = _authenticators.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()
    ctx.destroy(linger=LINGER_MS)


def bind_router(ctx: zmq.Context, addr: str, curve: "CurveConfig | None" = None) -> zmq.Socket:
    """A ROUTER bound to `addr` ('tcp://host:port', 'tcp://127.0.0.1:*', 'ipc://…').

    Sends to an unknown peer fail (send_msg returns False) instead of vanishing;
    a peer reconnecting with the same identity takes over its old slot. With
    `curve` (role 'server') only clients whose public key is in the key dir
    get through. endpoint(sock) gives the bound address.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = LINGER_MS
    sock.router_mandatory = 1
    sock.router_handover = 1
    try:
        if curve is not None:
            curve.apply(sock, ctx)
        sock.bind(addr)
    except zmq.ZMQError as e:
        sock.close(0)
        raise zmq.ZMQError(e.errno, f"cannot bind ROUTER to {addr!r}: {e.strerror}") from None
    return sock


def connect_dealer(ctx: zmq.Context, addr: str, identity: str | bytes,
                   curve: "CurveConfig | None" = None) -> zmq.Socket:
    """A DEALER connected to `addr` whose routing identity is `identity`.
    With `curve` (role 'client') it authenticates to a CURVE server."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = LINGER_MS
    sock.identity = identity.encode() if isinstance(identity, str) else identity
    if curve is not None:
        curve.apply(sock, ctx)
    sock.connect(addr)
    return sock


def endpoint(sock: zmq.Socket) -> str:
    """The address a socket last bound or connected to (resolves ':*' ports)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def send_msg(sock: zmq.Socket, msg: Msg, identity: bytes | None = None,
             frames: list | None = None) -> bool:
    """Send `msg` (to peer `identity` on a ROUTER) with its payload frames,
    uncopied. False, logged, when the peer is unknown or the send timed out."""
    parts = encode(msg, frames)
    if identity is not None:
        parts.insert(0, identity)
    try:
        sock.send_multipart(parts, copy=False)
    except zmq.Again:
        log.warning("send of %s to %r timed out", type(msg).__name__, identity)
        return False
    except zmq.ZMQError as e:
        if e.errno != zmq.EHOSTUNREACH:
            raise
        log.info("dropped %s for unknown peer %r", type(msg).__name__, identity)
        return False
    return True


def recv_msg(sock: zmq.Socket, flags: int = 0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
             answer_invalid: bool | None = None) -> tuple[bytes | None, Msg] | None:
    """Receive one message: (sender identity or None on a DEALER, message).

    An invalid message never raises: it is logged, answered with
    ErrorReply(code='bad_message') when answer_invalid (default: on a ROUTER, to its
    sender; a DEALER that is not a strict request/reply client may opt in, answering
    its one peer), and None is returned. zmq.Again propagates when flags=zmq.NOBLOCK.
    """
    frames = sock.recv_multipart(flags, copy=False)
    identity = None
    if sock.type == zmq.ROUTER:
        identity, frames = frames[0].bytes, frames[1:]
    try:
        return identity, decode(frames, max_frame_bytes)
    except ProtocolError as e:
        log.warning("rejected message from %r (request %s): %s", identity, e.request_id, e)
        answer = sock.type == zmq.ROUTER if answer_invalid is None else answer_invalid
        if answer:
            send_msg(sock, ErrorReply(code="bad_message", message=str(e), request_id=e.request_id),
                     identity)
        return None


# ---------------------------------------------------------------- liveness

class Liveness:
    """Paranoid Pirate bookkeeping for one peer.

    The peer is alive while fewer than `liveness` heartbeat intervals have
    passed since anything was heard from it. heartbeat_due()/sent() pace our
    own heartbeats. next_backoff() gives reconnect delays that double from
    `backoff_s` to `max_backoff_s`; hearing from the peer resets them.
    """

    def __init__(self, interval_s: float = 1.0, liveness: int = 3, backoff_s: float = 1.0,
                 max_backoff_s: float = 32.0, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0 or liveness < 1 or backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError(
                f"bad liveness settings: interval_s={interval_s} (> 0), liveness={liveness} (>= 1), "
                f"backoff_s={backoff_s} (> 0), max_backoff_s={max_backoff_s} (>= backoff_s)")
        self.interval_s, self.liveness = interval_s, liveness
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._clock = clock
        self._last_heard = self._last_sent = clock()
        self._backoff = backoff_s

    def heard(self) -> None:
        """Anything arrived from the peer: full liveness, backoff reset."""
        self._last_heard = self._clock()
        self._backoff = self.backoff_s

    @property
    def remaining(self) -> int:
        """Heartbeat intervals the peer may still stay silent (0 = dead)."""
        missed = int((self._clock() - self._last_heard) / self.interval_s)
        return max(0, self.liveness - missed)

    @property
    def alive(self) -> bool:
        return self.remaining > 0

    def heartbeat_due(self) -> bool:
        """True when an interval has passed since our last heartbeat."""
        return self._clock() - self._last_sent >= self.interval_s

    def sent(self) -> None:
        """We just sent the peer a heartbeat (or any message)."""
        self._last_sent = self._clock()

    def poll_timeout_ms(self) -> int:
        """How long a poll may block before a heartbeat is due."""
        wait = self._last_sent + self.interval_s - self._clock()
        return max(0, int(wait * 1000))

    def next_backoff(self) -> float:
        """Seconds to wait before the next reconnect; doubles up to the max."""
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff_s)
        return delay


STUCK_FLOOR_S = 30.0
STUCK_FACTOR = 10.0


def stuck_after_s(expected_s: float) -> float:
    """How long a step may run before its worker counts as stuck rather than slow: ten
    times what the worker's own measured rates say the step should take, and never under
    STUCK_FLOOR_S (heartbeats, which flow during any step, tell slow from dead)."""
    return max(STUCK_FLOOR_S, STUCK_FACTOR * expected_s)


class PeerTable:
    """The peers a ROUTER has heard from, oldest-heard first.

    seen() records a peer (and optional info, e.g. its Register); purge()
    removes and returns the peers silent for longer than `timeout_s`.
    """

    def __init__(self, timeout_s: float = 3.0, clock: Callable[[], float] = time.monotonic):
        if timeout_s <= 0:
            raise ValueError(f"peer timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self._clock = clock
        self._peers: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()

    def seen(self, identity: bytes, info: Any = None) -> bool:
        """Mark `identity` alive now (replacing its info unless None).
        True when the peer is new."""
        old = self._peers.pop(identity, None)
        if info is None and old is not None:
            info = old[1]
        self._peers[identity] = (self._clock(), info)
        return old is None

    def forget(self, identity: bytes) -> Any:
        """Drop a peer (it said goodbye); returns its info, None if unknown."""
        old = self._peers.pop(identity, None)
        return None if old is None else old[1]

    def purge(self) -> list[tuple[bytes, Any]]:
        """Remove and return (identity, info) of every peer silent too long."""
        deadline = self._clock() - self.timeout_s
        gone = []
        while self._peers:
            identity, (last, info) = next(iter(self._peers.items()))
            if last > deadline:
                break
            del self._peers[identity]
            gone.append((identity, info))
        return gone

    def info(self, identity: bytes) -> Any:
        """The info last recorded for a peer; KeyError naming it if unknown."""
        if identity not in self._peers:
            raise KeyError(f"unknown peer {identity!r}")
        return self._peers[identity][1]

    def items(self) -> list[tuple[bytes, Any]]:
        return [(i, info) for i, (_, info) in self._peers.items()]

    def __contains__(self, identity: object) -> bool:
        return identity in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._peers))


# ---------------------------------------------------------------- CURVE

def generate_keys(key_dir: str | os.PathLike) -> Path:
    """Write server.key(_secret) and client.key(_secret) into `key_dir`
    (created 0700). Every *.key public key in the dir is an allowed client."""
    path = Path(key_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("server", "client"):
        zmq.auth.create_certificates(str(path), name)
    return path


@dataclass(frozen=True)
class CurveConfig:
    """CURVE keys for one side of the mesh, loaded from a key dir."""

    role: Literal["server", "client"]
    public_key: bytes
    secret_key: bytes
    server_key: bytes  # the server's public key (what clients authenticate)
    key_dir: str

    @classmethod
    def from_dir(cls, key_dir: str | os.PathLike, role: Literal["server", "client"] = "server") -> "CurveConfig":
        """Load keys written by generate_keys(); FileNotFoundError names the missing file."""
        if role not in ("server", "client"):
            raise ValueError(f"CURVE role must be 'server' or 'client', got {role!r}")
        path = Path(key_dir)

        def load(name: str) -> tuple[bytes, bytes]:
            file = path / f"{name}.key_secret"
            if not file.is_file():
                raise FileNotFoundError(f"CURVE key {file} missing; run generate_keys({str(path)!r})")
            public, secret = zmq.auth.load_certificate(str(file))
            return public, secret

        server_public, server_secret = load("server")
        public, secret = (server_public, server_secret) if role == "server" else load("client")
        return cls(role, public, secret, server_public, str(path))

    def apply(self, sock: zmq.Socket, ctx: zmq.Context) -> None:
        """Configure `sock` (before bind/connect); a server side also starts
        the context's authenticator, which admits only the dir's public keys."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        if self.role == "server":
            _ensure_authenticator(ctx, self.key_dir)
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.server_key


def _ensure_authenticator(ctx: zmq.Context, key_dir: str) -> None:
    entry = _authenticators.get(id(ctx))
    if entry is not None:
        if entry[2] != key_dir:
            raise ValueError(f"context already authenticates from {entry[2]!r}, not {key_dir!r}")
        return
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".auth"))
    auth.start()
    auth.configure_curve(domain="*", location=key_dir)
    _authenticators[id(ctx)] = (ctx, auth, key_dir)
