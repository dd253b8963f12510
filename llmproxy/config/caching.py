"""The `caching:` section: the response cache and de-duplication of identical requests (llmproxy/cache/).

A strategy's `match` is a route's (config/routes.py parses both); a request no strategy matches is neither
cached nor de-duplicated. With `store: redis` and no `redis_url`, the rate limiter's `redis_url` is used (one
Redis for the state replicas share); check_caching fills it in once every section is read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmproxy.config.model import CACHE_STORES, CacheStrategyConfig, CachingConfig, Config
from llmproxy.config.routes import _match
from llmproxy.config.values import (
    ConfigError,
    _bool,
    _choice,
    _clean_string,
    _int_at_least,
    _join,
    _list_of,
    _optional,
    _parse_fields,
    _Parser,
    _show,
    check_redis_store,
)


def _above_zero(what: str) -> Callable[[Any, str], float]:
    """A parser of a plain number above 0 (no unit suffix), `what` naming it in the error."""
    def parse(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(path, f"must be {what} above 0, got {_show(value)}")
        return float(value)
    return parse


_seconds = _above_zero("a number of seconds")
_megabytes = _above_zero("a size in megabytes")


def _field_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"must be the name of a top-level body field, got {_show(value)}")
    if value == "model":
        raise ConfigError(path, "the model is always part of the cache key (as resolved from its alias)")
    return value


def _strategy(value: Any, path: str) -> CacheStrategyConfig:
    fields: dict[str, _Parser] = {"id": _clean_string("strategy id"), "match": _match, "ttl_seconds": _seconds}
    values = _parse_fields(value, path, fields)
    for required in ("id", "match"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required")
    return CacheStrategyConfig(**values)


_FIELDS: dict[str, _Parser] = {
    "enabled": _bool,
    "default_ttl_seconds": _seconds,
    "max_size_mb": _megabytes,
    "max_entry_kb": _int_at_least(1),
    "store": _choice(CACHE_STORES),
    "redis_url": _optional(_clean_string("redis:// URL")),
    "cluster": _bool,
    "per_key": _bool,
    "ignore_fields": _list_of(_field_name, "body field names"),
    "bill_hits": _bool,
    "dedup": _bool,
    "dedup_max_lag_kb": _int_at_least(1),
    "strategies": _list_of(_strategy, "strategies ({id, match, ttl_seconds})"),
}


def parse_caching(value: Any, path: str) -> CachingConfig:
    config = CachingConfig(**_parse_fields(value, path, _FIELDS))
    seen: dict[str, int] = {}
    for i, strategy in enumerate(config.strategies):
        if strategy.id in seen:
            raise ConfigError(f"{path}.strategies[{i}].id", f"duplicate strategy id {_show(strategy.id)} "
                                                            f"(already used by strategies[{seen[strategy.id]}])")
        seen[strategy.id] = i
    if config.max_entry_kb * 1024 > config.max_size_mb * 1024 * 1024:
        raise ConfigError(_join(path, "max_entry_kb"), f"must not exceed max_size_mb ({config.max_size_mb:g} MB)")
    return config


def check_caching(config: Config) -> None:
    """With store: redis, the URL (caching's own, else rate_limit's) must be there and valid."""
    caching = config.caching
    if caching.store == "redis" and caching.redis_url is None:
        caching.redis_url = config.rate_limit.redis_url
        caching.cluster = caching.cluster or config.rate_limit.cluster
    check_redis_store(caching.store, caching.redis_url, caching.cluster, "caching",
                      "is required with store: redis (or set rate_limit.redis_url)")
