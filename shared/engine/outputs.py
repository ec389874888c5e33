"""What the engine reports each step, and text-level streaming with stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field

from shared.tokenization import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """New tokens for one choice of one request since the previous step."""
    request_id: str
    index: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None       # "stop" | "length" | "abort"
    new_logprobs: list = field(default_factory=list)  # SampleResult per new token
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class TextStream:
    """Incremental text for one choice; enforces stop strings exactly.

    Text that could still turn into a stop string is held back, so a client never sees
    any part of one. `add` returns (text delta, hit) where hit means a stop string matched
    and the stream is over (the caller aborts the sequence).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.text = ""
        self.stopped = False

    def add(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.detok.add(token_ids)
        if final:
            self.pending += self.detok.flush()
        hits = [p for p in (self.pending.find(s) for s in self.stop) if p != -1]
        if hits:
            out = self.pending[:min(hits)]
            self.text += out
            self.pending, self.stopped = "", True
            return out, True
        cut = len(self.pending) if final else max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out, False
