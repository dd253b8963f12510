"""Estimates of a request's prompt tokens, when the backend reports none."""

from __future__ import annotations

import orjson
import pytest

from llmproxy.metering.estimate import (
    PER_MESSAGE,
    REPLY_OPENING,
    TOOLS_PREAMBLE,
    estimate_prompt_tokens,
    text_tokens,
)

CHAT = REPLY_OPENING + PER_MESSAGE  # what a one-message chat adds to its text


@pytest.mark.parametrize(("body", "tokens"), [
    ({"messages": [{"role": "user", "content": "abcdefgh"}]}, CHAT + 2),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]}, CHAT + 1),
    ({"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "defgh"}]},
     REPLY_OPENING + 2 * PER_MESSAGE + 1 + 2),  # each message its own text
    ({"prompt": "abcde"}, 2),
    ({"prompt": ["abcd", "efgh"]}, 2),
    ({"inputs": "abcdefghi"}, 3),  # TGI
    ({"model": "m", "prompt": "abcd", "system": "efgh"}, 2),  # Ollama /api/generate
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}], "instructions": "efgh"},
     2),  # Responses API
    ({"system": [{"type": "text", "text": "abcd"}], "messages": [{"role": "user", "content": "efgh"}]},
     CHAT + 2),  # Anthropic Messages: system blocks beside the messages
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}]}]},
     CHAT + 2),  # the tool call's name and arguments are written out by the template
    ({}, 0),
    (None, 0),
    ("not a dict", 0),
])
def test_prompt_tokens_are_estimated_as_a_template_renders_them(body, tokens):
    assert estimate_prompt_tokens(body) == tokens


def test_tool_definitions_count_as_their_json():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    with_tools = {**plain, "tools": tools}
    added = estimate_prompt_tokens(with_tools) - estimate_prompt_tokens(plain)
    assert added == TOOLS_PREAMBLE + -(-len(orjson.dumps(tools)) // 4)


@pytest.mark.parametrize(("text", "tokens"), [("a" * 40, 10), ("é" * 20, 10), ("你好世界", 3), ("", 0)])
def test_text_is_counted_in_utf8_bytes(text: str, tokens: int):
    assert text_tokens(text) == tokens


def test_a_body_nested_a_million_levels_deep_is_no_problem():
    deep: object = "abcd"
    for _ in range(1_000_000):
        deep = [deep]
    assert estimate_prompt_tokens({"prompt": deep}) == 1
