"""Text-level streaming for one choice: incremental detokenization and stop strings.

Stop strings are text, so they are the gateway's business: workers stop on token ids
(eos, stop_token_ids, max_tokens) and the gateway cuts the text and aborts the rest.
"""
from __future__ import annotations

from shared.tokenization import IncrementalDetokenizer, Tokenizer


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
