"""Where the usage spools are: one per process that appends records.

A spool is locked by the one process that appends to it (two would each deliver the other's rows too).
With `server.workers: 1` the proxy's spool is `usage.spool_dir` itself; with N workers, worker i has its
own, `spool_dir/worker-<i>`, and a restarted worker i reopens it, so what it left undelivered goes out.
Spools that no process of the current worker count owns (the count was changed) are "leftovers": their
pending rows are delivered by worker 0 (or the single process), see llmproxy.workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
from dataclasses import replace

from llmproxy.config.model import UsageConfig
from llmproxy.delivery.dispatch import DeliveryService
from llmproxy.delivery.metrics import NullMetrics, UsageMetrics
from llmproxy.delivery.spool import SpoolDB, SpoolError, db_path

log = logging.getLogger("llmproxy.delivery")

BASE = "."  # the name of the spool in spool_dir itself
_WORKER = re.compile(r"worker-(\d+)")


def worker_spool_dir(spool_dir: str, index: int) -> str:
    return os.path.join(spool_dir, f"worker-{index}")


def existing_spools(spool_dir: str) -> list[tuple[str, str]]:
    """(name, directory) of every spool with a database under spool_dir: "." first, then worker-<i> by i."""
    found = [(BASE, spool_dir)] if os.path.exists(db_path(spool_dir)) else []
    try:
        entries = os.listdir(spool_dir)
    except OSError:
        return found
    workers = sorted((int(match.group(1)), name) for name in entries if (match := _WORKER.fullmatch(name)))
    found += [(name, path) for _, name in workers
              if os.path.exists(db_path(path := os.path.join(spool_dir, name)))]
    return found


def owned_spools(workers: int) -> set[str]:
    """The names of the spools the processes of `workers` workers append to."""
    return {BASE} if workers <= 1 else {f"worker-{i}" for i in range(workers)}


def leftover_spools(spool_dir: str, workers: int) -> list[str]:
    """Directories of spools not owned with this worker count that hold rows to deliver or dead letters
    (a replay makes those pending: they must have a process delivering them).

    Raises nothing: a spool that cannot be read is left out (it is reported when its delivery is tried).
    """
    owned = owned_spools(workers)
    leftovers = []
    for name, path in existing_spools(spool_dir):
        if name in owned:
            continue
        try:
            db = SpoolDB(path, create=False)
        except (SpoolError, OSError, sqlite3.Error):
            continue
        try:
            if db.pending or db.dead:
                leftovers.append(path)
        finally:
            db.close()
    return leftovers


class LeftoverDelivery:
    """Delivers what spools no process owns any more still hold (see leftover_spools); appends nothing.

    Run by worker 0 (or the single process) beside its own spool, until shutdown. Their rows count in the
    delivery metrics but not in the outbox gauge, which is the own spool's.
    """

    def __init__(self, usage: UsageConfig, metrics: UsageMetrics | None, workers: int) -> None:
        paths = leftover_spools(usage.spool_dir, workers) if usage.active_reporters() else []
        forward = _DeliveryMetrics(metrics or NullMetrics())
        self.services = [DeliveryService(replace(usage, spool_dir=path), forward) for path in paths]

    def start(self) -> None:
        """Start delivering from each leftover spool; one that cannot be opened is logged and skipped."""
        started = []
        for service in self.services:
            try:
                service.start()
            except Exception:  # another process holds it, or it is damaged: our own spool matters more
                log.exception("usage spool %s left by another worker count: cannot deliver from it",
                              service.config.spool_dir)
                continue
            log.warning("usage spool %s was left by another worker count: delivering what it holds",
                        service.config.spool_dir)
            started.append(service)
        self.services = started

    async def close(self) -> None:
        await asyncio.gather(*(service.close() for service in self.services))
        self.services = []


class _DeliveryMetrics:
    """Forwards the delivery counters; the outbox gauge stays the own spool's."""

    def __init__(self, metrics: UsageMetrics) -> None:
        self.metrics = metrics

    def webhook_success(self, reporter: str) -> None:
        self.metrics.webhook_success(reporter)

    def webhook_failure(self, reporter: str, reason: str) -> None:
        self.metrics.webhook_failure(reporter, reason)

    def outbox_depth(self, n: int) -> None:
        pass

    def dead_letter(self, reporter: str, reason: str) -> None:
        self.metrics.dead_letter(reporter, reason)
