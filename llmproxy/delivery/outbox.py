"""The outbox: the request path appends records in memory; a group commit writes them to the spool.

Durability bound. `append()` only puts the record in a list (O(1), no I/O, no await). Every
`flush_interval` (100 ms by default) the list is written to SQLite in one transaction, fsynced, on a
dedicated thread so disk latency never stalls the event loop. Hence:
  - SIGKILL (or a crash) loses at most the records appended since the last group commit: one
    flush_interval plus the duration of the commit in progress;
  - SIGTERM, i.e. a clean `await close()`, loses nothing: close() commits whatever is buffered.
A committed record is then delivered at least once per reporter (duplicates carry the same webhook-id).

Size cap (`max_outbox_records`, counting pending rows: one per record and reporter). New records are
always accepted — they are the ones most likely still wanted — and when the spool holds more rows
than the cap, the OLDEST pending rows are moved to the dead letters with reason "outbox_full" (and
counted by the dead_letter metric), where `dead-letters replay` can bring them back. Dead letters
themselves are not capped: they are the operator's to replay or remove.

If the spool cannot be written (disk full, I/O error), the batch is kept in memory and retried at the
next interval; only when more than `max_outbox_records` records are waiting in memory are the oldest
dropped, counted as dead letters with reason "spool_unwritable" (those are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from llmproxy.delivery.metrics import NullMetrics, UsageMetrics
from llmproxy.delivery.spool import OUTBOX_FULL, Action, Row, SpoolDB, SpoolLocked

log = logging.getLogger("llmproxy.delivery")
T = TypeVar("T")
LOCK_NAME = "usage.lock"  # flock()ed by the process using the spool, which writes its pid into it
LOCK_HOLDER_WAIT = 0.2  # seconds to wait for the holder's pid when the lock was just taken
SPOOL_UNWRITABLE = "spool_unwritable"


def lock_spool(spool_dir: str) -> int:
    """Lock `spool_dir` for this process and write our pid into the lock file; return the fd holding the lock.

    Two proxies delivering from one spool would send every row twice, so the lock (flock, released when
    the fd is closed or the process dies, SIGKILL included) is taken with the spool. Raises SpoolLocked,
    naming the holder, when another process has it.
    """
    os.makedirs(spool_dir, exist_ok=True)
    fd = os.open(os.path.join(spool_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = _lock_holder(fd)
        finally:
            os.close(fd)
        raise SpoolLocked(spool_dir, holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)  # the previous holder's pid stays in the file after it exits
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # only the message of a second instance suffers: never a reason not to start
        log.warning("usage spool %s: could not write our pid into %s", spool_dir, LOCK_NAME, exc_info=True)
    return fd


def _lock_holder(fd: int) -> int | None:
    """The pid the lock's holder wrote, None if unreadable. It writes it just after locking: wait a moment."""
    deadline = time.monotonic() + LOCK_HOLDER_WAIT
    while True:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


class Outbox:
    """Buffered appends, group commits and every other spool access, all on one thread."""

    def __init__(self, spool_dir: str, reporters: list[str], *, max_records: int = 1_000_000,
                 flush_interval: float = 0.1, metrics: UsageMetrics | None = None,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.spool_dir = spool_dir
        self.reporters = reporters
        self.max_records = max_records
        self.flush_interval = flush_interval
        self.metrics = metrics or NullMetrics()
        self.on_commit = on_commit  # called after a group commit added rows (wakes the workers)
        self._buffer: list[tuple[dict[str, Any], float]] = []
        self._committing = 0  # records of the group commit in progress
        self._counts_lock = threading.Lock()
        self._nonempty = asyncio.Event()
        self._closing = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._db: SpoolDB | None = None
        self._lock_fd = -1
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # The request path ------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Queue one finished request's usage record. O(1), never blocks; do not mutate `record` afterwards."""
        if self._closed:
            log.error("usage record %s appended after the outbox closed: dropped", record.get("request_id"))
            return
        if not self._buffer:
            self._nonempty.set()
        self._buffer.append((record, time.time()))

    # Life cycle ------------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the spool, open (or create) the database, start the group commit. Blocks briefly: call at start-up."""
        loop = asyncio.get_running_loop()  # before taking anything that would need releasing
        self._lock_fd = lock_spool(self.spool_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-outbox")
        try:
            self._db, orphans = self._executor.submit(self._open_db).result()
        except BaseException:
            self._release()
            raise
        if orphans:
            log.warning("usage spool holds pending rows of reporters not configured (kept): %s", orphans)
        self._task = loop.create_task(self._run(), name="usage-outbox")

    def _open_db(self) -> tuple[SpoolDB, dict[str, int]]:
        db = SpoolDB(self.spool_dir, counts_lock=self._counts_lock)
        try:
            pending = db.reporters_with_pending()
        except BaseException:
            db.close()
            raise
        return db, {name: n for name, n in pending.items() if name not in self.reporters}

    async def close(self) -> None:
        """Commit everything buffered, then close the database. Nothing appended before this call is lost."""
        if self._closed or self._executor is None:
            return
        self._closing.set()
        self._nonempty.set()
        if self._task is not None:
            await self._task
        while self._buffer:  # records appended while the last group commit ran
            waiting = len(self._buffer)
            await self.flush()
            if len(self._buffer) >= waiting:
                break  # the spool cannot be written: give up, reported below
        self._closed = True
        if self._buffer:
            log.error("usage outbox closed with %d records it could not write: lost", len(self._buffer))
        await self.call(self._db.close)
        self._release()

    def _release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)  # our pid, once we are gone, would name the wrong process
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    async def _run(self) -> None:
        while True:
            await self._nonempty.wait()
            if not self._closing.is_set():
                # Wait out the interval so one commit carries every record of it (group commit).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.flush_interval)
            self._nonempty.clear()
            await self.flush()
            if self._closing.is_set():
                return

    async def flush(self) -> None:
        """Write the buffered records now (one transaction)."""
        async with self._flush_lock:
            with self._counts_lock:
                batch, self._buffer = self._buffer, []
                self._committing = len(batch)  # still counted by pending_count() while the commit runs
            if not batch:
                return
            try:
                overflow = await self.call(self._db.insert_batch, batch, self.reporters, self.max_records,
                                           self._committed)
            except Exception:
                log.exception("usage outbox: writing %d records to the spool failed; retrying", len(batch))
                self._requeue(batch)
                return
        for reporter, count in overflow.items():
            log.warning("usage outbox full: %d oldest %s rows moved to dead letters", count, reporter)
            for _ in range(count):
                self.metrics.dead_letter(reporter, OUTBOX_FULL)
        self.metrics.outbox_depth(self.pending_count())
        if self.on_commit is not None:
            self.on_commit()

    def _committed(self) -> None:
        self._committing = 0  # called under _counts_lock, as the rows it counted appear in db.pending

    def _requeue(self, batch: list[tuple[dict[str, Any], float]]) -> None:
        with self._counts_lock:
            self._committing = 0
            self._buffer[:0] = batch
            excess = len(self._buffer) - self.max_records
            if excess > 0:
                del self._buffer[:excess]
        self._nonempty.set()
        if excess > 0:
            log.error("usage outbox: spool unwritable, %d oldest buffered records dropped", excess)
            for _ in range(excess):
                for reporter in self.reporters:
                    self.metrics.dead_letter(reporter, SPOOL_UNWRITABLE)

    # Spool access for the workers --------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the outbox thread: every SQLite access goes through it, serialised."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def claim(self, reporter: str, limit: int, exclude: set[int]) -> tuple[list[Row], float | None]:
        return await self.call(self._db.claim, reporter, time.time(), limit, tuple(exclude))

    async def apply(self, actions: list[Action]) -> None:
        await self.call(self._db.apply, actions, time.time())
        self.metrics.outbox_depth(self.pending_count())  # delivered rows leave the gauge now, not at the next commit

    # Gauges (cheap, callable from any thread) ------------------------------------------------------------

    def pending_count(self) -> int:
        with self._counts_lock:  # a record is counted once: buffered, being committed, or on disk
            on_disk = self._db.pending if self._db is not None else 0
            return on_disk + (len(self._buffer) + self._committing) * len(self.reporters)

    def dead_letter_count(self) -> int:
        return self._db.dead if self._db is not None else 0
