"""Property-based fuzzing of the HTTP request parser and the app: whatever the body, the
answer is OpenAI-shaped, never a 500, and a rejection names what is wrong."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.app import create_app
from services.gateway.openai_api import ApiError, CompletionRequest, parse_chat, parse_completion
from tests.unit.gateway.test_openai_api import MODEL, FakeBackend

FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stop", "seed", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_p", "ignore_eos", "stream_options",
          "max_completion_tokens", "user", "echo", "best_of", "logit_bias", "role", "content"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from([MODEL, "user", "system", "assistant", "tool", 0, 1, -1, 2**63]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6),
                                             inner, max_size=5), max_leaves=25)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(
    ["user", "system", "assistant", "tool", "chef", 3]), "content": json_values}), max_size=3)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8).map(
    lambda d: {"model": MODEL, **d}) | st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": messages},
    optional={k: json_values for k in ("max_tokens", "temperature", "n", "stop", "stream")})


def deep(n: int) -> str:
    return "[" * n + "]" * n


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies)
def test_the_parser_accepts_or_names_the_problem(body):
    for parse in (parse_completion, parse_chat):
        try:
            req = parse(body, MODEL)
        except ApiError as e:
            assert 400 <= e.status < 500 and e.message
            assert e.param is None or isinstance(e.param, str)
        else:
            assert isinstance(req, CompletionRequest)
            req.params.validate()   # what passed parsing is a valid request


app_client = create_app(FakeBackend()).test_client()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(bodies.map(json.dumps), st.binary(max_size=64).map(bytes),
                 st.integers(1, 200_000).map(lambda n: '{"model": "%s", "prompt": %s}'
                                             % (MODEL, deep(n)))),
       st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_no_body_gets_a_500_and_every_error_is_openai_shaped(data, path):
    r = app_client.post(path, data=data, content_type="application/json")
    assert r.status_code in (200, 400, 404, 413, 503), (r.status_code, r.get_data()[:300])
    if r.status_code != 200:
        err = r.get_json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    else:
        r.get_data()   # a stream runs to its end


def test_deeply_nested_bodies_are_a_400():
    c = create_app(FakeBackend()).test_client()
    for n in (1000, 100_000):
        r = c.post("/v1/completions", data='{"model": "%s", "prompt": %s}' % (MODEL, deep(n)),
                   content_type="application/json")
        assert r.status_code == 400, r.get_data()[:200]
        assert "nested" in r.get_json()["error"]["message"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": json.loads(deep(500))}]}
    r = c.post("/v1/chat/completions", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400 and "nested more than 32 levels" in r.get_json()["error"]["message"]
