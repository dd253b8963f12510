"""Delivery workers: one dispatcher per reporter, fed from the outbox, and the service that owns them.

The request path only ever calls `DeliveryService.append()`; everything below runs in background tasks
and the outbox thread, so a slow or dead consumer costs the proxy nothing but spool space.

The delivery rule. Every row keeps its own schedule (retry.py): a failed attempt makes it due again
after a full-jitter exponential back-off of its own failures (uniform in [0, base * 2^(n-1)] after its
n-th, capped: 0.5 s, 1 s, 2 s, 4 s ... 30 s by default), or after the consumer's Retry-After when
longer. A dispatcher claims due rows of its reporter, earliest due first and never one already in
flight, and records their outcomes in one transaction per round, so under load the bookkeeping
batches itself. How many attempts it runs depends on what the consumer answered last:

- Up (at start, and from any answer that does not blame the consumer: a 2xx, or a 4xx refusing one
  record): up to `concurrency` attempts at once, each row at its own due time. Nothing reporter-wide
  holds a row back: one record's failures never delay another record.
- Down (DOWN_AFTER attempts in a row failed with a 5xx, 408, 429, timeout or connection error, and
  nothing else was answered in between): the consumer is probed by one attempt at a time, the
  earliest due row, at most one every PROBE_INTERVAL and none before a Retry-After it gave. A row
  is still never attempted before its own due time: the probe pace only decides which of the rows
  due goes first. The first answer that does not blame the consumer makes it up again, and the
  backlog drains at full concurrency at once: rows never attempted are due since they were
  appended, and rows probed during the outage are due after their own (short) back-off.

Why PROBE_INTERVAL is 50 ms (20 attempts a second at most while the consumer is down):
- It bounds what a dead consumer receives: a backlog of a million due rows would otherwise go out as
  fast as the consumer refuses connections (thousands a second); 20 small requests a second, one at a
  time, is nothing to an HTTP endpoint or the load balancer in front of it.
- Recovery is noticed within 50 ms of the consumer answering again (plus the attempt's own time, at
  most the webhook `timeout`), and the backlog follows at full concurrency.
- It does not stretch the per-record schedule in the common case of a few records failing together:
  while down, the probes are the only attempts, so the pace must keep up with the records falling due,
  whose first retries come 0-0.5 s apart. At 20/s six records failing four times each (the reported
  case) keep their own back-off within a few probe intervals; at one probe a second they would wait
  several seconds for their turn, which is the outage-long hold this rule replaces.
- A long outage does not inflate the backlog's back-offs: spread over 1,000 pending rows, 20 probes a
  second attempt each row about once a minute, so after recovery their own back-offs are short.

Rows are delivered at least once: an attempt cancelled by shutdown, or whose outcome was not yet
recorded at a crash, is attempted again after restart with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from typing import Any, Protocol

from llmproxy.config.model import ReporterConfig, UsageConfig
from llmproxy.delivery.filereporter import BATCH_SIZE, FileSender
from llmproxy.delivery.metrics import NullMetrics, UsageMetrics
from llmproxy.delivery.outbox import Outbox
from llmproxy.delivery.retry import AttemptResult, RetryPolicy, decide
from llmproxy.delivery.spool import Action, Row
from llmproxy.delivery.webhook import WebhookSender

log = logging.getLogger("llmproxy.delivery")
POLL_INTERVAL = 1.0  # longest idle sleep: picks up rows replayed by the CLI from another process
PROBE_INTERVAL = 0.05  # while a consumer is down, at most one attempt per this many seconds (see above)
DOWN_AFTER = 3  # failed attempts in a row that blame the consumer before it counts as down (one is a blip)


class Sender(Protocol):
    policy: RetryPolicy

    async def deliver(self, rows: list[Row]) -> list[Action]: ...

    async def close(self) -> None: ...


class Dispatcher:
    """Delivers the rows of one reporter."""

    def __init__(self, name: str, sender: Sender, outbox: Outbox, *, slots: int, batch_size: int,
                 metrics: UsageMetrics, rng: random.Random, poll_interval: float) -> None:
        self.name, self.sender, self.outbox = name, sender, outbox
        self.slots, self.batch_size = slots, batch_size
        self.metrics, self.rng, self.poll_interval = metrics, rng, poll_interval
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()  # claimed rows whose outcome is not yet on disk
        self._results: list[Action] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._blamed = 0  # attempts in a row that failed blaming the consumer; DOWN_AFTER or more: it is down
        self._last_start = -math.inf  # time.monotonic() of the latest attempt started
        self._not_before = 0.0  # time.monotonic() before which the consumer asked not to be probed (Retry-After)
        self._run_task: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        return self._blamed >= DOWN_AFTER

    def start(self) -> None:
        self._run_task = asyncio.get_running_loop().create_task(self._run(), name=f"usage-{self.name}")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except Exception:  # a spool or metrics error must not end deliveries for good
                log.exception("usage reporter %s: dispatcher error; retrying", self.name)
                await asyncio.sleep(self.poll_interval)

    async def _step(self) -> None:
        self._wake.clear()  # before the work: a wake-up during it makes the wait below return at once
        await self._apply_results()
        timeout = self.poll_interval
        if not self._stopping:
            timeout = min(timeout, await self._start_due())
        if self._stopping:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _start_due(self) -> float:
        """Start the attempts the delivery rule allows now; return how long until another may start (an
        attempt ending, or new rows committed, wakes the dispatcher sooner)."""
        if self.down:
            if self._tasks:
                return self.poll_interval  # one attempt at a time: its outcome wakes us
            wait = max(self._last_start + PROBE_INTERVAL, self._not_before) - time.monotonic()
            if wait > 0:
                return wait
            capacity = 1
        else:
            capacity = self.slots
        free = capacity - len(self._tasks)
        if free <= 0:
            return self.poll_interval
        rows, next_due = await self.outbox.claim(self.name, free * self.batch_size, self._inflight)
        for start in range(0, len(rows), self.batch_size):
            self._spawn(rows[start:start + self.batch_size])
        if next_due is None or len(self._tasks) >= capacity:
            return self.poll_interval
        return max(0.0, next_due - time.time())

    def _spawn(self, rows: list[Row]) -> None:
        self._inflight.update(row.id for row in rows)
        self._last_start = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._attempt(rows))
        self._tasks.add(task)

    async def _attempt(self, rows: list[Row]) -> None:
        try:
            try:
                actions = await self.sender.deliver(rows)
            except Exception as exc:  # a bug in a sender: reschedule the rows rather than lose them
                log.exception("usage reporter %s: delivery raised", self.name)
                now = time.time()
                result = AttemptResult(None, f"internal: {exc!r}", failure="internal")
                actions = [decide(row, result, now, self.sender.policy, self.rng) for row in rows]
            self._results.extend(actions)
            self._note_health(actions)
            self._wake.set()
        finally:
            self._tasks.discard(asyncio.current_task())  # here, not in a done callback: capacity is exact

    def _note_health(self, actions: list[Action]) -> None:
        # Any answer that does not blame the consumer (2xx, or a 4xx refusing one record) proves it is up.
        if any(action.status is not None and not action.retryable for action in actions):
            if self.down:
                log.info("usage reporter %s: the consumer answers again; delivering at full concurrency", self.name)
            self._blamed, self._not_before = 0, 0.0
            return
        blamed = [action for action in actions if action.retryable]
        if not blamed:
            return
        self._blamed += 1  # one per attempt (a file reporter's batch is one attempt)
        if self._blamed == DOWN_AFTER:
            log.info("usage reporter %s: the consumer is failing (%s); probing it one record at a time",
                     self.name, blamed[0].failure)
        retry_after = max(action.retry_after for action in blamed)
        if retry_after > 0:  # an explicit request from the consumer, for the whole reporter while it is down
            self._not_before = max(self._not_before, time.monotonic() + retry_after)

    async def _apply_results(self) -> None:
        if not self._results:
            return
        actions, self._results = self._results, []
        try:
            await self.outbox.apply(actions)
        except BaseException:
            self._results[:0] = actions  # rows stay in flight until their outcome is on disk
            raise
        self._inflight.difference_update(action.row_id for action in actions)
        for action in actions:
            if action.kind == "delivered":
                self.metrics.webhook_success(self.name)
                continue
            self.metrics.webhook_failure(self.name, action.failure or "unknown")
            if action.kind == "dead":
                log.warning("usage reporter %s: row %d dead-lettered (%s): %s", self.name, action.row_id,
                            action.reason, action.error)
                self.metrics.dead_letter(self.name, action.reason or "unknown")

    async def stop(self, deadline: float) -> None:
        """Stop claiming, let attempts in flight finish until `deadline` (monotonic), cancel the rest."""
        self._stopping = True
        self._wake.set()
        if self._run_task is not None:
            with contextlib.suppress(Exception):
                await self._run_task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        running = list(self._tasks)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        try:
            await self._apply_results()
        except Exception:
            log.exception("usage reporter %s: recording the last outcomes failed (rows will be retried)", self.name)
        await self.sender.close()


class DeliveryService:
    """Owns the outbox and one dispatcher per enabled reporter.

    Proxy usage: `start()` once the loop runs, `append(record)` when a request ends, `await close()` at shutdown.
    """

    def __init__(self, config: UsageConfig, metrics: UsageMetrics | None = None, *,
                 rng: random.Random | None = None, poll_interval: float = POLL_INTERVAL) -> None:
        self.config = config
        self.metrics = metrics or NullMetrics()
        self.rng = rng or random.Random()
        self.poll_interval = poll_interval
        self.reporters = config.active_reporters()
        self.enabled = bool(self.reporters)
        self.outbox = Outbox(config.spool_dir, [r.name for r in self.reporters], max_records=config.max_outbox_records,
                             flush_interval=config.flush_interval, metrics=self.metrics, on_commit=self._wake_all)
        self.dispatchers: list[Dispatcher] = []
        self._started = False

    def start(self) -> None:
        """Open the spool (creating it if needed) and start delivering, including rows left by a previous run."""
        if not self.enabled or self._started:
            return
        self.outbox.open()
        self._started = True
        for reporter in self.reporters:
            dispatcher = self._dispatcher(reporter)
            self.dispatchers.append(dispatcher)
            dispatcher.start()

    def _dispatcher(self, reporter: ReporterConfig) -> Dispatcher:
        common: dict[str, Any] = {"metrics": self.metrics, "rng": self.rng, "poll_interval": self.poll_interval}
        if reporter.type == "webhook":
            return Dispatcher(reporter.name, WebhookSender(reporter.webhook, self.rng), self.outbox,
                              slots=reporter.webhook.concurrency, batch_size=1, **common)
        return Dispatcher(reporter.name, FileSender(reporter.file, self.rng), self.outbox,
                          slots=1, batch_size=BATCH_SIZE, **common)

    def append(self, record: dict[str, Any]) -> None:
        """Hand over one finished request's usage record: O(1), no I/O. Durable within flush_interval."""
        if self.enabled:
            self.outbox.append(record)

    async def close(self, timeout: float = 5.0) -> None:
        """Commit buffered records, stop the workers (attempts still running after `timeout` are cancelled,
        their rows stay pending), close the spool. Undelivered rows are delivered by the next start()."""
        if not self._started:
            return
        self._started = False
        deadline = time.monotonic() + timeout
        await self.outbox.flush()  # first: durability matters more than the attempts in flight
        await asyncio.gather(*(dispatcher.stop(deadline) for dispatcher in self.dispatchers))
        self.dispatchers = []
        await self.outbox.close()

    def pending_count(self) -> int:
        """Rows waiting for delivery, on disk and buffered (for a gauge; cheap, any thread)."""
        return self.outbox.pending_count()

    def dead_letter_count(self) -> int:
        return self.outbox.dead_letter_count()

    def _wake_all(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.wake()
