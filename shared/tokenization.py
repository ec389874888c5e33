"""Tokenizer (HF `tokenizers` + the checkpoint's Jinja chat template) and incremental
detokenization that never emits a broken UTF-8 sequence."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # old-style AddedToken serialisation
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode and chat templates for an HF-style model directory."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {str(model_dir)!r}")
        self._tok = HFTokenizer.from_file(str(tok_path))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._json = tok_path.read_text()
        self._template = None


    def backend_json(self) -> str:
        """tokenizer.json's text (what llguidance builds its tokenizer from)."""
        return self._json
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders `tools` (HF templates that do read the name)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The chat template rendered to text, as HF's apply_chat_template(tokenize=False)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain completion prompt")
        if tools and not self.supports_tools:
            raise ValueError("this model's chat template has no tool support (it never reads "
                             "'tools'); send the request without tools")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        extra = {"tools": tools} if tools else {}
        return self._template.render(
            messages=[_for_template(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered template; special tokens come from the text itself."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools),
                           add_special_tokens=False)


def _for_template(m: dict) -> dict:
    """An assistant turn's tool calls with their arguments as objects, as HF templates
    expect (OpenAI sends them as JSON text)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = dict(c.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
        calls.append({**c, "function": fn, "name": fn.get("name"),
                      "arguments": fn.get("arguments")})
    return {**m, "tool_calls": calls}


def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent,
                                                                     ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens and emits only text that is final: while the
    window ends in U+FFFD (an incomplete multi-byte character) nothing is emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])[-6:]
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the newly final text (possibly empty)."""
        delta = []
        for i in new_ids:
            self.ids.append(i)
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
            full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                delta.append(full[len(prefix):])
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
        out = "".join(delta)
        self.text += out
        return out

    def flush(self) -> str:
        """At the end of a stream, emit whatever is left (even a replacement char)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        out = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += out
        return out
