"""The tokenizer service: a ROUTER answering TokenizeRequest, DetokenizeRequest and
StatusRequest for one model.

`handle()` is the pure logic (message in, reply out, never raises); `serve()` is the
socket loop around it. A hostile or malformed frame never reaches handle(): recv_msg
rejects it with ErrorReply(code='bad_message') and the loop goes on.
"""
from __future__ import annotations

import json

import logging
import threading
import time
from pathlib import Path

from shared import protocol as p
from shared.models.hub import resolve_model
from shared.tokenization import Tokenizer
from shared.transport import (CurveConfig, bind_router, close_context, endpoint,
                              make_context, recv_msg, send_msg)

log = logging.getLogger("duet.tokenizer")


class TokenizerService:
    """Tokenizer for `model_dir` (a directory or built-in name) served on `bind_addr`.

    Text is encoded with the request's add_special_tokens; messages go through the
    chat template (add_generation_prompt as asked). Bad requests get ErrorReply
    (code 'bad_request', naming the problem, with the request id).
    """

    def __init__(self, model_dir: str | Path, bind_addr: str, curve: CurveConfig | None = None):
        self.model_dir = resolve_model(str(model_dir))
        self.tokenizer = Tokenizer(self.model_dir)
        self.ctx = make_context()
        try:
            self.sock = bind_router(self.ctx, bind_addr, curve)
        except Exception:
            close_context(self.ctx)
            raise
        self.address = endpoint(self.sock)
        self.started = time.time()
        self.counts = {"tokenize": 0, "detokenize": 0, "status": 0, "errors": 0}
        self._stop = threading.Event()

    # -- logic -------------------------------------------------------------------------
    def handle(self, msg: p.Msg) -> p.Msg:
        """The reply to one decoded message."""
        rid = getattr(msg, "request_id", None)
        try:
            if isinstance(msg, p.TokenizeRequest):
                self.counts["tokenize"] += 1
                return p.TokenizeReply(request_id=msg.request_id, ids=self._encode(msg))
            if isinstance(msg, p.DetokenizeRequest):
                self.counts["detokenize"] += 1
                text = self.tokenizer.decode(msg.ids, msg.skip_special_tokens)
                return p.DetokenizeReply(request_id=msg.request_id, text=text)
            if isinstance(msg, p.StatusRequest):
                self.counts["status"] += 1
                return p.StatusReply(service="tokenizer", data=self.status())
            return self._error("bad_request", f"the tokenizer service does not handle "
                               f"{type(msg).__name__} messages", rid)
        except (ValueError, TypeError, OverflowError) as e:
            return self._error("bad_request", str(e), rid)
        except Exception as e:  # a template's own error types, anything unforeseen
            log.exception("request %s failed", rid)
            return self._error("internal", f"{type(e).__name__}: {e}", rid)

    def _encode(self, msg: p.TokenizeRequest) -> list[int]:
        if (msg.text is None) == (msg.messages is None):
            raise ValueError("exactly one of text or messages must be set")
        if msg.text is not None:
            return self.tokenizer.encode(msg.text, add_special_tokens=msg.add_special_tokens)
        if not msg.messages:
            raise ValueError("messages is empty: at least one message is required")
        messages = []
        for m in msg.messages:
            d = {"role": m.role, "content": m.content}
            if m.tool_calls_json:
                d["tool_calls"] = json.loads(m.tool_calls_json)
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            messages.append(d)
        tools = json.loads(msg.tools_json) if msg.tools_json else None
        try:
            return self.tokenizer.apply_chat_template(messages, msg.add_generation_prompt, tools)
        except ValueError:
            raise
        except Exception as e:  # jinja2 TemplateError and friends
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None

    def _error(self, code: str, message: str, rid: str | None) -> p.ErrorReply:
        self.counts["errors"] += 1
        log.warning("request %s: %s", rid, message)
        return p.ErrorReply(code=code, message=message, request_id=rid)

    def status(self) -> dict:
        return {"model": str(self.model_dir), "vocab_size": self.tokenizer.vocab_size,
                "address": self.address, "uptime_s": round(time.time() - self.started, 3),
                **self.counts}

    # -- the socket loop ---------------------------------------------------------------
    def serve(self) -> None:
        """Answer requests until stop(); returns with the socket closed."""
        try:
            while not self._stop.is_set():
                if not self.sock.poll(100):
                    continue
                got = recv_msg(self.sock)
                if got is None:
                    self.counts["errors"] += 1
                    continue
                identity, msg = got
                send_msg(self.sock, self.handle(msg), identity)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask serve() to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close()
            close_context(self.ctx)
