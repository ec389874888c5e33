"""The OpenAI-compatible HTTP API (Flask app; served by waitress, see server.py).

    GET  /v1/models            the one served model
    POST /v1/completions       text or token-id prompt; stream (SSE) or not
    POST /v1/chat/completions  messages through the chat template; stream or not
    GET  /health               200 when backend.health()["ok"], else 503
    GET  /metrics              Prometheus exposition (duet_* metrics)

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with its status:
400 bad JSON / types / ranges / prompt over the context, 401 bad key, 404 unknown model
or route, 405, 413 body over max_body_bytes, 503 overloaded, 500 anything unexpected
(logged with the request id). A prompt whose max_tokens would run past the context is
rejected with 400 (not clipped), as OpenAI and vLLM do; without max_tokens, chat runs to
the end of the context.
"""
from __future__ import annotations

import hmac
import json
import logging
import time

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from services.gateway.backend import Backend, Overloaded
from services.gateway.generation import ClientGone, GenerationFailed, GenerationRun
from services.gateway.http_metrics import GatewayMetrics
from services.gateway.limits import KeyLimiter
from services.gateway.openai_api import (ApiError, CompletionRequest, completion_logprobs,
                                         chat_logprobs, new_response_id, now, parse_chat,
                                         parse_completion, parse_detokenize, parse_tokenize,
                                         response_body, stream_chunk,
                                         usage_chunk)

log = logging.getLogger("duet.gateway")

MAX_BODY_BYTES = 4 << 20


def create_app(backend: Backend, api_keys: set[str] | None = None, *, tokenizer=None,
               ttft_target_s: float = 2.0, tpot_target_s: float = 0.2,
               max_body_bytes: int = MAX_BODY_BYTES, max_concurrency_per_key: int = 0,
               sampling_defaults: dict | None = None) -> Flask:
    """The gateway app over `backend`. `tokenizer` (a shared.tokenization.Tokenizer for
    detokenization) defaults to backend.tokenizer. With api_keys, every /v1/ route
    needs `Authorization: Bearer <key>`; /health and /metrics stay open. Each key is a
    tenant ("key-0", "key-1", ... in sorted key order; "anonymous" without keys): the
    broker queues fairly between tenants, and with max_concurrency_per_key a tenant
    holding that many requests gets 429 with Retry-After for the next. sampling_defaults:
    the model's (generation_config.json), which each request's own values override."""
    tokenizer = tokenizer or getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("create_app needs a tokenizer to detokenize: pass tokenizer= or "
                         "give the backend a .tokenizer")
    app = Flask("duet.gateway")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    metrics = GatewayMetrics(ttft_target_s, tpot_target_s)
    metrics.watch_backend(backend)
    app.extensions["duet"] = {"backend": backend, "metrics": metrics}
    created = int(time.time())
    tenants = {k.encode(): f"key-{i}" for i, k in enumerate(sorted(api_keys or ()))}
    limiter = KeyLimiter(max_concurrency_per_key if tenants else 0)   # keys only

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    @app.before_request
    def start_request():
        g.arrival, g.t0, g.request_id = time.time(), time.monotonic(), None
        g.tenant = "anonymous"
        if tenants and request.path.startswith(("/v1/", "/tokenize", "/detokenize")):
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip().encode() if auth.startswith("Bearer ") else b""
            match = [t for k, t in tenants.items() if hmac.compare_digest(given, k)]
            if not match:
                problem = "invalid API key" if given else "missing API key"
                raise ApiError(401, f"{problem}: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            g.tenant = match[0]

    @app.after_request
    def count_request(resp):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint=rule, status=str(resp.status_code)).inc()
        return resp

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return jsonify(e.body()), e.status, e.headers

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        message = {404: f"route {request.path!r} not found",
                   405: f"method {request.method} is not allowed on {request.path!r}",
                   413: f"request body is larger than the {max_body_bytes}-byte limit",
                   }.get(e.code, e.description)
        return api_error(ApiError(e.code or 500, message))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("request %s failed", g.get("request_id"))
        return api_error(ApiError(500, f"internal error ({type(e).__name__}: {e}); request "
                                  f"{g.get('request_id')}", code="internal_error"))

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model>")
    def model(model):
        if model != backend.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{backend.model_name!r}", param="model", code="model_not_found")
        return jsonify(model_card())

    def model_card() -> dict:
        return {"id": backend.model_name, "object": "model", "created": created,
                "owned_by": "duet", "max_model_len": backend.max_model_len}

    @app.get("/health")
    def health():
        try:
            status = backend.health()
        except Exception as e:
            log.exception("backend health check failed")
            status = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return jsonify(status), 200 if status.get("ok") else 503

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    def tokenize():
        what = parse_tokenize(json_body(), backend.model_name)
        if "prompt" in what:
            ids = tokenizer.encode(what["prompt"], add_special_tokens=what["add_special_tokens"])
        else:
            try:
                ids = tokenizer.apply_chat_template(what["messages"], what["add_generation_prompt"])
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
        return jsonify({"count": len(ids), "max_model_len": backend.max_model_len,
                        "tokens": ids})

    @app.post("/detokenize")
    def detokenize():
        ids = parse_detokenize(json_body(), backend.model_name)
        vocab = getattr(tokenizer, "vocab_size", None)
        bad = [t for t in ids if vocab is not None and t >= vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})",
                           param="tokens")
        return jsonify({"prompt": tokenizer.decode(ids, skip_special_tokens=False)})

    @app.post("/v1/completions")
    def completions():
        return generate(parse_completion(json_body(), backend.model_name, sampling_defaults))

    @app.post("/v1/chat/completions")
    def chat_completions():
        return generate(parse_chat(json_body(), backend.model_name, sampling_defaults))

    def generate(req: CompletionRequest):
        rid = g.request_id = new_response_id(req.endpoint)
        slot = limiter.acquire(g.tenant)
        if slot is None:
            raise ApiError(429, f"API key {g.tenant} already has {limiter.max_concurrent} "
                           f"requests running, its limit; retry when one finishes",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        try:
            return start_generation(req, rid, slot)
        except BaseException:
            slot.release()
            raise

    def start_generation(req: CompletionRequest, rid: str, slot):
        t_tok = time.monotonic()
        prompt_ids = req.prompt_ids
        if prompt_ids is None:
            prompt_ids = backend_call(lambda: backend.tokenize(
                rid, text=req.prompt, messages=req.messages, **({"tools": req.tools}
                                                               if req.tools else {})),
                "messages" if req.messages is not None else "prompt")
        timings = {"gateway_queue": t_tok - g.t0, "tokenize": time.monotonic() - t_tok}
        max_tokens = resolve_max_tokens(req, len(prompt_ids))
        run = GenerationRun(backend, tokenizer, metrics, req, rid, prompt_ids, max_tokens,
                            g.arrival, g.t0, timings, slot.tenant, on_close=slot.release)
        backend_call(run.start, None)
        created_at = now()
        if req.stream:
            resp = Response(sse(run, rid, created_at), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            resp.call_on_close(run.close)
            return resp
        # waitress reports a vanished client (it keeps reading the socket while the app
        # runs: channel_request_lookahead in server.py); other servers: never
        gone = request.environ.get("waitress.client_disconnected")
        try:
            choices = backend_call(lambda: run.collect(gone), None)
        except ClientGone as e:
            log.info("%s: stopped generating", e)
            return Response(status=499)   # nginx's "client closed request": metrics only
        finally:
            run.close()
        return jsonify(response_body(req, rid, created_at, choices, len(prompt_ids),
                                     token_text))

    def resolve_max_tokens(req: CompletionRequest, prompt_len: int) -> int:
        limit = backend.max_model_len
        param = "messages" if req.messages is not None else "prompt"
        if prompt_len == 0:
            raise ApiError(400, "prompt is empty: at least one token is required", param=param)
        if prompt_len >= limit:
            raise ApiError(400, f"prompt has {prompt_len} tokens; this model's context is "
                           f"{limit} tokens (the prompt must be shorter)", param=param,
                           code="context_length_exceeded")
        if req.max_tokens is None:
            return limit - prompt_len
        if prompt_len + req.max_tokens > limit:
            raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) "
                           f"= {prompt_len + req.max_tokens} tokens, over this model's context "
                           f"of {limit} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return req.max_tokens

    def sse(run: GenerationRun, rid: str, created_at: int):
        try:
            for chunk in stream_chunks(run, rid, created_at):
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            run.close()

    def stream_chunks(run: GenerationRun, rid: str, created_at: int):
        req = run.req
        if req.endpoint == "chat":
            for c in run.choices:
                yield stream_chunk(req, rid, created_at, c.index, None, role=True)
        filters = {}
        if req.parse_tools:   # tool calls held back from the text, sent whole at the end
            from shared.tool_calls import StreamFilter
            filters = {c.index: StreamFilter() for c in run.choices}
        try:
            for c, delta, event in run.deltas():
                calls, finish = None, c.finish_reason
                if filters:
                    f = filters[c.index]
                    delta = f.feed(delta)
                    if c.done:
                        rest, calls = f.finish()
                        delta += rest
                        finish = "tool_calls" if calls else finish
                lps = None
                if c.logprobs is not None and event.logprobs:
                    ids = event.token_ids[:len(event.logprobs)]
                    lps = (completion_logprobs(token_text, ids, event.logprobs,
                                               len(c.stream.text) - len(delta))
                           if req.endpoint == "completions"
                           else chat_logprobs(token_text, ids, event.logprobs))
                if delta or lps or c.done:
                    yield stream_chunk(req, rid, created_at, c.index, delta,
                                       finish if c.done else None, lps, tool_calls=calls)
        except (GenerationFailed, Overloaded) as e:
            log.warning("request %s failed mid-stream: %s", rid, e)
            yield ApiError(500 if isinstance(e, GenerationFailed) else 503, str(e)).body()
            return
        except Exception as e:
            log.exception("request %s failed mid-stream", rid)
            yield ApiError(500, f"internal error ({type(e).__name__}: {e}); request {rid}",
                           code="internal_error").body()
            return
        if req.include_usage:
            yield usage_chunk(req, rid, created_at, len(run.prompt_ids), run.completion_tokens)

    return app


MAX_NESTING = 32   # an OpenAI body nests a few levels (messages, content parts, schemas)


def json_body():
    """The request body as JSON; 413 when over the limit, 400 when not JSON or nested
    deeper than MAX_NESTING."""
    data = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if not data.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    too_deep = ApiError(400, f"request body is nested more than {MAX_NESTING} levels deep")
    try:
        body = json.loads(data)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if _depth(body) > MAX_NESTING:
        raise too_deep
    return body


def _depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_NESTING:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def backend_call(fn, param: str | None):
    """Run a backend call, mapping its errors: ValueError 400, Overloaded 503,
    GenerationFailed 500."""
    try:
        return fn()
    except Overloaded as e:
        raise ApiError(503, f"server overloaded: {e}; retry later", type="server_error",
                       code="overloaded",
                       headers={"Retry-After": str(getattr(e, "retry_after_s", 2))}) from None
    except GenerationFailed as e:
        raise ApiError(500, f"generation failed: {e}", code="generation_failed") from None
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None
