"""Exact prompt counts for records that would be estimated, asked of the backend's tokenizer after the request.

A request that ends without the backend's usage (the client left, the stream broke before its last event)
would be recorded with an estimated prompt. When the backend that served it has a tokenizer endpoint
(fleet/tokenizer.py), its record waits instead, at most `usage.recount.timeout`, while the proxy asks that
endpoint how many tokens the prompt was. Bounded: `concurrency` counts at once and `max_pending` waiting;
beyond that, on a timeout or on any failure, the record goes out estimated, as it was. Either way it goes
out exactly once, and nothing of this runs on a request's path: its client already has its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from llmproxy.config.model import RecountConfig

log = logging.getLogger("llmproxy")
CLOSE_GRACE = 1.0  # seconds beyond one count's timeout that close() waits before giving up on counts


class Recounter:
    """Runs prompt counts in the background, each ending in its `done` callback exactly once."""

    def __init__(self, config: RecountConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Records waiting for their count (or counting)."""
        return len(self._tasks)

    def submit(self, count: Callable[[], Awaitable[int | None]], done: Callable[[int | None], None]) -> bool:
        """Start counting; `done` gets the count, or None when there is none. False (and nothing started,
        `done` not called) when recounts are off or too many wait: the caller delivers its record at once."""
        if not self.config.enabled or len(self._tasks) >= self.config.max_pending:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a request finished while its loop is gone (a pipeline collected at exit)
            return False
        task = loop.create_task(self._count(count, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def close(self) -> None:
        """Let the counts in flight finish (each is bounded by its timeout), then cancel what is left: their
        records go out estimated."""
        if not self._tasks:
            return
        waiting = set(self._tasks)
        _, late = await asyncio.wait(waiting, timeout=self.config.timeout + CLOSE_GRACE)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)

    async def _count(self, count: Callable[[], Awaitable[int | None]], done: Callable[[int | None], None]) -> None:
        counted: int | None = None
        try:
            async with self._slots:
                counted = await asyncio.wait_for(count(), self.config.timeout)
        except asyncio.CancelledError:
            counted = None  # shutting down: the record goes out as it was
        except Exception as error:  # a backend that cannot say: the estimate stands
            log.debug("prompt recount failed: %s", error)
            counted = None
        finally:
            try:
                done(counted)
            except Exception:  # the record must still go out: a bug here is logged, not raised into the loop
                log.exception("delivering a recounted record failed")
