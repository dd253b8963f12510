"""The response cache and request de-duplication (the `caching:` section).

Which requests: those a strategy matches (`strategies[].match`, a route's conditions, fleet/routes.py's matcher),
cached for that strategy's `ttl_seconds`. Their key is key.py's. A client's `Cache-Control: no-cache` (or
`no-store`) bypasses both the cache and de-duplication. Where: the memory store (memory.py, LRU within
`max_size_mb`, one per process) or Redis (redis_store.py, shared). Identical requests in flight share one
upstream request (flight.py), when `dedup` holds.

The pipeline asks `plan` (is it cacheable, under which key), then `get` (a stored answer), `joinable` (a flight
to follow) or `lead` (a flight of its own), and `put`s a complete answer when its request ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from llmproxy.cache.entry import Entry
from llmproxy.cache.flight import Flight
from llmproxy.cache.key import cache_key
from llmproxy.cache.memory import MemoryStore, StoreMetrics
from llmproxy.config.model import CachingConfig
from llmproxy.fleet.routes import Conditions

HIT, MISS, BYPASS = "hit", "miss", "bypass"
_NO_CACHE = (b"no-cache", b"no-store")


class CachePlan(NamedTuple):
    key: bytes
    ttl: float
    strategy: str


class CacheStore(Protocol):
    async def get(self, key: bytes) -> Entry | None: ...

    def put(self, key: bytes, entry: Entry, ttl: float) -> None: ...

    async def close(self) -> None: ...


def open_store(config: CachingConfig, metrics: StoreMetrics | None, clock: Callable[[], float]) -> CacheStore:
    if config.store == "redis":
        from llmproxy.cache.redis_store import RedisCacheStore

        return RedisCacheStore(config.redis_url, config.cluster, metrics)
    return MemoryStore(int(config.max_size_mb * 1024 * 1024), clock, metrics)


def asks_no_cache(headers: list[tuple[bytes, bytes]]) -> bool:
    """The client's Cache-Control says no-cache or no-store (any case, among other directives)."""
    for name, value in headers:
        if name == b"cache-control" and any(token in value.lower() for token in _NO_CACHE):
            return True
    return False


class ResponseCache:
    """The cache of one process: its strategies, its store, the flights in progress. Lives as long as the
    process (the `caching:` section needs a restart to change)."""

    __slots__ = ("_ignore", "_strategies", "config", "flights", "max_entry", "max_lag", "store")

    def __init__(self, config: CachingConfig, metrics: StoreMetrics | None, clock: Callable[[], float]) -> None:
        self.config = config
        strategies = [(Conditions(s.match), s.ttl_seconds or config.default_ttl_seconds, s.id)
                      for s in config.strategies]
        self._strategies = tuple(sorted(strategies, key=lambda s: -s[0].specificity))  # as routes: most specific
        self._ignore = frozenset(config.ignore_fields)
        self.store = open_store(config, metrics, clock)
        self.flights: dict[bytes, Flight] = {}
        self.max_entry = config.max_entry_kb * 1024
        self.max_lag = config.dedup_max_lag_kb * 1024

    def plan(self, method: bytes, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: Any,
             model: str | None, tenant: str | None) -> CachePlan | None:
        """The key and TTL of a cacheable request (a JSON object body some strategy matches), else None."""
        if not isinstance(body, dict):
            return None
        for conditions, ttl, strategy_id in self._strategies:
            if conditions.matches(method, path, headers, body):
                try:
                    key = cache_key(method, path, query, headers, model, body,
                                    tenant if self.config.per_key else None, self._ignore)
                except (TypeError, ValueError):
                    return None
                return CachePlan(key, ttl, strategy_id)
        return None

    async def get(self, key: bytes) -> Entry | None:
        return await self.store.get(key)

    def put(self, plan: CachePlan, entry: Entry) -> None:
        if len(entry.body) <= self.max_entry:
            self.store.put(plan.key, entry, plan.ttl)

    def joinable(self, key: bytes) -> Flight | None:
        """The flight in progress for `key` that takes followers, if any (only with `dedup`)."""
        flight = self.flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def lead(self, key: bytes) -> Flight:
        """A new flight for `key`: identical requests from now on follow it (with `dedup`)."""
        flight = Flight(key, self.max_entry, self.max_lag, self._close_joins)
        if self.config.dedup:
            self.flights[key] = flight
        return flight

    def _close_joins(self, flight: Flight) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    async def close(self) -> None:
        await self.store.close()
