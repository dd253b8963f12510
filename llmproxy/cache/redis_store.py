"""The Redis store: answers shared by every worker and replica, through the rate limiter's client factory.

Each answer is one string value with its TTL (SET PX), under `llmproxy:cache:<key>`. Its size bound is the
Redis server's own (`maxmemory` with an `allkeys-lru` or `volatile-lru` policy), not `max_size_mb`: the proxy
cannot evict what other replicas stored. A store that fails or is slow is a miss, never an error: the
request goes upstream as if caching were off (logged once per outage). Writes go in the background, a bounded
number at a time. A value that does not decode as this version's entry (Entry.decode checks every field: the
store holds what any process wrote) is a miss, and is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from time import monotonic
from typing import Any

from llmproxy.cache.entry import Entry, InvalidEntry
from llmproxy.cache.memory import StoreMetrics
from llmproxy.config.redis_url import parse_redis_url

log = logging.getLogger("llmproxy")
PREFIX = b"llmproxy:cache:"
MAX_PENDING_WRITES = 64  # beyond this a write is skipped: a cache must not queue without bound
INVALID_WARNING_INTERVAL = 60.0  # seconds between warnings of unreadable entries


class RedisCacheStore:
    __slots__ = ("_errors", "_failing", "_metrics", "_pending", "_quiet_until", "_redis", "_timeout")

    def __init__(self, url: str, cluster: bool, metrics: StoreMetrics | None, timeout: float = 0.5) -> None:
        from redis.exceptions import RedisError

        from llmproxy.ratelimit.redis_client import connect

        self._redis = connect(parse_redis_url(url, cluster), timeout, decode_responses=False)
        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        self._failing = False  # the last get failed: the next failure is not logged again
        self._quiet_until = 0.0  # no warning of an unreadable entry before this (monotonic) time
        self._timeout = timeout
        self._metrics = metrics
        self._pending: set[asyncio.Task] = set()

    async def get(self, key: bytes) -> Entry | None:
        try:
            data = await asyncio.wait_for(self._redis.get(PREFIX + key), self._timeout)
        except self._errors as error:
            if not self._failing:  # once per outage, not once per request
                self._failing = True
                log.warning("cache store: get failed (%s); answering from upstream until Redis answers again",
                            error)
            return None
        if self._failing:
            self._failing = False
            log.warning("cache store: Redis answers again")
        if data is None:
            return None
        try:
            return Entry.decode(data)
        except InvalidEntry as error:  # written by another version, or not by us: a miss, and gone
            now = monotonic()
            if now >= self._quiet_until:  # a rolling upgrade meets many: one warning a minute
                self._quiet_until = now + INVALID_WARNING_INTERVAL
                log.warning("cache store: dropped an unreadable entry (%s)", error)
            self._spawn(self._delete(key))
            return None

    async def _delete(self, key: bytes) -> None:
        with contextlib.suppress(*self._errors):  # else it expires with its TTL all the same
            await asyncio.wait_for(self._redis.delete(PREFIX + key), self._timeout)

    def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            return
        self._spawn(self._put(key, entry, ttl))

    def _spawn(self, write: Coroutine[Any, Any, None]) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            write.close()
            return
        task = asyncio.get_running_loop().create_task(write)
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
