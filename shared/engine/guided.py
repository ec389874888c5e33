"""Structured outputs: a grammar (JSON schema, any JSON object, a regex, a choice of
strings, a Lark grammar) compiled by llguidance and applied as a token mask before
sampling, one matcher per sequence, so constrained and free sequences share a batch.

In disaggregated serving prefill samples token 1 under the grammar, and decode builds
the same matcher and consumes token 1 before its first step: the grammar resumes where
prefill left it (the state is a function of the grammar and the tokens so far).
"""
from __future__ import annotations

import json
import threading

import torch

GUIDED_KINDS = ("json_object", "json_schema", "regex", "choice", "lark")
MAX_SPEC_BYTES = 64 << 10


def grammar_for(kind: str, spec: str | None) -> str:
    """The llguidance grammar for a guide; ValueError naming what is wrong with it."""
    from llguidance import LLMatcher
    if kind not in GUIDED_KINDS:
        raise ValueError(f"guided decoding kind {kind!r} is not one of {', '.join(GUIDED_KINDS)}")
    if kind != "json_object" and not isinstance(spec, str):
        raise ValueError(f"{kind} needs its specification as a string")
    if spec is not None and len(spec.encode()) > MAX_SPEC_BYTES:
        raise ValueError(f"the {kind} specification is {len(spec.encode())} bytes; at most "
                         f"{MAX_SPEC_BYTES}")
    if kind == "json_object":
        grammar = LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}))
    elif kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"the JSON schema must be an object, not {type(schema).__name__}")
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        try:
            choices = json.loads(spec)
        except ValueError:
            choices = None
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        grammar = LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    else:
        grammar = LLMatcher.grammar_from_lark(spec)
    err = LLMatcher.validate_grammar(grammar)
    if err:
        raise ValueError(f"the {kind.replace('_', ' ')} does not compile: {err.strip()}")
    return grammar


class Guides:
    """An engine's guided-decoding state: its tokenizer for llguidance (built once, on the
    first guided request: ~0.2 s for a 49k vocabulary) and the masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._lltok = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                from llguidance import LLTokenizer
                if self.tokenizer is None:
                    raise ValueError("guided decoding needs the model's tokenizer (tokenizer.json)")
                self._lltok = LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                          eos_token=list(self.eos_ids) or None)
            return self._lltok

    def matcher(self, kind: str, spec: str | None, consumed: list[int] = ()):
        """A fresh matcher for the guide, advanced over `consumed` (tokens already out)."""
        from llguidance import LLMatcher
        m = LLMatcher(self._ll_tokenizer(), grammar_for(kind, spec))
        for t in consumed:
            if not m.consume_token(t):
                raise ValueError(f"token {t} is not allowed by the {kind} guide here: "
                                 f"{m.get_error() or 'rejected'}")
        if m.is_error():
            raise ValueError(f"the {kind} guide failed: {m.get_error()}")
        return m

    @staticmethod
    def mask(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """Disallowed tokens of each guided row to -inf, in place (logits [N, V] fp32)."""
        if not rows:
            return
        from llguidance.torch import (allocate_token_bitmask, apply_token_bitmask_inplace,
                                      fill_next_token_bitmask)
        bitmask = allocate_token_bitmask(len(rows), logits.shape[-1])
        for i, m in enumerate(matchers):
            fill_next_token_bitmask(m, bitmask, i)
        with torch.inference_mode():   # the runner's logits are inference tensors
            sub = logits[rows]
            apply_token_bitmask_inplace(sub, bitmask)
            logits[rows] = sub
