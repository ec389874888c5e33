"""The model's sampling defaults (generation_config.json) under each request's own values,
and vLLM's /tokenize and /detokenize, over the app with a real tokenizer."""
from __future__ import annotations

import json

import pytest

from services.gateway.app import create_app
from services.gateway.openai_api import parse_chat, parse_completion
from shared.models.hub import _write_generation_defaults
from shared.sampling_defaults import sampling_defaults
from shared.tokenization import Tokenizer
from tests.unit.gateway.test_openai_api import MODEL, FakeBackend, assert_error, chat, completion, post


def test_defaults_come_from_generation_config_and_requests_override(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50}))
    d = sampling_defaults(tmp_path)
    assert d == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    p = parse_completion(completion(), MODEL, d).params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.6, 0.9, 50, 0.0)
    p = parse_chat(chat(temperature=0, top_k=0), MODEL, d).params
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.9, 0)
    p = parse_completion(completion(), MODEL).params           # no defaults: OpenAI's
    assert (p.temperature, p.top_p) == (1.0, 1.0)
    assert sampling_defaults(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("cfg, fragment", [
    ({"temperature": "hot"}, "temperature='hot' must be a number"),
    ({"top_k": 2.5}, "top_k=2.5 must be an integer"),
    ([1, 2], "must hold a JSON object"),
])
def test_a_bad_generation_config_is_refused_naming_the_key(tmp_path, cfg, fragment):
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=fragment):
        sampling_defaults(tmp_path)


def test_prepared_smollm2_gets_its_authors_sampling_and_keeps_user_edits(tmp_path):
    _write_generation_defaults(tmp_path, "smollm2")
    assert sampling_defaults(tmp_path) == {"temperature": 0.2, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 2}))
    _write_generation_defaults(tmp_path, "smollm2")
    cfg = json.loads((tmp_path / "generation_config.json").read_text())
    assert cfg == {"temperature": 0.7, "top_p": 0.9, "eos_token_id": 2}


def test_the_app_applies_the_defaults(tmp_path):
    backend = FakeBackend()
    client = create_app(backend, sampling_defaults={"temperature": 0.2, "top_p": 0.9}).test_client()
    assert post(client, "/v1/completions", completion(max_tokens=2)).status_code == 200
    assert post(client, "/v1/completions", completion(max_tokens=2, temperature=1.5)).status_code == 200
    assert [(r.params.temperature, r.params.top_p) for r in backend.requests] == [(0.2, 0.9), (1.5, 0.9)]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


def test_tokenize_and_detokenize(tok):
    client = create_app(FakeBackend(), tokenizer=tok).test_client()
    r = post(client, "/tokenize", {"prompt": "Hello world"})
    ids = tok.encode("Hello world")
    assert r.status_code == 200 and r.get_json() == {"count": len(ids), "max_model_len": 64,
                                                     "tokens": ids}
    msgs = [{"role": "user", "content": "Hi!"}]
    r = post(client, "/tokenize", {"model": MODEL, "messages": msgs})
    assert r.get_json()["tokens"] == tok.apply_chat_template(msgs)
    r = post(client, "/detokenize", {"tokens": r.get_json()["tokens"]})
    assert r.get_json()["prompt"] == tok.render_chat(msgs)
    assert_error(post(client, "/tokenize", {"prompt": "a", "messages": msgs}), 400,
                 "exactly one of 'prompt'")
    assert_error(post(client, "/tokenize", {"model": "other", "prompt": "a"}), 404,
                 "model 'other' does not exist")
    assert_error(post(client, "/detokenize", {"tokens": [1, 99999999]}), 400,
                 "token id 99999999 is outside the vocabulary")
    assert_error(post(client, "/detokenize", {"tokens": "12"}), 400, "tokens")
    assert_error(post(client, "/detokenize", {}), 400, "'tokens' is required")


def test_tokenize_needs_the_api_key_when_keys_are_set(tok):
    client = create_app(FakeBackend(), api_keys={"k1"}, tokenizer=tok).test_client()
    assert_error(post(client, "/tokenize", {"prompt": "a"}), 401, "missing API key")
    r = post(client, "/tokenize", {"prompt": "a"}, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 200
