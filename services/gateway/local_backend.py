"""LocalBackend: the Backend contract over an in-process LLMEngine.

The engine is not thread-safe, so one background thread owns it: HTTP threads put
submissions and aborts on an inbox that the thread drains between steps, and read their
request's GenEvents from a queue of its own. Used by `duet serve --local`, by tests that
skip sockets, and as the colocated reference for the disaggregated mesh.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.gateway.backend import ChoiceRequest, GenEvent, Overloaded
from shared.engine.engine import LLMEngine
from shared.protocol import TokenLogprobs

log = logging.getLogger("duet.gateway.local")

_STOP = ("stop",)


@dataclass
class _Live:
    """Engine-thread bookkeeping for one running request."""
    events: queue.Queue
    submitted: float                    # monotonic, when generate() queued it
    first_compute: float | None = None  # monotonic start of its first scheduled step
    started: bool = False               # first token sent
    logprobs: bool = False


class LocalBackend:
    """Backend over `engine`; starts its engine thread on construction, `close()` stops it.

    max_requests bounds the requests admitted at once (more raise Overloaded). Timings on
    the first event of each request: prefill_queue (queued until its first scheduled
    step) and prefill_compute (that step's start until the first token); colocated,
    there is no kv_handoff or decode_queue stage, so those keys are absent.
    """

    def __init__(self, engine: LLMEngine, model_name: str | None = None,
                 max_requests: int = 1024):
        self.engine = engine
        self.tokenizer = engine.tokenizer   # the HTTP layer detokenizes with it
        self.model_name = model_name or Path(str(engine.config.model)).name
        self.max_model_len = engine.max_model_len
        self.max_requests = max_requests
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._live: dict[str, _Live] = {}          # engine thread only
        self._stats: dict = dict(engine.idle_counts(), steps=0)
        self._thread = threading.Thread(target=self._loop, name="duet-local-engine", daemon=True)
        self._thread.start()

    # -- Backend ---------------------------------------------------------------------
    def tokenize(self, request_id: str, text: str | None = None,
                 messages: list[dict] | None = None,
                 add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        if (text is None) == (messages is None):
            raise ValueError("exactly one of text or messages must be given")
        tok = self.tokenizer
        try:
            if text is not None:
                return tok.encode(text, add_special_tokens=True)
            return tok.apply_chat_template(messages, add_generation_prompt, tools)
        except ValueError:
            raise
        except Exception as e:  # jinja2 errors, wrong types inside messages
            raise ValueError(f"cannot apply the chat template: {e}") from None

    def generate(self, req: ChoiceRequest) -> "_EventStream":
        """Admit `req` now (ValueError / Overloaded raised here) and return its events."""
        if req.params.n != 1:
            raise ValueError(f"ChoiceRequest params.n={req.params.n}: the HTTP layer fans out "
                             "choices, so n must be 1")
        self.engine.check_prompt(req.prompt_ids, req.params)  # read-only: safe off-thread
        with self._lock:
            if not self._thread.is_alive():
                raise Overloaded("the local engine thread is not running")
            if len(self._active) >= self.max_requests:
                raise Overloaded(f"{len(self._active)} requests are running; "
                                 f"the limit is {self.max_requests}")
            if req.request_id in self._active:
                raise ValueError(f"request id {req.request_id!r} is already running")
            self._active.add(req.request_id)
        events: queue.Queue = queue.Queue()
        self._inbox.put(("add", req, events, time.monotonic()))
        return _EventStream(self, req.request_id, events)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def health(self) -> dict:
        alive = self._thread.is_alive()
        return {"ok": alive, "backend": "local", "model": self.model_name,
                "engine_thread": "running" if alive else "stopped", **self.stats()}

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, active_requests=len(self._active))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; requests still running end with finish_reason 'abort'."""
        self._inbox.put(_STOP)
        self._thread.join(timeout_s)

    def _release(self, request_id: str) -> None:
        with self._lock:
            self._active.discard(request_id)

    # -- the engine thread -----------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
        finally:
            for rid in list(self._live):
                self._end(rid, GenEvent([], finish_reason="abort"))

    def _drain(self, block: bool) -> bool:
        """Apply queued submissions and aborts; False once asked to stop."""
        while True:
            try:
                cmd = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            else:
                self._end(cmd[1], GenEvent([], finish_reason="abort"))

    def _add(self, req: ChoiceRequest, events: queue.Queue, submitted: float) -> None:
        try:
            self.engine.add_request(req.request_id, req.prompt_ids, req.params)
        except ValueError as e:
            log.warning("request %s rejected by the engine: %s", req.request_id, e)
            events.put(GenEvent([], finish_reason="error", error=str(e)))
            return
        self._live[req.request_id] = _Live(events, submitted,
                                           logprobs=req.params.logprobs is not None)

    def _end(self, request_id: str, event: GenEvent) -> None:
        """Abort in the engine (freeing its blocks) and send the final event."""
        self.engine.abort(request_id)
        live = self._live.pop(request_id, None)
        if live is not None:
            live.events.put(event)

    def _step(self) -> None:
        t0 = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing %d running requests", len(self._live))
            for rid in list(self._live):
                self._end(rid, GenEvent([], finish_reason="error", error=f"engine error: {e}"))
            return
        t1 = time.monotonic()
        for rid, live in self._live.items():
            seqs = self.engine.requests.get(rid)
            if live.first_compute is None and seqs and seqs[0].num_computed_tokens > 0:
                live.first_compute = t0
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            event = GenEvent(list(out.new_token_ids), finish_reason=out.finish_reason,
                             num_cached_tokens=out.num_cached_tokens)
            if live.logprobs:
                event.logprobs = [_token_logprobs(r) for r in out.new_logprobs]
            if not live.started:
                first = live.first_compute if live.first_compute is not None else t0
                event.timings = {"prefill_queue": first - live.submitted,
                                 "prefill_compute": t1 - first}
                live.started = True
            live.events.put(event)
            if out.finished:
                del self._live[out.request_id]
        with self._lock:
            self._stats = dict(self.engine.idle_counts(), steps=self.engine.stats.steps)


def _token_logprobs(res) -> TokenLogprobs:
    top = res.top_logprobs or []
    return TokenLogprobs(logprob=float(res.logprob), top_ids=[int(i) for i, _ in top],
                         top_logprobs=[float(v) for _, v in top])


class _EventStream:
    """Iterator over one request's GenEvents; close() before the last one aborts it."""

    def __init__(self, backend: LocalBackend, request_id: str, events: queue.Queue):
        self._backend = backend
        self.request_id = request_id
        self._events = events
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> GenEvent:
        if self._done:
            raise StopIteration
        while True:
            try:
                event = self._events.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._backend._thread.is_alive():
                    event = GenEvent([], finish_reason="error",
                                     error="the local engine thread stopped")
                    break
        if event.finish_reason is not None:
            self._done = True
            self._backend._release(self.request_id)
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._backend.abort(self.request_id)
            self._backend._release(self.request_id)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
