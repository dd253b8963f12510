"""Usage records: cost."""

from __future__ import annotations

import pytest

from llmproxy.config.model import PriceConfig
from llmproxy.record import cost_usd


def test_cost_uses_the_cached_price_only_when_configured():
    plain = PriceConfig(input_per_million=2.0, output_per_million=6.0)
    assert cost_usd(plain, 1_000_000, 500_000, cached=400_000) == pytest.approx(2.0 + 3.0)
    cached = PriceConfig(input_per_million=2.0, output_per_million=6.0, cached_input_per_million=0.5)
    assert cost_usd(cached, 1_000_000, 500_000, cached=400_000) == pytest.approx(0.6 * 2.0 + 3.0 + 0.4 * 0.5)
    assert cost_usd(cached, 100, 0, cached=1_000) == pytest.approx(100 * 0.5 / 1e6)  # never more than prompt
