"""The Redis store: answers shared by every worker and replica, through the rate limiter's client factory.

Each answer is one string value with its TTL (SET PX), under `llmproxy:cache:<key>`. Its size bound is the
Redis server's own (`maxmemory` with an `allkeys-lru` or `volatile-lru` policy), not `max_size_mb`: the proxy
cannot evict what other replicas stored. A store that fails or is slow is a miss, never an error: the
request goes upstream as if caching were off. Writes go in the background, a bounded number at a time.
"""

from __future__ import annotations

import asyncio
import logging

from llmproxy.cache.entry import Entry
from llmproxy.cache.memory import StoreMetrics
from llmproxy.config.redis_url import parse_redis_url

log = logging.getLogger("llmproxy")
PREFIX = b"llmproxy:cache:"
MAX_PENDING_WRITES = 64  # beyond this a write is skipped: a cache must not queue without bound


class RedisCacheStore:
    __slots__ = ("_errors", "_metrics", "_pending", "_redis", "_timeout")

    def __init__(self, url: str, cluster: bool, metrics: StoreMetrics | None, timeout: float = 0.5) -> None:
        from redis.exceptions import RedisError

        from llmproxy.ratelimit.redis_client import connect

        self._redis = connect(parse_redis_url(url, cluster), timeout, decode_responses=False)
        self._errors = (RedisError, OSError, asyncio.TimeoutError, ValueError, KeyError)
        self._timeout = timeout
        self._metrics = metrics
        self._pending: set[asyncio.Task] = set()

    async def get(self, key: bytes) -> Entry | None:
        try:
            data = await asyncio.wait_for(self._redis.get(PREFIX + key), self._timeout)
            return None if data is None else Entry.decode(data)
        except self._errors as error:
            log.warning("cache store: get failed (%s); answering from upstream", error)
            return None

    def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            return
        task = asyncio.get_running_loop().create_task(self._put(key, entry, ttl))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, key: bytes, entry: Entry, ttl: float) -> None:
        data = entry.encode()
        try:
            await asyncio.wait_for(self._redis.set(PREFIX + key, data, px=max(1, int(ttl * 1000))), self._timeout)
        except self._errors as error:
            log.warning("cache store: set failed (%s); the answer is not shared", error)
            return
        if self._metrics is not None:
            self._metrics.cache_bytes_counted("stored", len(data))

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await self._redis.aclose()
