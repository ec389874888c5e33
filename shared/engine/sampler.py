"""Sampling: penalties, temperature, top-k/top-p/min-p, per-request seeds, logprobs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None                       # of the chosen token
    top_logprobs: list[tuple[int, float]] | None = None


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        # HF semantics over prompt and output: shrink positive logits, grow negative ones.
        ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64)
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty,
                                  vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        # OpenAI semantics over generated tokens only.
        out = torch.tensor(seq.output_ids, dtype=torch.int64)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """logits [V] (already temperature-scaled) -> logits with excluded tokens at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p; keep at least one
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
    """logits [N, V] fp32, one row per sequence that needs its next token."""
    want_lp = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = logits.log_softmax(-1) if want_lp else None
    # every plain greedy row in one argmax (the common case; one call, not one per row)
    plain = logits.argmax(-1).tolist() if any(_plain_greedy(s.params) for s in seqs) else None
    results = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if plain is not None and _plain_greedy(p):
            token = plain[row]
            results.append(_result(token, p, raw_logprobs, row))
            continue
        x = logits[row]
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            x = x.clone()
            _apply_penalties(x, seq)
        if p.greedy:
            token = int(torch.argmax(x))
        else:
            x = _filter(x / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = x.softmax(-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and only
            # this sequence's generator is consumed, so seeded output is batch-invariant.
            noise = torch.empty_like(probs).exponential_(generator=seq.generator)
            token = int(torch.argmax(probs / noise))
        results.append(_result(token, p, raw_logprobs, row))
    return results


def argmax_suffices(seqs: list[Sequence]) -> bool:
    """Whether each of these sequences' next token is just its logits' argmax (greedy, no
    penalties, no logprobs, no grammar): a pipeline's last stage can then sample them."""
    return bool(seqs) and all(_plain_greedy(s.params) and s.params.logprobs is None
                              and s.guide is None for s in seqs)


def _plain_greedy(p) -> bool:
    return p.greedy and p.repetition_penalty == 1.0 and not (p.presence_penalty
                                                              or p.frequency_penalty)


def _result(token: int, p, raw_logprobs, row: int) -> SampleResult:
    res = SampleResult(token)
    if p.logprobs is not None:
        lp = raw_logprobs[row]
        res.logprob = float(lp[token])
        if p.logprobs > 0:
            top = torch.topk(lp, p.logprobs)
            res.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
    return res
