"""TokenizerClient: synchronous calls to one or more tokenizer services."""
from __future__ import annotations

import itertools
import json
import threading
import time
import uuid

import zmq

from shared import protocol as p
from shared.transport import CurveConfig, connect_dealer, recv_msg, send_msg


class TokenizerError(Exception):
    """The service answered with an error, or did not answer in time."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class TokenizerClient:
    """Calls tokenizer services at `addrs` (one address or several).

    One DEALER connects to every address and ZeroMQ spreads requests round-robin over
    the connected services. Calls are serialized by a lock (zmq sockets are not
    thread-safe) and matched to replies by request id, so a late reply to a timed-out
    call is discarded instead of answering the next one. A request unanswered after
    retry_s is sent again (tokenizing is idempotent): one lost with a service that died
    reaches its restarted successor, or another service, well before timeout_s.
    """

    def __init__(self, ctx: zmq.Context, addrs: str | list[str], timeout_s: float = 5.0,
                 curve: CurveConfig | None = None, retry_s: float = 1.0):
        addrs = [addrs] if isinstance(addrs, str) else list(addrs)
        if not addrs:
            raise ValueError("TokenizerClient needs at least one address")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s, self.retry_s = timeout_s, min(retry_s, timeout_s)
        self.sock = connect_dealer(ctx, addrs[0], f"tokc-{uuid.uuid4().hex[:12]}", curve)
        for addr in addrs[1:]:
            self.sock.connect(addr)
        self.sock.sndtimeo = int(timeout_s * 1000)
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def tokenize(self, text: str | None = None, messages: list[dict] | None = None,
                 add_generation_prompt: bool = True, add_special_tokens: bool = True,
                 request_id: str | None = None, tools: list[dict] | None = None) -> list[int]:
        """Token ids of `text`, or of `messages` through the chat template."""
        rid = request_id or self._next_id()
        try:
            chat = None if messages is None else [
                p.ChatMessage(role=m["role"], content=m["content"],
                              tool_calls_json=(json.dumps(m["tool_calls"])
                                               if m.get("tool_calls") else None),
                              tool_call_id=m.get("tool_call_id")) for m in messages]
            req = p.TokenizeRequest(request_id=rid, text=text, messages=chat,
                                    add_generation_prompt=add_generation_prompt,
                                    add_special_tokens=add_special_tokens,
                                    tools_json=json.dumps(tools) if tools else None)
        except (ValueError, TypeError, KeyError) as e:
            raise TokenizerError(f"bad tokenize request: {e!r}", "bad_request") from None
        return self._call(req, p.TokenizeReply).ids

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True,
                   request_id: str | None = None) -> str:
        req = p.DetokenizeRequest(ids=list(ids), request_id=request_id or self._next_id(),
                                  skip_special_tokens=skip_special_tokens)
        return self._call(req, p.DetokenizeReply).text

    def status(self) -> dict:
        """One service's status (whichever the round-robin picks)."""
        with self._lock:
            self._send(p.StatusRequest())
            deadline = time.monotonic() + self.timeout_s
            while True:
                reply = self._recv(deadline, "status")
                if isinstance(reply, p.StatusReply):
                    return reply.data

    def close(self) -> None:
        self.sock.close()

    def _next_id(self) -> str:
        return f"tok-{next(self._ids)}"

    def _call(self, req: p.Msg, reply_type: type) -> p.Msg:
        with self._lock:
            deadline = time.monotonic() + self.timeout_s
            self._send(req)
            resend = time.monotonic() + self.retry_s
            while True:
                try:
                    reply = self._recv(min(deadline, resend), req.request_id)
                except TokenizerError:
                    if time.monotonic() >= deadline:
                        raise TokenizerError(f"no reply from the tokenizer service for "
                                             f"{req.request_id} within {self.timeout_s}s",
                                             "timeout") from None
                    self._send(req)   # lost with a service that died: ask again
                    resend = time.monotonic() + self.retry_s
                    continue
                if getattr(reply, "request_id", None) != req.request_id:
                    continue  # a late answer to an earlier, timed-out call
                if isinstance(reply, p.ErrorReply):
                    raise TokenizerError(f"tokenizer service: {reply.message}", reply.code)
                if not isinstance(reply, reply_type):
                    raise TokenizerError(f"expected {reply_type.__name__}, got "
                                         f"{type(reply).__name__}", "bad_message")
                return reply

    def _send(self, msg: p.Msg) -> None:
        if not send_msg(self.sock, msg):
            raise TokenizerError(f"could not send {type(msg).__name__} within "
                                 f"{self.timeout_s}s", "unavailable")

    def _recv(self, deadline: float, what: str) -> p.Msg:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TokenizerError(f"no reply from the tokenizer service for {what} "
                                     f"within {self.timeout_s}s", "timeout")
            got = recv_msg(self.sock)
            if got is not None:
                return got[1]
