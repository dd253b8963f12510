"""First-byte and stream-idle deadlines of every in-flight exchange, checked on one periodic tick.

Per-request timers would cost a `call_later` and a `cancel` twice per request, on the latency-critical
path; here a request only joins and leaves a set, and a chunk only bumps a counter. The price is
precision: a deadline fires up to one tick late (a quarter of the shortest timeout, at most 1 s).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

MAX_TICK = 1.0
MIN_TICK = 0.05


def tick_for(timeouts: list[float]) -> float:
    """Return the tick interval for the given timeouts (seconds)."""
    return max(MIN_TICK, min(MAX_TICK, min(timeouts) / 4))


class Watched(Protocol):
    """An exchange in flight (relay.py): it compares its own deadlines with the time it is given."""

    def check_deadlines(self, now: float) -> None: ...


class DeadlineSweeper:
    __slots__ = ("_handle", "_interval", "_loop", "active")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.active: set[Watched] = set()
        self._loop = loop
        self._interval = interval
        self._handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        for exchange in list(self.active):
            exchange.check_deadlines(now)
        self._handle = self._loop.call_later(self._interval, self._tick)

    def close(self) -> None:
        self._handle.cancel()
