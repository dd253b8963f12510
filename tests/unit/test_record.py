"""Usage records: estimates and cost."""

from __future__ import annotations

import pytest

from llmproxy.config.model import PriceConfig
from llmproxy.record import cost_usd, estimate_prompt_tokens


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


def test_cost_uses_the_cached_price_only_when_configured():
    plain = PriceConfig(input_per_million=2.0, output_per_million=6.0)
    assert cost_usd(plain, 1_000_000, 500_000, cached=400_000) == pytest.approx(2.0 + 3.0)
    cached = PriceConfig(input_per_million=2.0, output_per_million=6.0, cached_input_per_million=0.5)
    assert cost_usd(cached, 1_000_000, 500_000, cached=400_000) == pytest.approx(0.6 * 2.0 + 3.0 + 0.4 * 0.5)
    assert cost_usd(cached, 100, 0, cached=1_000) == pytest.approx(100 * 0.5 / 1e6)  # never more than prompt
