"""A model's default sampling parameters, from its directory's generation_config.json.

As vLLM (`--generation-config auto`) and transformers do: temperature, top_p, top_k, min_p
and repetition_penalty set there become the defaults of every request, and a request's own
values override them. (Like vLLM, `do_sample` is not consulted: a temperature the model's
authors recommend applies.) A value that is not a number is refused at start, naming the
file and the key.
"""
from __future__ import annotations

import json
from pathlib import Path

KEYS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
        "repetition_penalty": float}


def sampling_defaults(model_dir: str | Path) -> dict:
    """{parameter: value} from model_dir/generation_config.json ({} without the file)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    out = {}
    for key, kind in KEYS.items():
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and value != int(value)):
            raise ValueError(f"{path}: {key}={value!r} must be {'an integer' if kind is int else 'a number'}")
        out[key] = kind(value)
    return out


def describe(defaults: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in defaults.items()) or "none (OpenAI's)"
