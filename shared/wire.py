"""Conversions between engine types and wire messages."""
from __future__ import annotations

from shared.engine.sampler import SampleResult
from shared.engine.sampling_params import SamplingParams
from shared.protocol import SamplingSpec, TokenLogprobs

_SPEC_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "max_tokens", "stop_token_ids",
                "ignore_eos", "logprobs", "n", "guided_kind", "guided_spec")


def spec_from_params(p: SamplingParams) -> SamplingSpec:
    """Stop strings stay at the gateway (they are text); everything else travels."""
    return SamplingSpec(**{f: getattr(p, f) for f in _SPEC_FIELDS})


def params_from_spec(s: SamplingSpec) -> SamplingParams:
    """Raises ValueError naming any out-of-range field (a hostile peer's values)."""
    return SamplingParams(**{f: getattr(s, f) for f in _SPEC_FIELDS})


def logprobs_to_wire(r: SampleResult) -> TokenLogprobs:
    top = r.top_logprobs or []
    return TokenLogprobs(logprob=r.logprob, top_ids=[t for t, _ in top],
                         top_logprobs=[lp for _, lp in top])
