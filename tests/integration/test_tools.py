"""Tool calls through real meshes (disaggregated and colocated) with the official openai
client, on a tiny random model whose chat template renders tools (SmolLM2's does not):
a forced call parses into tool_calls, streaming and not, and the round trip (the call,
then its result sent back) is served."""
from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.conftest import save_tiny_model
from tests.integration.mesh_util import start_mesh, wait_idle

TEMPLATE = """{%- if tools %}<|im_start|>system
You can call these functions:
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}To call one, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory, smollm2_dir):
    d, _ = save_tiny_model(tmp_path_factory.mktemp("tools-model"), seed=11, vocab_size=49152,
                           num_hidden_layers=2, max_position_embeddings=1024)
    shutil.copy(smollm2_dir / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module", params=["disagg", "coloc"])
def mesh(request, tools_model, tmp_path_factory):
    kw = {"colocated": True} if request.param == "coloc" else {"prefill": 1, "decode": 1}
    m = start_mesh(tools_model, tmp_path_factory.mktemp(f"tools-{request.param}"), **kw)
    yield m
    m.stop()


def _client(mesh):
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_forced_call_parses_into_tool_calls_and_round_trips(mesh):
    c = _client(mesh)
    model = c.models.list().data[0].id
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                  tool_choice=named, max_tokens=64, temperature=0.8, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome", "Oslo")
    assert call.id.startswith("call_")
    # the round trip: the call, then its result, back to the model
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    r2 = c.chat.completions.create(model=model, messages=follow, tools=[WEATHER, TIME],
                                   tool_choice="none", max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert r2.choices[0].message.tool_calls is None
    plain = c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                      tool_choice="none", max_tokens=1, temperature=0)
    # the call and its result were rendered into the prompt (~30 tokens more)
    assert r2.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    wait_idle(mesh)


def test_required_call_streams_as_a_tool_call_delta(mesh):
    c = _client(mesh)
    model = c.models.list().data[0].id
    chunks = list(c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                            tool_choice="required", max_tokens=64,
                                            temperature=0.8, seed=2, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    wait_idle(mesh)


def test_bad_tool_requests_are_400(mesh):
    c = _client(mesh)
    model = c.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=4,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'nope', which is not in tools (get_weather)" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model, messages=ASK, max_tokens=4,
                                  tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert "tools[0].function.name='bad name!'" in str(e.value)
