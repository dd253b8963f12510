"""The in-process rate-limit store: counters in a dict, for a single proxy instance.

All coroutines run to completion without suspending, so on one event loop each call is atomic without
locks: admission over several scopes cannot interleave with another. Rates run on a monotonic clock (a
wall clock step must not refill or drain buckets); budget periods are calendar periods, so they use the
wall clock. Both clocks are injectable for tests.

State exists only for scopes that were admitted or charged, and a periodic sweep drops the scopes whose
state says nothing more than "idle", so a stream of one-off keys does not grow the dict forever.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmproxy.ratelimit.store import (
    CONCURRENCY_RETRY_AFTER,
    EPSILON,
    Decision,
    Limits,
    bucket_level,
    bucket_needs,
    bucket_wait,
    budget_exhausted,
    gcra_interval,
    gcra_remaining,
    period_bounds,
)

SWEEP_INTERVAL = 60.0  # seconds of the monotonic clock between sweeps of idle scopes


@dataclass(slots=True)
class _Scope:
    tat: float | None = None  # GCRA theoretical arrival time (monotonic clock)
    bucket: tuple[float, float] | None = None  # token bucket (level, monotonic time of that level)
    leases: set[str] = field(default_factory=set)
    budget_start: int = 0  # start of the period the spent amounts belong to (Unix seconds)
    budget_end: int = 0
    spent_tokens: int = 0
    spent_usd: float = 0.0


@dataclass(slots=True)
class _Check:
    """One scope's verdict, computed before anything is consumed."""

    reason: str | None = None
    retry_after: float = 0.0
    tat: float | None = None  # the GCRA TAT as of now, and after this admission
    new_tat: float | None = None
    level: float | None = None  # the token level as of now

    def fail(self, reason: str, retry_after: float) -> None:
        if self.reason is None:  # the first failing check of the scope is the one reported
            self.reason, self.retry_after = reason, retry_after


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._scopes: dict[str, _Scope] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    async def admit(self, checks: Sequence[tuple[str, Limits]], reserve_tokens: int = 0) -> Decision:
        now, wall = self._clock(), self._wall_clock()
        self._maybe_sweep(now, wall)
        verdicts = [self._check(scope, limits, reserve_tokens, now, wall) for scope, limits in checks]
        denial = next(((scope, v) for (scope, _), v in zip(checks, verdicts, strict=True) if v.reason), None)
        if denial is None:
            decision = Decision(allowed=True)
            for (scope, limits), verdict in zip(checks, verdicts, strict=True):
                self._consume(scope, limits, verdict, reserve_tokens, now, decision)
        else:
            scope, verdict = denial
            decision = Decision(False, verdict.reason, scope, verdict.retry_after)
        _fill_headers(decision, checks, verdicts, reserve_tokens, now)
        return decision

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        for scope, lease in leases:
            state = self._scopes.get(scope)
            if state is not None:
                state.leases.discard(lease)

    async def charge(self, checks: Sequence[tuple[str, Limits]], tokens: int, usd: float,
                     reserved: int = 0) -> None:
        now, wall = self._clock(), self._wall_clock()
        for scope, limits in checks:
            if limits.tokens_per_minute is not None:
                state = self._scopes.setdefault(scope, _Scope())
                capacity = limits.tokens_per_minute
                level = bucket_level(state.bucket, now, capacity) - (tokens - reserved)
                state.bucket = (min(float(capacity), level), now)  # a refund never overfills the bucket
            if limits.has_budget:
                state = self._scopes.setdefault(scope, _Scope())
                self._roll_budget(state, limits.budget_period, wall)
                state.spent_tokens += tokens
                state.spent_usd += usd

    async def prepare(self) -> None:
        pass  # nothing to connect to

    async def close(self) -> None:
        self._scopes.clear()

    # Checking, then consuming ----------------------------------------------------------------------

    def _check(self, scope: str, limits: Limits, reserve: int, now: float, wall: float) -> _Check:
        """The verdict of one scope, in the order budget, tokens, concurrency, requests; changes nothing."""
        state = self._scopes.get(scope) or _Scope()
        verdict = _Check()
        if limits.has_budget:
            start, end = period_bounds(limits.budget_period, wall)
            spent = (state.spent_tokens, state.spent_usd) if state.budget_start == start else (0, 0.0)
            if budget_exhausted(limits, *spent):
                verdict.fail("budget", end - wall)
        if limits.tokens_per_minute is not None:
            capacity = limits.tokens_per_minute
            verdict.level = bucket_level(state.bucket, now, capacity)
            target = bucket_needs(verdict.level, reserve, capacity)
            if target is not None:
                verdict.fail("tokens", bucket_wait(verdict.level, target, capacity))
        if limits.max_concurrent is not None and len(state.leases) >= limits.max_concurrent:
            verdict.fail("concurrency", CONCURRENCY_RETRY_AFTER)
        if limits.requests_per_minute is not None:  # evaluated even after a failure: the headers need it
            interval, tolerance = gcra_interval(limits)
            verdict.tat = max(state.tat if state.tat is not None else now, now)
            verdict.new_tat = verdict.tat + interval
            if verdict.tat - now > tolerance + EPSILON:
                verdict.fail("requests", verdict.tat - tolerance - now)
        return verdict

    def _consume(self, scope: str, limits: Limits, verdict: _Check, reserve: int, now: float,
                 decision: Decision) -> None:
        needs_state = (verdict.new_tat is not None or limits.max_concurrent is not None
                       or (verdict.level is not None and reserve > 0))
        if not needs_state:
            return
        state = self._scopes.setdefault(scope, _Scope())
        if verdict.new_tat is not None:
            state.tat = verdict.new_tat
        if verdict.level is not None and reserve > 0:
            state.bucket = (verdict.level - reserve, now)
        if limits.max_concurrent is not None:
            lease = secrets.token_urlsafe(12)
            state.leases.add(lease)
            decision.leases.append((scope, lease))

    def _roll_budget(self, state: _Scope, period: str, wall: float) -> None:
        start, end = period_bounds(period, wall)
        if state.budget_start != start:
            state.budget_start, state.budget_end = start, end
            state.spent_tokens, state.spent_usd = 0, 0.0

    # Housekeeping ---------------------------------------------------------------------------------

    def _maybe_sweep(self, now: float, wall: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        idle = [scope for scope, state in self._scopes.items() if _is_idle(state, now, wall)]
        for scope in idle:
            del self._scopes[scope]


def _is_idle(state: _Scope, now: float, wall: float) -> bool:
    """True when forgetting the scope changes nothing: every counter is back where a new scope starts."""
    # The bucket's capacity is not stored: a bucket is surely full once a level of 0 or more is a minute old.
    bucket_full = state.bucket is None or (state.bucket[0] >= 0 and now - state.bucket[1] >= 60.0)
    return ((state.tat is None or state.tat <= now) and bucket_full and not state.leases
            and (state.budget_end <= wall))


def _fill_headers(decision: Decision, checks: Sequence[tuple[str, Limits]], verdicts: list[_Check],
                  reserve: int, now: float) -> None:
    """The x-ratelimit-* values of the first scope with a request limit and the first with a token limit."""
    admitted = decision.allowed
    for (_, limits), verdict in zip(checks, verdicts, strict=True):
        if verdict.tat is not None:
            interval, tolerance = gcra_interval(limits)
            tat = verdict.new_tat if admitted else verdict.tat
            decision.requests_limit = limits.request_capacity
            decision.requests_remaining = gcra_remaining(tat - now, interval, tolerance, limits.request_capacity)
            decision.requests_reset = tat - now
            break
    for (_, limits), verdict in zip(checks, verdicts, strict=True):
        if verdict.level is not None:
            capacity = limits.tokens_per_minute
            level = verdict.level - reserve if admitted else verdict.level
            decision.tokens_limit = capacity
            decision.tokens_remaining = max(0, math.floor(level))
            decision.tokens_reset = max(0.0, (capacity - level) * 60.0 / capacity)
            break
