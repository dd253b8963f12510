"""A deliberate queue in front of one backend: at most `max_concurrent` requests at once, the rest wait (FIFO).

Only a backend with `max_concurrent` has one. By default the proxy holds nothing back: the engine behind it
(vLLM, SGLang) queues and schedules requests itself, and its queue is the one that balancing (queue_depth)
and autoscalers watch. This one is for those who want the proxy to hold requests back all the same, say in
front of an engine that degrades instead of queueing. Its length is a gauge, and every admission's wait
(zero for most) goes into a histogram counted in place, copied to Prometheus at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from llmproxy.errors import ProxyError
from llmproxy.overhead import OverheadHistogram

# From "did not wait" to a queue that holds requests for minutes.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ConcurrencyQueue:
    """Slots for `limit` requests; `enter` waits for one (FIFO, at most `timeout` s), `leave` gives it back.

    A slot freed while requests wait goes straight to the first of them, so a newcomer never overtakes.
    """

    __slots__ = ("_loop", "_name", "_waiters", "in_use", "limit", "max_waiters", "timeout", "waits")

    def __init__(self, name: str, limit: int, max_waiters: int, timeout: float) -> None:
        self._name = name
        self.limit = limit
        self.max_waiters = max_waiters
        self.timeout = timeout
        self.in_use = 0
        self.waits = OverheadHistogram(QUEUE_WAIT_BUCKETS)
        self._loop = asyncio.get_running_loop()
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    async def enter(self) -> None:
        """Take a slot, waiting for one if all are taken; raises ProxyError("pool_exhausted") when too many
        wait already or the wait passes `timeout` (nothing was sent: another backend may be tried)."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            self.waits.observe(0.0)
            return
        if len(self._waiters) >= self.max_waiters:
            raise ProxyError("pool_exhausted", f"backend {self._name}: too many requests queued (max_concurrent)")
        start = self._loop.time()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        timer = self._loop.call_later(self.timeout, _expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave()  # handed a slot in the same moment its request ended: pass it on
            raise
        except TimeoutError:
            raise ProxyError("pool_exhausted", f"backend {self._name}: waited {self.timeout:g}s in the queue "
                                               "(max_concurrent)") from None
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)  # one that timed out or was cancelled is still in the deque
        self.waits.observe(self._loop.time() - start)

    def leave(self) -> None:
        """Give a slot back: to the first live waiter, else to the pool of free slots."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: in_use stays
                return
        self.in_use -= 1


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
