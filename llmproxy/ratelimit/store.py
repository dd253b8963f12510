"""What a rate-limit store promises: the limits of a scope, the decision, and the store interface.

A scope is a string naming who is limited ("key:ab12", "global"). A request is admitted against several
scopes at once, atomically: every limit of every scope is checked first and only if all pass is anything
consumed, so a request denied by the global limit does not eat the key's allowance. Two implementations
keep the counters: `MemoryStore` (one process) and `RedisStore` (shared by a fleet of proxies). They must
behave identically, so the arithmetic they share is written down here once, in Python, and mirrored by
the Lua scripts of the Redis store.

The algorithms:
- requests: GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell). One stored
  timestamp per scope, the theoretical arrival time (TAT); emission interval T = 60 / requests_per_minute,
  capacity B = burst, so at most B requests back-to-back from an idle start.
- tokens: a token bucket of capacity tokens_per_minute, refilled continuously, starting full. Admission
  only checks the level (the size of an answer is unknown before it is streamed); `charge` subtracts what
  was really used afterwards and may drive the level below zero, which then denies until refilled.
- concurrency: one lease per request in progress, released when it ends.
- budget: tokens and dollars spent in the current calendar period (UTC day, ISO week, month).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

PERIODS = ("day", "week", "month")
# Concurrency slots come back when requests end, which no store can predict: a client is told to retry soon.
CONCURRENCY_RETRY_AFTER = 1.0
# Slack for float comparisons: clocks tick in microseconds (Redis TIME), so anything finer is noise.
EPSILON = 1e-6
# A bucket that is short by less than a token per millisecond of refill is not worth a shorter retry.
MIN_RETRY_AFTER = 0.001


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one scope; None switches a limit off. Raises ValueError on impossible values."""

    requests_per_minute: float | None = None
    burst: int | None = None  # GCRA capacity in requests; None = one minute's allowance, at least 1
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: str | None = None  # "day" | "week" (ISO, from Monday) | "month"; all UTC

    def __post_init__(self) -> None:
        if self.requests_per_minute is not None and not self.requests_per_minute > 0:
            raise ValueError("requests_per_minute must be > 0")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be >= 1")
        if self.max_concurrent is not None and self.max_concurrent < 0:
            raise ValueError("max_concurrent must be >= 0")
        if self.tokens_per_minute is not None and self.tokens_per_minute <= 0:
            raise ValueError("tokens_per_minute must be > 0")
        for name in ("budget_tokens", "budget_usd"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.has_budget and self.budget_period not in PERIODS:
            raise ValueError(f"budget_period must be one of {', '.join(PERIODS)} when a budget is set")

    @property
    def request_capacity(self) -> int:
        """B, the GCRA capacity: the burst, or one minute's allowance when none is given (at least 1)."""
        if self.burst is not None:
            return self.burst
        return max(1, int(self.requests_per_minute or 0))

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


@dataclass(slots=True)
class Decision:
    """The answer to `admit`. Header fields describe the first scope that has the limit (the key's)."""

    allowed: bool
    reason: str | None = None  # when denied: "requests" | "tokens" | "concurrency" | "budget"
    scope: str | None = None  # the scope that denied
    retry_after: float = 0.0  # seconds after which the same request could be admitted
    leases: list[tuple[str, str]] = field(default_factory=list)  # (scope, lease id), to release later
    requests_limit: int | None = None  # the burst capacity
    requests_remaining: int | None = None  # requests that could still be admitted right now
    requests_reset: float | None = None  # seconds until the request allowance is full again
    tokens_limit: int | None = None
    tokens_remaining: int | None = None  # floor of the bucket level, never below 0
    tokens_reset: float | None = None  # seconds until the token bucket is full again


class StoreUnavailable(Exception):
    """The shared store cannot be reached (down, timeout): the caller applies its fail-open/closed policy."""


class RateStore(Protocol):
    async def admit(self, checks: Sequence[tuple[str, Limits]], reserve_tokens: int = 0) -> Decision:
        """Checks every limit of every (scope, limits); consumes only if all pass. Raises StoreUnavailable."""
        ...

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        """Gives back concurrency leases taken by `admit`. Raises StoreUnavailable."""
        ...

    async def charge(self, checks: Sequence[tuple[str, Limits]], tokens: int, usd: float,
                     reserved: int = 0) -> None:
        """Records a finished request: `tokens` and `usd` go to the budgets, `tokens - reserved` to the
        token buckets (`reserved` is what `admit` took for it). Raises StoreUnavailable."""
        ...

    async def prepare(self) -> None: ...  # connect ahead of the first call, where there is anything to connect

    async def close(self) -> None: ...


# GCRA ---------------------------------------------------------------------------------------------


def gcra_interval(limits: Limits) -> tuple[float, float]:
    """(T, tau): the emission interval and how far ahead of now the TAT may be for an admission."""
    interval = 60.0 / limits.requests_per_minute
    return interval, (limits.request_capacity - 1) * interval


def gcra_remaining(ahead: float, interval: float, tolerance: float, capacity: int) -> int:
    """How many requests could be admitted now, back to back, when the TAT is `ahead` seconds away."""
    # The k-th next one (k >= 0) passes while ahead + k*T <= tau.
    room = tolerance - ahead
    if room < -EPSILON:
        return 0
    return min(capacity, math.floor((room + EPSILON) / interval) + 1)


# Token bucket -------------------------------------------------------------------------------------


def bucket_level(stored: tuple[float, float] | None, now: float, capacity: int) -> float:
    """The level now of a bucket stored as (level, at); a bucket never stored is full."""
    if stored is None:
        return float(capacity)
    level, at = stored
    return min(float(capacity), level + max(0.0, now - at) * capacity / 60.0)


def bucket_needs(level: float, reserve: int, capacity: int) -> float | None:
    """None when a request reserving `reserve` tokens may pass; else the level it must wait for.

    Without a reservation any positive level passes. A reservation above the capacity passes when the
    bucket is full: otherwise it would wait forever.
    """
    if reserve > capacity:
        return None if level >= capacity - EPSILON else float(capacity)
    if reserve > 0:
        return None if level >= reserve - EPSILON else float(reserve)
    return None if level > 0 else 0.0


def bucket_wait(level: float, target: float, capacity: int) -> float:
    """Seconds of refill until the level reaches `target`."""
    return max(MIN_RETRY_AFTER, (target - level) * 60.0 / capacity)


# Budget periods ---------------------------------------------------------------------------------------


def period_bounds(period: str, wall: float) -> tuple[int, int]:
    """(start, end) in Unix seconds of the UTC calendar period that contains `wall`."""
    moment = datetime.fromtimestamp(wall, timezone.utc)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + timedelta(days=1)
    elif period == "week":
        start -= timedelta(days=start.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = start.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return int(start.timestamp()), int(end.timestamp())


def budget_exhausted(limits: Limits, spent_tokens: int, spent_usd: float) -> bool:
    return ((limits.budget_tokens is not None and spent_tokens >= limits.budget_tokens)
            or (limits.budget_usd is not None and spent_usd >= limits.budget_usd))
