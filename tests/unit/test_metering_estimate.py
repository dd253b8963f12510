"""Estimates of a request's prompt tokens, when the backend reports none."""

from __future__ import annotations

import pytest

from llmproxy.metering.estimate import estimate_prompt_tokens


@pytest.mark.parametrize(("body", "tokens"), [
    ({"messages": [{"role": "user", "content": "abcdefgh"}]}, 2),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]}, 1),
    ({"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "defgh"}]}, 2),
    ({"prompt": "abcde"}, 2),
    ({"prompt": ["abcd", "efgh"]}, 2),
    ({"inputs": "abcdefghi"}, 3),  # TGI
    ({"model": "m", "prompt": "abcd", "system": "efgh"}, 2),  # Ollama /api/generate
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]}, 1),  # Responses API
    ({}, 0),
    (None, 0),
    ("not a dict", 0),
])
def test_prompt_tokens_are_estimated_at_four_characters_each(body, tokens):
    assert estimate_prompt_tokens(body) == tokens
