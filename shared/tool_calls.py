"""Tool calls in the Hermes format that Qwen2.5, Hermes and many chat templates use: the
model writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks after
any text. Parsing them out of a whole answer or a stream, validating a request's tools,
and the grammar that forces a call (tool_choice "required" or a named function).
"""
from __future__ import annotations

import json
import re
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def check_tools(tools) -> list[dict]:
    """OpenAI's `tools`; ValueError naming the first bad entry."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("'tools' must be a non-empty array of {type: function, function: "
                         "{name, description?, parameters?}}")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name={name!r} must be 1-64 letters, digits, "
                             f"_ . or -")
        if name in names:
            raise ValueError(f"tools[{i}].function.name={name!r} appears twice")
        names.add(name)
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def forced_call_grammar(tools: list[dict], name: str | None) -> str:
    """A Lark grammar (llguidance) for exactly one call: of `name`, or of any tool."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                         f"({', '.join(t['function']['name'] for t in tools)})")
    variants = [{"type": "object", "additionalProperties": False,
                 "required": ["name", "arguments"],
                 "properties": {"name": {"const": fn["name"]},
                                "arguments": fn.get("parameters") or {"type": "object"}}}
                for fn in chosen]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # compact JSON: no run of free whitespace for a weak model to wander into
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json{json.dumps(schema)}'


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, tool_calls in OpenAI's shape). Blocks whose
    body is not a JSON object with a name stay in the content."""
    calls, first = [], None
    for m in _BLOCK.finditer(text):
        try:
            body = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        args = body.get("arguments", body.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": body["name"],
                                   "arguments": args if isinstance(args, str)
                                   else json.dumps(args, ensure_ascii=False)}})
        first = m.start() if first is None else first
    if not calls:
        return text, []
    content = text[:first].strip()
    return (content or None), calls


class StreamFilter:
    """A choice's streamed text with tool calls held back: text before `<tool_call>` goes
    out as it comes (less any tail that may start one); from there on it is kept, and
    parsed into tool_calls when the choice ends."""

    def __init__(self):
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        at = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
        if at >= 0:
            end = at
        else:
            end = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    end = len(self.text) - k
                    break
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the text to send, tool_calls)."""
        content, calls = parse(self.text)
        if not calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        return "", calls
