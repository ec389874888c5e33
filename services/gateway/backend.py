"""The contract between the HTTP layer and whatever generates tokens.

`LocalBackend` runs an in-process LLMEngine; `BrokerClient` hands requests to the broker
thread that routes them to prefill and decode workers over ZeroMQ. The HTTP layer knows
only this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from shared.engine.sampling_params import SamplingParams
from shared.protocol import TTFT_STAGES  # noqa: F401  (the keys of GenEvent.timings)


@dataclass
class ChoiceRequest:
    """One choice of one HTTP request. params.n is always 1: the HTTP layer fans a
    request with n choices out as n GenRequests (seed + i when seeded)."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float              # time.time() when the HTTP request arrived
    tenant: str = "anonymous"   # whose request (an API key's name): fair queuing is per tenant


@dataclass
class GenEvent:
    """New tokens of one choice. The last event of a stream has finish_reason set."""
    token_ids: list[int]
    logprobs: list | None = None            # list[TokenLogprobs] parallel to token_ids
    finish_reason: str | None = None        # "stop" | "length" | "abort" | "error"
    error: str | None = None                # message when finish_reason == "error"
    num_cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # TTFT_STAGES -> seconds


class Overloaded(Exception):
    """No capacity for the request right now (HTTP 503, with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    """What the HTTP layer needs from generation.

    tokenize: prompt text (add_special_tokens) or chat messages (the chat template) to
        ids; ValueError naming the problem for bad messages; may raise Overloaded.
    generate: admit the request and return an iterator of its GenEvents (blocking for
        each); the last event has finish_reason set. ValueError when the request cannot
        ever run (prompt ids out of range, too large for the cache), Overloaded when
        there is no capacity now; either may surface at the call or at the first next().
        Closing the iterator before its last event aborts the request everywhere and
        frees its blocks.
    abort: stop a request by id (no-op when unknown or finished).
    health: {"ok": bool, ...details}; stats: free-form numbers for /health and admin.
    """
    model_name: str
    max_model_len: int

    def tokenize(self, request_id: str, text: str | None = None,
                 messages: list[dict] | None = None,
                 add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> list[int]: ...

    def generate(self, req: ChoiceRequest) -> Iterator[GenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def health(self) -> dict: ...

    def stats(self) -> dict: ...
