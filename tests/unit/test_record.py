"""Usage records: cost."""

from __future__ import annotations

import pytest

from llmproxy.config.model import PriceConfig
from llmproxy.record import cost_usd

PLAIN = PriceConfig(input_per_million=2.0, output_per_million=6.0)
CACHE_PRICED = PriceConfig(input_per_million=2.0, output_per_million=6.0, cached_input_per_million=0.5,
                           cache_write_per_million=2.5)


def test_cost_uses_the_cached_price_only_when_configured():
    assert cost_usd(PLAIN, 1_000_000, 500_000, cache_read=400_000) == pytest.approx(2.0 + 3.0)
    assert cost_usd(CACHE_PRICED, 1_000_000, 500_000, cache_read=400_000) == pytest.approx(0.6 * 2.0 + 3.0 + 0.4 * 0.5)
    assert cost_usd(CACHE_PRICED, 100, 0, cache_read=1_000) == pytest.approx(100 * 0.5 / 1e6)  # never more than prompt


@pytest.mark.parametrize(("read", "write", "usd"), [
    (0, 0, 1.0 * 2.0 + 0.5 * 6.0),
    (200_000, 0, 0.8 * 2.0 + 0.2 * 0.5 + 3.0),
    (0, 300_000, 0.7 * 2.0 + 0.3 * 2.5 + 3.0),
    (200_000, 300_000, 0.5 * 2.0 + 0.2 * 0.5 + 0.3 * 2.5 + 3.0),
    (900_000, 300_000, 0.9 * 0.5 + 0.1 * 2.5 + 3.0),  # reads and writes never exceed the prompt
])
def test_the_cost_formula_prices_cache_reads_and_writes_apart(read: int, write: int, usd: float):
    assert cost_usd(CACHE_PRICED, 1_000_000, 500_000, cache_read=read, cache_write=write) == pytest.approx(usd)
    # Without cache prices every prompt token is at the input price, whatever the cache did.
    assert cost_usd(PLAIN, 1_000_000, 500_000, cache_read=read, cache_write=write) == pytest.approx(5.0)
