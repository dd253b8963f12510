"""Retry policy: what one attempt's outcome means for its row. Pure functions, no I/O.

- 2xx: delivered.
- 5xx, 408, 429, timeouts, connection errors: the consumer is unwell. Retry with no attempt limit while
  the record is younger than max_age; a failure past max_age dead-letters it as "expired".
- Any other answer (4xx, and 3xx: redirects are not followed): the consumer refuses this record. Retry
  (the refusal may come from a consumer mid-deploy) until max_attempts attempts, then dead-letter it
  as "rejected" with the status and a body excerpt.

When a row is retried is its own affair: after its n-th failed attempt it is due again after
`backoff(n)`, uniform in [0, min(cap, base * 2^(n-1))] (full jitter; 0.5 s base and 30 s cap by
default: at most 0.5 s, 1 s, 2 s, 4 s ... 30 s), or after the consumer's Retry-After when that is
longer. Nothing else lengthens it: the dispatcher (dispatch.py) attempts every row at its own due
time, and only while the consumer is down does it choose which due row goes first, one at a time.
"""

from __future__ import annotations

import email.utils
import math
import random
from dataclasses import dataclass

from llmproxy.delivery.spool import EXPIRED, REJECTED, Action, Row

EXCERPT_BYTES = 512


@dataclass(slots=True)
class RetryPolicy:
    max_attempts: float = math.inf  # for non-retryable answers
    max_age: float = math.inf
    base: float = 0.5
    cap: float = 30.0


@dataclass(slots=True)
class AttemptResult:
    """One attempt, seen from the client: an HTTP status, or none and the reason why."""

    status: int | None
    error: str | None = None  # "timeout", "connection: ...", or the response body excerpt
    retry_after: float | None = None  # seconds, from a Retry-After header
    failure: str | None = None  # metric label when there is no status: "timeout" | "connection" | "io_error"


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))] for the attempt-th failure (1-based)."""
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 60))  # min(): 2.0**1e4 overflows
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: bytes | str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), None when absent or invalid."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is malformed
        return None
    return max(0.0, when.timestamp() - now)


def failure_label(result: AttemptResult) -> str:
    if result.status is None:
        return result.failure or "connection"
    if result.status in (408, 429):
        return f"http_{result.status}"
    return f"http_{result.status // 100}xx"


def is_retryable(status: int | None) -> bool:
    return status is None or status >= 500 or status in (408, 429)


def decide(row: Row, result: AttemptResult, now: float, policy: RetryPolicy, rng: random.Random) -> Action:
    """The action for `row` after the attempt described by `result`."""
    if result.status is not None and 200 <= result.status < 300:
        return Action(row.id, "delivered", status=result.status)
    attempts = row.attempts + 1
    retryable = is_retryable(result.status)
    delay = backoff(attempts, policy.base, policy.cap, rng)
    # Honoured when longer than our own back-off; bounded so a silly value cannot park the row forever.
    retry_after = 0.0 if result.retry_after is None else min(result.retry_after, policy.max_age)
    delay = max(delay, retry_after)
    action = Action(row.id, "retry", now + delay, result.status, _short(result.error),
                    failure=failure_label(result), retryable=retryable, retry_after=retry_after)
    if now - row.retry_since >= policy.max_age:
        action.kind, action.reason = "dead", EXPIRED
    elif not retryable and attempts >= policy.max_attempts:
        action.kind, action.reason = "dead", REJECTED
    return action


def _short(error: str | None) -> str | None:
    return error if error is None or len(error) <= EXCERPT_BYTES else error[:EXCERPT_BYTES] + "..."
