"""Sampling behaviour a user notices: seeds, top-k, stop strings, n, logprobs, errors."""
import math

import pytest
import torch

from shared.engine.sampling_params import SamplingParams
from tests.conftest import assert_idle


def test_seeded_sampling_reproducible_alone_and_batched(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    p = tok.encode("My favourite animal is")
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    a = eng.generate([p], sp)[0][0]
    b = eng.generate([p], sp)[0][0]
    others = [tok.encode("Some other prompt number %d" % i) for i in range(5)]
    batched = eng.generate(others[:2] + [p] + others[2:],
                           [SamplingParams(temperature=1.0, seed=i, max_tokens=20) for i in range(2)]
                           + [sp] + [SamplingParams(temperature=1.0, max_tokens=20)] * 3)
    assert a == b == batched[2][0]
    c = eng.generate([p], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20,
                                          ignore_eos=True))[0][0]
    assert c != a
    assert_idle(eng)


def test_top_k_1_equals_greedy_and_n_choices(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    p = tok.encode("The three primary colours are")
    greedy = eng.generate([p], SamplingParams(temperature=0, max_tokens=16))[0][0]
    topk1 = eng.generate([p], SamplingParams(temperature=1.5, top_k=1, max_tokens=16, seed=3))[0][0]
    assert topk1 == greedy
    many = eng.generate([p], SamplingParams(temperature=1.0, n=4, seed=7, max_tokens=12,
                                             ignore_eos=True))[0]
    assert len(many) == 4 and all(len(c) == 12 for c in many)
    assert len({tuple(c) for c in many}) > 1
    # choice 0 of a seeded request equals the n=1 request with that seed
    one = eng.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=12,
                                            ignore_eos=True))[0][0]
    assert many[0] == one
    assert_idle(eng)


def test_logprobs_are_the_models_log_softmax(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    p = tok.encode("Water boils at")
    eng.add_request("lp", p, SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    (out,) = eng.step()
    res = out.new_logprobs[0]
    from tests.unit.models.test_llama_vs_hf import duet_logits
    want = duet_logits(eng.model, p)[-1].log_softmax(-1)
    assert res.token_id == int(want.argmax())
    assert math.isclose(res.logprob, float(want.max()), abs_tol=1e-4)
    top = torch.topk(want, 3)
    assert [t for t, _ in res.top_logprobs] == top.indices.tolist()
    assert_idle(eng)


def test_penalties_change_repetitive_output(smollm2_engine):
    eng, tok = smollm2_engine, smollm2_engine.tokenizer
    p = tok.encode("apple apple apple apple apple apple")
    plain = eng.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0][0]
    pen = eng.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                           repetition_penalty=1.8, frequency_penalty=1.5))[0][0]
    from collections import Counter
    # greedy output repeats a token; penalties break the repetition
    assert max(Counter(plain).values()) > max(Counter(pen).values())


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature=-0.1 is out of range: must be in [0, 2]"),
    (dict(temperature=2.5), "temperature=2.5 is out of range"),
    (dict(top_p=0.0), "top_p=0.0 is out of range: must be in (0, 1]"),
    (dict(top_k=-5), "top_k=-5 is out of range"),
    (dict(min_p=1.5), "min_p=1.5 is out of range: must be in [0, 1]"),
    (dict(max_tokens=0), "max_tokens=0 is out of range: must be >= 1"),
    (dict(n=0), "n=0 is out of range: must be in [1, 16]"),
    (dict(presence_penalty=3), "presence_penalty=3 is out of range: must be in [-2, 2]"),
    (dict(frequency_penalty=-2.5), "frequency_penalty=-2.5 is out of range"),
    (dict(repetition_penalty=0), "repetition_penalty=0 is out of range: must be in (0, 2]"),
    (dict(logprobs=21), "logprobs=21 is out of range: must be in [0, 20]"),
    (dict(seed=-1), "seed=-1 is out of range"),
    (dict(stop=[""]), "stop=[''] is out of range"),
    (dict(temperature="hot"), "temperature='hot' must be a number"),
    (dict(max_tokens=2.5), "max_tokens=2.5 must be an integer"),
])
def test_bad_parameters_name_themselves(kw, msg):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert msg in str(e.value)


def test_bad_prompts_are_rejected(smollm2_engine):
    eng = smollm2_engine
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token id 999999 is out of range \[0, 49152\)"):
        eng.add_request("x", [1, 999999], SamplingParams())
    with pytest.raises(ValueError, match="prompt has 9000 tokens; this model's context is 8192"):
        eng.add_request("x", [1] * 9000, SamplingParams())
    assert_idle(eng)
