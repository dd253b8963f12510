"""Durable usage delivery: one record per request, spooled to SQLite, delivered to every reporter.

The proxy calls `DeliveryService.start()` at start-up, `append(record)` when a request ends (O(1),
no I/O) and `await close(timeout)` at shutdown. See outbox.py for the durability bound and the
size-cap policy, dispatch.py and retry.py for the delivery rule, cli.py for dead-letter handling.
"""

from __future__ import annotations

from llmproxy.delivery.cli import dead_letters_main
from llmproxy.delivery.dispatch import DeliveryService
from llmproxy.delivery.metrics import NullMetrics, UsageMetrics
from llmproxy.delivery.spool import SpoolError, SpoolLocked

__all__ = [
    "DeliveryService",
    "NullMetrics",
    "SpoolError",
    "SpoolLocked",
    "UsageMetrics",
    "dead_letters_main",
]
