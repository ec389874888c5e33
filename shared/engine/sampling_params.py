"""Per-request sampling parameters, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0              # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top alternatives per token; 0 = chosen only
    skip_special_tokens: bool = True
    guided_kind: str | None = None   # structured output: json_object, json_schema, regex, ...
    guided_spec: str | None = None   # ... its schema / regex / JSON list of choices / grammar

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name, value, allowed):
            raise ValueError(f"{name}={value!r} is out of range: must be {allowed}")

        def number(name, value, integer=False):
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not ok or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be {'an integer' if integer else 'a number'}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            number(name, getattr(self, name))
        for name in ("top_k", "max_tokens", "n"):
            number(name, getattr(self, name), integer=True)
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", self.temperature, "in [0, 2]")
        if self.top_k < -1:
            bad("top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", self.repetition_penalty, "in (0, 2]")
        if self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, ">= 1")
        if not 1 <= self.n <= 16:
            bad("n", self.n, "in [1, 16]")
        if self.logprobs is not None:
            number("logprobs", self.logprobs, integer=True)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                bad("logprobs", self.logprobs, f"in [0, {MAX_LOGPROBS}]")
        if self.seed is not None:
            number("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2 ** 63:
                bad("seed", self.seed, "in [0, 2^63)")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            bad("stop", f"<{len(self.stop)} strings>", "at most 16 strings")
        if self.guided_kind is not None:
            from shared.engine.guided import GUIDED_KINDS, MAX_SPEC_BYTES
            if self.guided_kind not in GUIDED_KINDS:
                bad("guided_kind", self.guided_kind, f"one of {', '.join(GUIDED_KINDS)}")
            if self.guided_spec is not None and (not isinstance(self.guided_spec, str)
                                                 or len(self.guided_spec) > MAX_SPEC_BYTES):
                bad("guided_spec", "<spec>", f"a string of at most {MAX_SPEC_BYTES} bytes")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                   for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
