"""Hermes-format tool calls: parsed out of whole answers and streams; forced-call grammars."""
from __future__ import annotations

import json

import pytest

from shared import tool_calls
from shared.engine.guided import grammar_for

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_whole_answers():
    assert tool_calls.parse("no calls here") == ("no calls here", [])
    content, calls = tool_calls.parse("Let me check." + CALL + CALL.replace("Paris", "Rome"))
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c["id"] for c in calls}) == 2
    assert tool_calls.parse(CALL)[0] is None
    broken = "<tool_call>{not json}</tool_call>"
    assert tool_calls.parse(broken) == (broken, [])


@pytest.mark.parametrize("cut", [1, 3, 7, 11, 20])
def test_stream_holds_back_from_the_call(cut):
    text = "Sure." + CALL
    f = tool_calls.StreamFilter()
    sent = "".join(f.feed(text[i:i + cut]) for i in range(0, len(text), cut))
    rest, calls = f.finish()
    assert sent + rest == "Sure." and calls[0]["function"]["name"] == "get_weather"


def test_stream_without_a_call_sends_everything():
    f = tool_calls.StreamFilter()
    sent = f.feed("a <tool") + f.feed("kit> b")
    rest, calls = f.finish()
    assert sent + rest == "a <toolkit> b" and calls == []


def test_forced_grammar_and_bad_tools():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert grammar_for("lark", tool_calls.forced_call_grammar(tools, "f"))
    assert grammar_for("lark", tool_calls.forced_call_grammar(tools, None))
    with pytest.raises(ValueError, match="names function 'g', which is not in tools"):
        tool_calls.forced_call_grammar(tools, "g")
    with pytest.raises(ValueError, match="appears twice"):
        tool_calls.check_tools(tools + tools)
    with pytest.raises(ValueError, match=r"tools\[0\] must be"):
        tool_calls.check_tools([{"type": "retrieval"}])
