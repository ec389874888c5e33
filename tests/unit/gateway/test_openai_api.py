"""OpenAI request parsing, error bodies and response shapes; the app over a fake backend
(Flask's test client, no sockets, no model)."""
import json

import pytest

from services.gateway.app import create_app
from services.gateway.backend import GenEvent, Overloaded
from services.gateway.openai_api import (ApiError, ChoiceResult, chat_logprobs,
                                         completion_logprobs, parse_chat, parse_completion,
                                         response_body, stream_chunk, usage_chunk)
from shared.protocol import TokenLogprobs

MODEL = "fake"
VOCAB = ["<eos>", "Hello", " world", "!", " foo", " bar", " STOP", " baz"]


def completion(**kw):
    return dict({"model": MODEL, "prompt": "hi"}, **kw)


def chat(**kw):
    return dict({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, **kw)


def error_of(fn, body) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(body, MODEL)
    return e.value


# -- parsing ------------------------------------------------------------------------------

def test_completion_maps_every_field():
    req = parse_completion(completion(
        max_tokens=7, temperature=0.5, top_p=0.9, n=3, stop="x", seed=11,
        presence_penalty=0.1, frequency_penalty=-0.2, logprobs=2, top_k=5, min_p=0.05,
        repetition_penalty=1.1, ignore_eos=True, stop_token_ids=[3, 4], user="u",
        stream=True, stream_options={"include_usage": True}), MODEL)
    p = req.params
    assert (req.prompt, req.prompt_ids, req.messages) == ("hi", None, None)
    assert (req.n, req.max_tokens, req.stream, req.include_usage, req.user) == (3, 7, True, True, "u")
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 7, 0.5, 0.9, 5, 0.05)
    assert (p.stop, p.seed, p.presence_penalty, p.frequency_penalty) == (["x"], 11, 0.1, -0.2)
    assert (p.logprobs, p.repetition_penalty, p.ignore_eos, p.stop_token_ids) == (2, 1.1, True, [3, 4])
    assert [req.choice_params(i, 5).seed for i in range(3)] == [11, 12, 13]
    assert req.choice_params(2, 5).max_tokens == 5 and req.choice_params(2, 5).n == 1


def test_completion_defaults_and_prompt_forms():
    req = parse_completion(completion(), MODEL)
    assert req.max_tokens == 16 and req.params.temperature == 1.0 and req.params.logprobs is None
    assert parse_completion(completion(prompt=[1, 2, 3]), MODEL).prompt_ids == [1, 2, 3]
    assert parse_completion(completion(prompt=["one"]), MODEL).prompt == "one"
    assert parse_completion(completion(prompt=[[5, 6]]), MODEL).prompt_ids == [5, 6]


def test_chat_fields():
    req = parse_chat(chat(max_tokens=9, max_completion_tokens=4, logprobs=True, top_logprobs=3), MODEL)
    assert req.max_tokens == 4 and req.params.logprobs == 3
    assert parse_chat(chat(logprobs=True), MODEL).params.logprobs == 0
    assert parse_chat(chat(), MODEL).max_tokens is None  # runs to the end of the context
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_chat(chat(messages=[{"role": "system", "content": "s"},
                                    {"role": "user", "content": parts},
                                    {"role": "assistant", "content": None}]), MODEL)
    assert req.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "a\nb"},
                            {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("body, param, fragment", [
    ([1, 2], None, "must be a JSON object"),
    ({"prompt": "x"}, "model", "'model' is required"),
    (completion(model=3), "model", "'model' must be a string"),
    (completion(prompt=None), "prompt", "'prompt' is required"),
    (completion(prompt=5), "prompt", "'prompt' must be a string"),
    (completion(prompt=[]), "prompt", "'prompt' must be"),
    (completion(prompt=[1, True]), "prompt", "'prompt' must be"),
    (completion(prompt=[1, -2]), "prompt", "non-negative token ids"),
    (completion(prompt=["a", "b"]), "prompt", "only one prompt per request is supported; got 2"),
    (completion(max_tokens="8"), "max_tokens", "'max_tokens' must be an integer, got string '8'"),
    (completion(max_tokens=2.5), "max_tokens", "must be an integer"),
    (completion(max_tokens=0), "max_tokens", "max_tokens=0 is out of range"),
    (completion(temperature="hot"), "temperature", "'temperature' must be a number"),
    (completion(temperature=True), "temperature", "'temperature' must be a number, got boolean"),
    (completion(temperature=5), "temperature", "temperature=5 is out of range: must be in [0, 2]"),
    (completion(top_p=0), "top_p", "top_p=0 is out of range"),
    (completion(top_k=-2), "top_k", "top_k=-2 is out of range"),
    (completion(min_p=1.5), "min_p", "min_p=1.5"),
    (completion(n=0), "n", "n=0 is out of range"),
    (completion(n=17), "n", "n=17 is out of range"),
    (completion(seed=-1), "seed", "seed=-1 is out of range"),
    (completion(presence_penalty=3), "presence_penalty", "presence_penalty=3"),
    (completion(frequency_penalty=-3), "frequency_penalty", "frequency_penalty=-3"),
    (completion(repetition_penalty=0), "repetition_penalty", "repetition_penalty=0"),
    (completion(stop=5), "stop", "'stop' must be a string or an array of strings"),
    (completion(stop=[""]), "stop", "stop=['']"),
    (completion(stop=["a"] * 17), "stop", "at most 16"),
    (completion(stop_token_ids=[-1]), "stop_token_ids", "non-negative token ids"),
    (completion(logprobs=21), "logprobs", "logprobs=21 is out of range"),
    (completion(logprobs=True), "logprobs", "'logprobs' must be an integer"),
    (completion(stream="yes"), "stream", "'stream' must be a boolean"),
    (completion(stream_options={"include_usage": True}), "stream_options", "only allowed when stream=true"),
    (completion(echo=True), "echo", "echo=true is not supported"),
    (completion(suffix="x"), "suffix", "not supported"),
    (completion(best_of=3), "best_of", "best_of=3 is not supported"),
    (completion(logit_bias={"5": 1}), "logit_bias", "not supported"),
    (completion(ignore_eos="no"), "ignore_eos", "must be a boolean"),
    (chat(messages=None), "messages", "'messages' is required"),
    (chat(messages=[]), "messages", "non-empty"),
    (chat(messages="hi"), "messages", "'messages' must be an array"),
    (chat(messages=["hi"]), "messages[0]", "'messages[0]' must be an object"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "messages[0].role='wizard'"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "messages[0].content is required"),
    (chat(messages=[{"role": "user", "content": 7}]), "messages[0].content", "a string or a list of text parts"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content", "only text parts are supported"),
    (chat(logprobs=1), "logprobs", "'logprobs' must be a boolean"),
    (chat(top_logprobs=2), "top_logprobs", "requires logprobs=true"),
    (chat(logprobs=True, top_logprobs=30), "logprobs", "logprobs=30 is out of range"),
    (chat(tools=[{"type": "function"}]), "tools", "tools[0] must be"),
    (chat(tool_choice="required"), "tool_choice", "'tool_choice' needs 'tools'"),
    (completion(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "chat completions parameter"),
    (chat(response_format={"type": "yaml"}), "response_format", "type 'yaml' is not supported"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
     "response_format", "does not compile: Invalid type: bogus"),
    (chat(response_format={"type": "json_schema"}), "response_format", "needs {'json_schema'"),
    (chat(guided_regex="[a-z]+("), "guided_regex", "unclosed group"),
    (chat(guided_choice=[]), "guided_choice", "non-empty list of non-empty strings"),
    (chat(guided_choice=["a"], guided_regex="a"), "guided_choice", "at most one structured output"),
])
def test_bad_bodies_are_400_naming_the_value(body, param, fragment):
    parse = parse_chat if isinstance(body, dict) and "messages" in body else parse_completion
    err = error_of(parse, body)
    assert err.status == 400 and err.type == "invalid_request_error"
    assert fragment in err.message and err.param == param, (err.message, err.param)


def test_structured_output_requests_parse_into_guides():
    req = parse_chat(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}),
        "fake")
    assert req.params.guided_kind == "json_schema"
    assert json.loads(req.params.guided_spec)["properties"]["a"] == {"type": "integer"}
    assert parse_chat(chat(response_format={"type": "json_object"}), "fake").params.guided_kind == "json_object"
    req = parse_chat(chat(guided_choice=["yes", "no"]), "fake")
    assert (req.params.guided_kind, json.loads(req.params.guided_spec)) == ("choice", ["yes", "no"])
    assert parse_chat(chat(response_format={"type": "text"}), "fake").params.guided_kind is None


def test_unknown_model_is_404():
    err = error_of(parse_completion, completion(model="gpt-4"))
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert "'gpt-4' does not exist" in err.message and "'fake'" in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


# -- response shapes -------------------------------------------------------------------------

def token_text(i):
    return VOCAB[i]


LPS = [TokenLogprobs(logprob=-0.5, top_ids=[1, 2], top_logprobs=[-0.5, -1.0]),
       TokenLogprobs(logprob=-0.25, top_ids=[2, 3], top_logprobs=[-0.25, -2.0])]


def test_non_stream_bodies():
    req = parse_completion(completion(n=2), MODEL)
    choices = [ChoiceResult(1, "b", "stop", [3]), ChoiceResult(0, "Hello world", "length", [1, 2], LPS)]
    body = response_body(req, "cmpl-1", 123, choices, 4, token_text)
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["created"] == 123
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == "Hello world" and body["choices"][1]["logprobs"] is None
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hello", " world"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"Hello": -0.5, " world": -1.0}, {" world": -0.25, "!": -2.0}],
        "text_offset": [0, 5]}
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}

    req = parse_chat(chat(logprobs=True, top_logprobs=2), MODEL)
    body = response_body(req, "chatcmpl-1", 1, [ChoiceResult(0, "Hello world", "stop", [1, 2], LPS)],
                         4, token_text)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    first = body["choices"][0]["logprobs"]["content"][0]
    assert first == {"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello"),
                     "top_logprobs": [{"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello")},
                                      {"token": " world", "logprob": -1.0, "bytes": list(b" world")}]}


def test_stream_chunks():
    req = parse_chat(chat(stream=True, stream_options={"include_usage": True}), MODEL)
    role = stream_chunk(req, "chatcmpl-1", 5, 0, None, role=True)
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}]
    last = stream_chunk(req, "chatcmpl-1", 5, 1, "x", "stop")
    assert last["choices"][0]["delta"] == {"content": "x"} and last["choices"][0]["finish_reason"] == "stop"
    use = usage_chunk(req, "chatcmpl-1", 5, 3, 4)
    assert use["choices"] == [] and use["usage"]["total_tokens"] == 7
    req = parse_completion(completion(stream=True), MODEL)
    c = stream_chunk(req, "cmpl-1", 5, 0, "ab")
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "ab" and "usage" not in c
    assert completion_logprobs(token_text, [3], LPS[:1], offset=7)["text_offset"] == [7]
    assert chat_logprobs(token_text, [3], LPS[:1])["content"][0]["token"] == "!"


# -- the app over a fake backend ------------------------------------------------------------

class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i == 0))


class FakeStream:
    def __init__(self, backend, req):
        self.backend, self.req, self.sent, self.done = backend, req, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        script = self.backend.script
        tok = script[self.sent % len(script)]
        self.sent += 1
        last = self.sent >= self.req.params.max_tokens
        self.done = last
        lps = None
        if self.req.params.logprobs is not None:
            lps = [TokenLogprobs(logprob=-1.0, top_ids=[tok], top_logprobs=[-1.0])]
        return GenEvent([tok], lps, "length" if last else None,
                        timings={"prefill_queue": 0.01} if self.sent == 1 else {})

    def close(self):
        if not self.done:
            self.done = True
            self.backend.aborted.append(self.req.request_id)


class FakeBackend:
    model_name = MODEL
    max_model_len = 64

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.script = [1, 2, 3]
        self.requests, self.aborted = [], []
        self.fail = None        # exception generate() raises
        self.ok = True

    def tokenize(self, request_id, text=None, messages=None, add_generation_prompt=True):
        if messages is not None:
            text = " ".join(m["content"] for m in messages)
        return [4] * len(text.split())

    def generate(self, req):
        if self.fail:
            raise self.fail
        self.requests.append(req)
        return FakeStream(self, req)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def health(self):
        return {"ok": self.ok}

    def stats(self):
        return {}


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    return create_app(backend).test_client()


def post(client, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **kw)


def assert_error(resp, status, fragment):
    assert resp.status_code == status, resp.get_data(as_text=True)
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err["message"]
    return err


def test_app_non_stream_and_fan_out(client, backend):
    r = post(client, "/v1/completions", completion(max_tokens=3, n=2, seed=5, prompt="a b"))
    body = r.get_json()
    assert r.status_code == 200 and body["id"].startswith("cmpl-")
    assert [c["text"] for c in body["choices"]] == ["Hello world!", "Hello world!"]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert [q.params.seed for q in backend.requests] == [5, 6]
    assert all(q.params.n == 1 for q in backend.requests)
    r = post(client, "/v1/chat/completions", chat(max_tokens=2))
    assert r.get_json()["choices"][0]["message"]["content"] == "Hello world"
    assert r.get_json()["id"].startswith("chatcmpl-")


def test_app_stop_string_closes_the_choice(client, backend):
    backend.script = [1, 2, 6, 7, 7, 7]
    r = post(client, "/v1/completions", completion(max_tokens=6, stop=[" ST"]))
    choice = r.get_json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("Hello world", "stop")
    assert backend.aborted == [backend.requests[0].request_id]
    assert r.get_json()["usage"]["completion_tokens"] == 3


def test_app_stream_sse(client, backend):
    r = post(client, "/v1/chat/completions",
             chat(max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert text == "Hello world!" and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_app_stream_closed_early_aborts(backend):
    app = create_app(backend)
    r = post(app.test_client(), "/v1/completions", completion(max_tokens=50, stream=True))
    it = iter(r.response)
    next(it)
    r.close()  # what the WSGI server does when the client goes away
    assert backend.aborted == [backend.requests[0].request_id]


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "", 400, "body is empty"),
    ("/v1/completions", completion(temperature=9), 400, "temperature=9 is out of range"),
    ("/v1/completions", completion(model="nope"), 404, "does not exist"),
    ("/v1/completions", completion(prompt="x " * 64), 400, "prompt has 64 tokens; this model's context is 64"),
    ("/v1/completions", completion(prompt="x " * 60, max_tokens=5), 400,
     "prompt (60 tokens) + max_tokens (5) = 65 tokens, over this model's context of 64"),
    ("/v1/completions", completion(prompt=""), 400, "prompt is empty"),
    ("/v1/nothing", {}, 404, "route '/v1/nothing' not found"),
])
def test_app_error_statuses(client, path, body, status, fragment):
    assert_error(post(client, path, body), status, fragment)


def test_app_405_413_and_content_length(client):
    assert_error(client.get("/v1/completions"), 405, "method GET is not allowed")
    big = json.dumps(completion(prompt="x" * (4 << 20)))
    assert_error(post(client, "/v1/completions", big), 413, "larger than the 4194304-byte limit")


def test_app_overloaded_and_unexpected(client, backend):
    backend.fail = Overloaded("queue full")
    err = assert_error(post(client, "/v1/completions", completion()), 503, "queue full")
    assert err["type"] == "server_error"
    backend.fail = ValueError("prompt token id 99 is out of range [0, 8)")
    assert_error(post(client, "/v1/completions", completion()), 400, "token id 99")
    backend.fail = RuntimeError("boom")
    err = assert_error(post(client, "/v1/completions", completion()), 500, "RuntimeError: boom")
    assert "request cmpl-" in err["message"]


def test_app_api_keys(backend):
    client = create_app(backend, api_keys={"sekret"}).test_client()
    assert_error(post(client, "/v1/completions", completion()), 401, "missing API key")
    err = assert_error(post(client, "/v1/completions", completion(),
                            headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
    assert err["code"] == "invalid_api_key"
    ok = post(client, "/v1/completions", completion(max_tokens=1),
              headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # open without a key


def test_app_models_health_metrics(client, backend):
    assert client.get("/v1/models").get_json()["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").status_code == 200
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").status_code == 200
    backend.ok = False
    assert client.get("/health").status_code == 503
    post(client, "/v1/completions", completion(max_tokens=2))
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("duet_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1.0",
                 "duet_ttft_seconds_count 1.0", 'duet_ttft_stage_seconds_count{stage="tokenize"} 1.0',
                 'duet_ttft_stage_seconds_count{stage="prefill_queue"} 1.0',
                 "duet_inter_token_latency_seconds_count 1.0", "duet_tpot_seconds_count 1.0",
                 "duet_prompt_tokens_total 1.0", "duet_generation_tokens_total 2.0",
                 "duet_running_requests 0.0", "duet_finished_requests_total 1.0",
                 "duet_goodput_requests_total 1.0"):
        assert name in text, name
