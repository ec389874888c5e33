"""What the engine reports each step."""
from __future__ import annotations

from dataclasses import dataclass, field


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
