"""The memory store: a dict in insertion order used as an LRU list, bounded in bytes, entries with deadlines.

A hit moves its entry to the end; a store evicts from the front until the new entry fits. Expired entries
are dropped when met (a get) or when they reach the front of the list, so no sweeper runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from llmproxy.cache.entry import Entry


class StoreMetrics(Protocol):
    def cache_bytes_counted(self, op: str, size: int) -> None: ...  # stored | evicted | expired | served


class MemoryStore:
    __slots__ = ("_clock", "_entries", "_metrics", "max_bytes", "size")

    def __init__(self, max_bytes: int, clock: Callable[[], float], metrics: StoreMetrics | None) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes held, as Entry.size counts them
        self._entries: OrderedDict[bytes, tuple[float, Entry]] = OrderedDict()
        self._clock = clock
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: bytes) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self._clock():
            self._drop(key, "expired")
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        if key in self._entries:
            self._drop(key, "evicted")  # replaced: the old one's bytes go before the new one's count
        size = entry.size + len(key)
        if size > self.max_bytes:
            return
        now = self._clock()
        while self.size + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest, "expired" if self._entries[oldest][0] <= now else "evicted")
        self._entries[key] = (now + ttl, entry)
        self.size += size
        if self._metrics is not None:
            self._metrics.cache_bytes_counted("stored", size)

    def _drop(self, key: bytes, why: str) -> None:
        _, entry = self._entries.pop(key)
        size = entry.size + len(key)
        self.size -= size
        if self._metrics is not None:
            self._metrics.cache_bytes_counted(why, size)

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0
