"""The `caching:` section: its defaults, the guide's example, what it refuses (naming the key), and its dump."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, dump_config, parse_config
from llmproxy.config.model import CacheStrategyConfig, CachingConfig, RouteMatchConfig
from tests.support import GUIDE_CACHING


def doc(**sections: Any) -> dict[str, Any]:
    return {"backends": [{"url": "http://vllm:8000"}], **sections}


def test_caching_is_off_by_default_and_the_guides_example_loads() -> None:
    assert parse_config(doc()).caching == CachingConfig()
    config = parse_config(doc(caching=GUIDE_CACHING)).caching
    assert config.enabled and config.default_ttl_seconds == 3600 and config.max_size_mb == 500
    assert config.strategies == [CacheStrategyConfig(
        "common_questions_cache", RouteMatchConfig(path="/v1/chat/completions", json_body={"temperature": 0.0}),
        86400.0)]
    assert (config.per_key, config.bill_hits, config.dedup, config.ignore_fields) == (True, False, True, ["user"])


def test_the_redis_store_defaults_to_the_rate_limiters_redis() -> None:
    config = parse_config(doc(caching={"store": "redis"},
                              rate_limit={"store": "redis", "redis_url": "redis://10.0.0.5:6379/0"})).caching
    assert config.redis_url == "redis://10.0.0.5:6379/0"


@pytest.mark.parametrize(("fields", "path", "reason"), [
    ({"enabled": "yes"}, "caching.enabled", "true or false"),
    ({"default_ttl_seconds": 0}, "caching.default_ttl_seconds", "above 0"),
    ({"max_size_mb": -1}, "caching.max_size_mb", "above 0"),
    ({"max_size_mb": 1, "max_entry_kb": 2048}, "caching.max_entry_kb", "must not exceed max_size_mb"),
    ({"store": "memcached"}, "caching.store", "memory, redis"),
    ({"store": "redis"}, "caching.redis_url", "is required with store: redis"),
    ({"store": "redis", "redis_url": "http://x"}, "caching.redis_url", "redis"),
    ({"cluster": True}, "caching.cluster", "store: redis only"),
    ({"ignore_fields": ["model"]}, "caching.ignore_fields[0]", "always part of the cache key"),
    ({"strategies": [{"match": {}}]}, "caching.strategies[0].id", "is required"),
    ({"strategies": [{"id": "a"}]}, "caching.strategies[0].match", "is required"),
    ({"strategies": [{"id": "a", "match": {"path": "v1"}}]}, "caching.strategies[0].match.path", 'starting with "/"'),
    ({"strategies": [{"id": "a", "match": {}, "ttl_seconds": -5}]}, "caching.strategies[0].ttl_seconds", "above 0"),
    ({"strategies": [{"id": "a", "match": {}}, {"id": "a", "match": {}}]}, "caching.strategies[1].id", "duplicate"),
    ({"ttl": 5}, "caching.ttl", "unknown"),
])
def test_bad_caching_settings_are_refused_naming_the_key(fields: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc(caching=fields))
    assert caught.value.path == path and reason in caught.value.reason, str(caught.value)


def test_the_dump_loads_back_the_same() -> None:
    config = parse_config(doc(caching=GUIDE_CACHING))
    assert parse_config(yaml.safe_load(dump_config(config))).caching == config.caching
