"""One HTTP generation request against a Backend: fan out n choices, detokenize each
incrementally, enforce stop strings, and record latency metrics.

A choice whose text hits a stop string is closed at once (the backend aborts it and
frees its blocks) and reports finish_reason "stop". `GenerationRun.close()` closes every
choice still running, so a client that goes away never leaves work behind.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from services.gateway.backend import Backend, ChoiceRequest, GenEvent
from services.gateway.http_metrics import GatewayMetrics
from services.gateway.openai_api import ChoiceResult, CompletionRequest
from services.gateway.text_stream import TextStream
from shared.protocol import OK_FINISH_REASONS



class GenerationFailed(Exception):
    """The backend ended a choice with finish_reason 'error' (message says why)."""


class ClientGone(Exception):
    """The HTTP client disconnected before a non-streaming response was ready."""


class Choice:
    """One choice: its backend event stream, its text so far and its token timings."""

    def __init__(self, index: int, events: Iterator[GenEvent], stream: TextStream,
                 want_logprobs: bool, t0: float):
        self.index, self.events, self.stream, self.t0 = index, events, stream, t0
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if want_logprobs else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.pending: GenEvent | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_event(self) -> GenEvent:
        try:
            return next(self.events)
        except StopIteration:
            return GenEvent([], finish_reason="error",
                            error="the backend ended the stream without a finish reason")

    def feed(self, event: GenEvent, metrics: GatewayMetrics) -> str:
        """Take one event; returns the new text. Closes the stream on a stop string."""
        now = time.monotonic()
        if event.token_ids:
            if self.first_at is None:
                self.first_at = now
                metrics.ttft.observe(now - self.t0)
            else:
                metrics.itl.observe(now - self.last_at)
            self.last_at = now
            metrics.generation_tokens.inc(len(event.token_ids))
        self.token_ids += event.token_ids
        if self.logprobs is not None and event.logprobs:
            self.logprobs += event.logprobs
        final = event.finish_reason is not None
        delta, hit = self.stream.add(event.token_ids, final=final)
        if hit:
            self.finish_reason = "stop"
            if not final:
                self.close()
        elif final:
            self.finish_reason, self.error = event.finish_reason, event.error
        return delta

    def tpot(self) -> float | None:
        n = len(self.token_ids)
        return (self.last_at - self.first_at) / (n - 1) if n > 1 else None

    def close(self) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()

    def result(self) -> ChoiceResult:
        return ChoiceResult(self.index, self.stream.text, self.finish_reason,
                            self.token_ids, self.logprobs)


class GenerationRun:
    """All n choices of one request. start() admits them (backend errors propagate with
    every choice closed), deltas() yields (choice, text delta, event) round-robin until
    all are done, close() ends the run exactly once (idempotent)."""

    def __init__(self, backend: Backend, tokenizer, metrics: GatewayMetrics,
                 req: CompletionRequest, request_id: str, prompt_ids: list[int],
                 max_tokens: int, arrival: float, t0: float, gateway_timings: dict,
                 tenant: str = "anonymous", on_close: Callable[[], None] | None = None):
        self.backend, self.tokenizer, self.metrics = backend, tokenizer, metrics
        self.req, self.request_id, self.prompt_ids = req, request_id, prompt_ids
        self.max_tokens, self.arrival, self.t0 = max_tokens, arrival, t0
        self.gateway_timings, self.tenant, self.on_close = gateway_timings, tenant, on_close
        self.choices: list[Choice] = []
        self._first_event = None
        self._closed = False

    def start(self) -> None:
        self.metrics.running.inc()
        try:
            for i in range(self.req.n):
                params = self.req.choice_params(i, self.max_tokens)
                events = self.backend.generate(ChoiceRequest(
                    f"{self.request_id}-{i}", self.prompt_ids, params, self.arrival,
                    self.tenant))
                stream = TextStream(self.tokenizer, self.prompt_ids, params.stop,
                                    params.skip_special_tokens)
                self.choices.append(Choice(i, events, stream, params.logprobs is not None,
                                           self.t0))
            for c in self.choices:  # the first event surfaces late admission errors
                c.pending = c.next_event()
        except BaseException:
            self.close(ok=False)
            raise
        first = self.choices[0].pending
        if first.finish_reason == "error" and not first.token_ids:
            self.close(ok=False)
            raise GenerationFailed(first.error or "generation failed")
        self.metrics.prompt_tokens.inc(len(self.prompt_ids))
        self.metrics.observe_stages({**self.gateway_timings, **first.timings})
        self._first_event = first

    def deltas(self) -> Iterator[tuple[Choice, str, GenEvent]]:
        active = list(self.choices)
        while active:
            for c in list(active):
                event, c.pending = c.pending or c.next_event(), None
                if c.index == 0 and event.timings and event is not self._first_event:
                    # stages after token 1 (a disaggregated request's KV hand-off and
                    # decode queue) arrive with the decode worker's first batch
                    self.metrics.observe_stages(event.timings)
                delta = c.feed(event, self.metrics)
                yield c, delta, event
                if c.done:
                    active.remove(c)
                    if c.finish_reason == "error":
                        raise GenerationFailed(c.error or "generation failed")

    def collect(self, disconnected: Callable[[], bool] | None = None) -> list[ChoiceResult]:
        """Run every choice to its end. `disconnected` (the server's check that the client
        is still there) is asked after each event: ClientGone stops the run, so a request
        whose client left stops computing instead of running to max_tokens."""
        for _ in self.deltas():
            if disconnected is not None and disconnected():
                raise ClientGone(f"request {self.request_id}: the client disconnected")
        return [c.result() for c in self.choices]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def close(self, ok: bool | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close()
        for c in self.choices:
            if not c.done:
                c.close()
        self.metrics.running.dec()
        if ok is None:
            ok = bool(self.choices) and all(c.finish_reason in OK_FINISH_REASONS
                                           for c in self.choices)
        ttfts = [c.first_at - self.t0 for c in self.choices if c.first_at is not None]
        tpots = [t for t in (c.tpot() for c in self.choices) if t is not None]
        for t in tpots:
            self.metrics.tpot.observe(t)
        self.metrics.request_done(ok and len(ttfts) == len(self.choices),
                                  max(ttfts, default=None), max(tpots, default=None))
