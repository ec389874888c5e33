"""OpenAI request bodies in (validated into SamplingParams), OpenAI response bodies out.

parse_completion / parse_chat turn a decoded JSON body into a CompletionRequest or raise
ApiError (status, message naming the bad value, param). Everything else about OpenAI's
wire format (ids, chunks, usage, both logprobs shapes) is built here too, so app.py only
moves data.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from shared.engine.sampling_params import SamplingParams

_ROLES = ("system", "developer", "user", "assistant", "tool")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error with its HTTP status, rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """A validated /v1/completions or /v1/chat/completions body.

    Exactly one of prompt (text), prompt_ids or messages is set. params has n=1 and the
    request's base seed; choice i runs with seed + i. max_tokens None means "to the end
    of the context" (chat's default), resolved once the prompt length is known.
    """
    endpoint: str                        # "completions" | "chat"
    model: str
    params: SamplingParams
    n: int = 1
    max_tokens: int | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    tools: list[dict] | None = None      # rendered by the chat template; None: no tools
    parse_tools: bool = False            # tool calls are parsed out of the output

    def choice_params(self, index: int, max_tokens: int) -> SamplingParams:
        seed = None if self.params.seed is None else self.params.seed + index
        return dataclasses.replace(self.params, n=1, seed=seed, max_tokens=max_tokens)


# -- parsing -------------------------------------------------------------------------

def _kind(value) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _bad(name: str, want: str, value) -> ApiError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return ApiError(400, f"'{name}' must be {want}, got {_kind(value)} {shown}", param=name)


def _get(body: dict, name: str, want: str, default=None):
    """body[name] type-checked ('int' | 'number' | 'bool' | 'str' | 'object' | 'array');
    absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "object": isinstance(value, dict), "array": isinstance(value, list)}[want]
    if not ok:
        raise _bad(name, {"int": "an integer", "number": "a number", "bool": "a boolean",
                          "str": "a string", "object": "an object",
                          "array": "an array"}[want], value)
    return value


def _model(body: dict, served: str) -> str:
    model = _get(body, "model", "str")
    if model is None:
        raise ApiError(400, "'model' is required", param="model")
    if model != served:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    return model


def _token_ids(name: str, value: list) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise _bad(name, "a list of non-negative token ids", value)
    return value


def _prompt(body: dict) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, _token_ids("prompt", prompt)
        if all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:
                raise ApiError(400, f"only one prompt per request is supported; got {len(prompt)}",
                               param="prompt")
            return _prompt({"prompt": prompt[0]})
    raise _bad("prompt", "a string, a non-empty list of token ids, or a list of one of those",
               prompt)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise ApiError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': "
                           f"<string>}}; got type {kind!r} (only text parts are supported)",
                           param=f"messages[{i}].content")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    messages = _get(body, "messages", "array")
    if not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty array",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with 'role' and 'content'", m)
        if m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}].role={m.get('role')!r} must be one of "
                           f"{', '.join(_ROLES)}", param=f"messages[{i}].role")
        turn = {"role": m["role"], "content": _content(m, i)}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise _bad(f"messages[{i}].tool_calls",
                           "an array of {id, type: function, function: {name, arguments}}", calls)
            turn["tool_calls"] = calls
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ApiError(400, f"messages[{i}] (role tool) needs its 'tool_call_id'",
                               param=f"messages[{i}].tool_call_id")
            turn["tool_call_id"] = m["tool_call_id"]
        out.append(turn)
    return out


def _unsupported(body: dict, endpoint: str) -> None:
    """Reject features Duet does not implement rather than silently ignore them."""
    if endpoint == "completions":
        if _get(body, "echo", "bool", False):
            raise ApiError(400, "echo=true is not supported", param="echo")
        if _get(body, "suffix", "str") is not None:
            raise ApiError(400, "'suffix' is not supported", param="suffix")
        best_of = _get(body, "best_of", "int")
        if best_of is not None and best_of != _get(body, "n", "int", 1):
            raise ApiError(400, f"best_of={best_of} is not supported (it must equal n)",
                           param="best_of")
    if _get(body, "logit_bias", "object"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")


GUIDED_EXTRAS = {"guided_json": "json_schema", "guided_regex": "regex",
                 "guided_choice": "choice", "guided_grammar": "lark"}   # vLLM's extras


def _guided(body: dict) -> tuple[str | None, str | None]:
    """(kind, spec) of the structured output a request asks for, compiled once here so a
    bad one is a 400 naming the problem (the worker compiles it again for its tokenizer)."""
    from shared.engine.guided import grammar_for
    asked = []
    fmt = _get(body, "response_format", "object")
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append(("response_format", "json_object", None))
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise ApiError(400, "response_format json_schema needs "
                               "{'json_schema': {'name': ..., 'schema': {...}}}",
                               param="response_format")
            asked.append(("response_format", "json_schema", json.dumps(js["schema"])))
        elif kind != "text":
            raise ApiError(400, f"response_format type {kind!r} is not supported; use text, "
                           f"json_object or json_schema", param="response_format")
    for name, kind in GUIDED_EXTRAS.items():
        value = body.get(name)
        if value is None:
            continue
        if kind == "json_schema":
            spec = value if isinstance(value, str) else json.dumps(value)
        elif kind == "choice":
            spec = json.dumps(value)
        elif not isinstance(value, str):
            raise _bad(name, "a string", value)
        else:
            spec = value
        asked.append((name, kind, spec))
    if not asked:
        return None, None
    if len(asked) > 1:
        raise ApiError(400, f"at most one structured output per request; got "
                       f"{', '.join(a[0] for a in asked)}", param=asked[1][0])
    param, kind, spec = asked[0]
    try:
        grammar_for(kind, spec)
    except ValueError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
    return kind, spec


def _tools(body: dict, endpoint: str) -> tuple[list | None, object, tuple | None]:
    """(tools to render, tool_choice, a forced-call guide or None)."""
    from shared import tool_calls
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None, None, None
    if endpoint != "chat":
        raise ApiError(400, "'tools' is a chat completions parameter", param="tools")
    try:
        tool_calls.check_tools(tools)
    except ValueError as e:
        raise ApiError(400, str(e), param="tools") from None
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None, choice, None
    if choice == "auto":
        return tools, choice, None
    if choice == "required":
        name = None
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
    else:
        raise _bad("tool_choice", "'none', 'auto', 'required' or "
                   "{'type': 'function', 'function': {'name': ...}}", choice)
    try:
        return tools, choice, ("lark", tool_calls.forced_call_grammar(tools, name))
    except ValueError as e:
        raise ApiError(400, str(e), param="tool_choice") from None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "a string or an array of strings", body.get("stop"))
    return stop


def _logprobs(body: dict, endpoint: str) -> int | None:
    if endpoint == "completions":
        return _get(body, "logprobs", "int")
    top = _get(body, "top_logprobs", "int")
    if not _get(body, "logprobs", "bool", False):
        if top is not None:
            raise ApiError(400, "'top_logprobs' requires logprobs=true", param="top_logprobs")
        return None
    return top or 0


def _sampling(body: dict, endpoint: str,
              defaults: dict | None = None) -> tuple[SamplingParams, int | None]:
    max_tokens = _get(body, "max_tokens", "int")
    if endpoint == "chat":
        max_tokens = _get(body, "max_completion_tokens", "int", max_tokens)
    elif max_tokens is None:
        max_tokens = 16  # OpenAI's completions default; chat runs to the context end
    kw = dict(max_tokens=16 if max_tokens is None else max_tokens,
              stop=_stop(body), logprobs=_logprobs(body, endpoint),
              ignore_eos=_get(body, "ignore_eos", "bool", False),
              skip_special_tokens=_get(body, "skip_special_tokens", "bool", True),
              stop_token_ids=_token_ids("stop_token_ids",
                                        _get(body, "stop_token_ids", "array", [])))
    kw["guided_kind"], kw["guided_spec"] = _guided(body)
    for name, want, default in (("temperature", "number", 1.0), ("top_p", "number", 1.0),
                                ("top_k", "int", 0), ("min_p", "number", 0.0),
                                ("presence_penalty", "number", 0.0),
                                ("frequency_penalty", "number", 0.0),
                                ("repetition_penalty", "number", 1.0),
                                ("seed", "int", None), ("n", "int", 1)):
        kw[name] = _get(body, name, want, (defaults or {}).get(name, default))
    try:
        params = SamplingParams(**kw)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        raise ApiError(400, str(e), param=name if name in kw else None) from None
    return params, max_tokens


def _parse(body: Any, served_model: str, endpoint: str,
           defaults: dict | None = None) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_kind(body)}")
    model = _model(body, served_model)
    if endpoint == "completions":
        prompt, prompt_ids, messages = *_prompt(body), None
    else:
        prompt, prompt_ids, messages = None, None, _messages(body)
    _unsupported(body, endpoint)
    params, max_tokens = _sampling(body, endpoint, defaults)
    tools, _choice, forced = _tools(body, endpoint)
    if forced is not None:
        if params.guided_kind is not None:
            raise ApiError(400, "tool_choice 'required' or a named function cannot be combined "
                           "with a structured output (response_format / guided_*)",
                           param="tool_choice")
        params = dataclasses.replace(params, guided_kind=forced[0], guided_spec=forced[1])
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "object")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when stream=true",
                       param="stream_options")
    include_usage = _get(options or {}, "include_usage", "bool", False)
    n = params.n
    params = dataclasses.replace(params, n=1)
    return CompletionRequest(endpoint, model, params, n, max_tokens, prompt, prompt_ids,
                             messages, stream, include_usage, _get(body, "user", "str"),
                             tools, tools is not None)


def parse_completion(body: Any, served_model: str,
                     defaults: dict | None = None) -> CompletionRequest:
    """Validate a /v1/completions body; ApiError on anything wrong. `defaults`: the
    model's sampling defaults (shared.sampling_defaults), which the body overrides."""
    return _parse(body, served_model, "completions", defaults)


def parse_chat(body: Any, served_model: str, defaults: dict | None = None) -> CompletionRequest:
    """Validate a /v1/chat/completions body; ApiError on anything wrong."""
    return _parse(body, served_model, "chat", defaults)


# -- responses ------------------------------------------------------------------------

@dataclass
class ChoiceResult:
    """What one finished choice produced (token_ids/logprobs for logprobs output)."""
    index: int
    text: str
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None          # list[TokenLogprobs] or None


def new_response_id(endpoint: str) -> str:
    return ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _object(endpoint: str, stream: bool) -> str:
    if endpoint == "completions":
        return "text_completion"
    return "chat.completion.chunk" if stream else "chat.completion"


def _envelope(endpoint: str, rid: str, created: int, model: str, stream: bool) -> dict:
    return {"id": rid, "object": _object(endpoint, stream), "created": created, "model": model}


def completion_logprobs(token_text: Callable[[int], str], token_ids: list[int], logprobs: list,
                        offset: int = 0) -> dict:
    """Completions-API logprobs; text_offset counts from `offset` in the choice's text."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(i): v for i, v in zip(lp.top_ids, lp.top_logprobs)}
                             for lp in logprobs],
            "text_offset": offsets}


def chat_logprobs(token_text: Callable[[int], str], token_ids: list[int], logprobs: list) -> dict:
    """Chat-API logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(tid: int, value: float) -> dict:
        text = token_text(tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}
    return {"content": [dict(entry(t, lp.logprob),
                             top_logprobs=[entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)])
                        for t, lp in zip(token_ids, logprobs)]}


def response_body(req: CompletionRequest, rid: str, created: int, choices: list[ChoiceResult],
                  prompt_tokens: int, token_text: Callable[[int], str]) -> dict:
    """The non-streaming response for either endpoint."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        item = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": None}
        if req.endpoint == "completions":
            item["text"] = c.text
            if c.logprobs is not None:
                item["logprobs"] = completion_logprobs(token_text, c.token_ids, c.logprobs)
        else:
            item["message"] = {"role": "assistant", "content": c.text}
            if req.parse_tools:
                from shared import tool_calls
                content, calls = tool_calls.parse(c.text)
                if calls:
                    item["message"] = {"role": "assistant", "content": content,
                                       "tool_calls": calls}
                    item["finish_reason"] = "tool_calls"
            if c.logprobs is not None:
                item["logprobs"] = chat_logprobs(token_text, c.token_ids, c.logprobs)
        out.append(item)
    body = _envelope(req.endpoint, rid, created, req.model, False)
    body["choices"] = out
    body["usage"] = usage(prompt_tokens, sum(len(c.token_ids) for c in choices))
    return body


def stream_chunk(req: CompletionRequest, rid: str, created: int, index: int,
                 text: str | None, finish_reason: str | None = None,
                 logprobs: dict | None = None, role: bool = False,
                 tool_calls: list[dict] | None = None) -> dict:
    """One SSE chunk for one choice: completions text, or a chat delta (role=True gives
    the opening {"role": "assistant", "content": ""} delta)."""
    body = _envelope(req.endpoint, rid, created, req.model, True)
    choice: dict = {"index": index}
    if req.endpoint == "completions":
        choice["text"] = text or ""
    elif role:
        choice["delta"] = {"role": "assistant", "content": ""}
    else:
        choice["delta"] = {"content": text} if text else {}
        if tool_calls:   # each call whole, in one delta (name and all its arguments)
            choice["delta"]["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    body["choices"] = [choice]
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: CompletionRequest, rid: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last chunk when stream_options.include_usage: no choices, just usage."""
    body = _envelope(req.endpoint, rid, created, req.model, True)
    body["choices"] = []
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


def now() -> int:
    return int(time.time())


def parse_tokenize(body: Any, served_model: str) -> dict:
    """A /tokenize body (vLLM's): {"prompt": str, "add_special_tokens"} or {"messages":
    [...], "add_generation_prompt"}; model optional. What to encode; ApiError if wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_kind(body)}")
    if body.get("model") is not None:
        _model(body, served_model)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give exactly one of 'prompt' (text) and 'messages' (a chat)",
                       param="prompt")
    if "prompt" in body:
        return {"prompt": _get(body, "prompt", "str"),
                "add_special_tokens": _get(body, "add_special_tokens", "bool", True)}
    return {"messages": _messages(body),
            "add_generation_prompt": _get(body, "add_generation_prompt", "bool", True)}


def parse_detokenize(body: Any, served_model: str) -> list[int]:
    """A /detokenize body: {"tokens": [ids]}; model optional."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_kind(body)}")
    if body.get("model") is not None:
        _model(body, served_model)
    tokens = _get(body, "tokens", "array")
    if tokens is None:
        raise ApiError(400, "'tokens' is required", param="tokens")
    return _token_ids("tokens", tokens)
