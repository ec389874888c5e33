"""Structured outputs in the engine: a grammar as a token mask per sequence, in batches
shared with free sequences, and resumed after a hand-off (token 1 from elsewhere)."""
from __future__ import annotations

import json
import re

import pytest

from shared.engine.guided import grammar_for
from shared.engine.sampling_params import SamplingParams
from tests.conftest import assert_idle

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_guides_in_a_batch_with_free_sequences(smollm2_engine):
    eng = smollm2_engine
    tok = eng.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person."}])
    free_alone = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0][0]
    outs = eng.generate([prompt] * 4, [
        SamplingParams(temperature=0.8, seed=3, max_tokens=60, guided_kind="json_schema",
                       guided_spec=json.dumps(SCHEMA)),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, guided_kind="choice",
                       guided_spec=json.dumps(["yes", "no", "maybe"])),
        SamplingParams(temperature=0.9, seed=9, max_tokens=12, guided_kind="regex",
                       guided_spec=r"[0-9]{3}-[0-9]{4}")])
    person = json.loads(tok.decode(outs[0][0]))
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert outs[1][0] == free_alone          # the free sequence did not notice the masks
    assert tok.decode(outs[2][0]) in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", tok.decode(outs[3][0]))
    for o in (outs[0][0], outs[2][0], outs[3][0]):   # the grammar ended it: EOS
        assert o[-1] in eng.eos_token_ids
    assert_idle(eng)


def test_grammar_resumes_after_token_1_from_elsewhere(smollm2_engine):
    """What a decode worker does: the grammar's state is rebuilt from token 1."""
    eng = smollm2_engine
    tok = eng.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person."}])
    p = SamplingParams(temperature=0, max_tokens=60, guided_kind="json_schema",
                       guided_spec=json.dumps(SCHEMA))
    whole = eng.generate([prompt], p)[0][0]
    # token 1 as prefill sampled it; the rest decoded after add_prefilled
    from shared.engine.engine import LLMEngine
    assert isinstance(eng, LLMEngine)
    eng.add_prefilled("handoff", prompt, whole[0], p,
                      lambda blocks: _prefill_into(eng, prompt, blocks))
    rest = []
    while eng.has_unfinished():
        for out in eng.step():
            rest.extend(out.new_token_ids)
    assert [whole[0]] + rest == whole
    with pytest.raises(ValueError, match="is not allowed by the json_schema guide"):
        eng.guides.matcher("json_schema", json.dumps(SCHEMA), tok.encode("hello"))
    assert_idle(eng)


def _prefill_into(eng, prompt, blocks):
    """Fill `blocks` with the prompt's KV by running it through a scratch engine on the
    same model and copying its cache blocks over."""
    from shared.config import EngineConfig
    from shared.engine.engine import LLMEngine
    scratch = LLMEngine(eng.model, EngineConfig(model="x", dtype="float32", num_kv_blocks=64,
                                                enable_prefix_caching=False))
    scratch.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=2))
    scratch.step()                     # the prompt's KV, in the scratch blocks
    table = scratch.requests["s"][0].block_table
    for src, dst in zip(table, blocks):
        eng.kv_cache.tensor[:, :, dst] = scratch.kv_cache.tensor[:, :, src]
    scratch.abort("s")


@pytest.mark.parametrize("kind,spec,fragment", [
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", json.dumps({"type": "bogus"}), "Invalid type: bogus"),
    ("regex", "[a-z", "does not compile"),
    ("choice", json.dumps("yes"), "non-empty list"),
    ("lark", "start: (", "does not compile"),
    ("yaml", "x", "is not one of"),
])
def test_bad_guides_name_the_problem(kind, spec, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        grammar_for(kind, spec)
