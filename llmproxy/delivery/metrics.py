"""The metrics hooks usage delivery calls; the Prometheus wiring implements this Protocol elsewhere."""

from __future__ import annotations

from typing import Protocol


class UsageMetrics(Protocol):
    def webhook_success(self, reporter: str) -> None:
        """A row was delivered (any reporter type: the label says which reporter)."""

    def webhook_failure(self, reporter: str, reason: str) -> None:
        """An attempt failed. reason: timeout | connection | io_error | http_408 | http_429 | http_3xx | http_4xx
        | http_5xx."""

    def outbox_depth(self, n: int) -> None:
        """Rows waiting for delivery (on disk, plus buffered records times reporters), after each group commit."""

    def dead_letter(self, reporter: str, reason: str) -> None:
        """A row was given up on. reason: expired | rejected | outbox_full | spool_unwritable (records dropped from
        memory because the spool could not be written for longer than the cap allows: these are lost)."""


class NullMetrics:
    def webhook_success(self, reporter: str) -> None:
        pass

    def webhook_failure(self, reporter: str, reason: str) -> None:
        pass

    def outbox_depth(self, n: int) -> None:
        pass

    def dead_letter(self, reporter: str, reason: str) -> None:
        pass
