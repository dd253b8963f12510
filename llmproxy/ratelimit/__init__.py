"""Rate limits and budgets: admit a request against its key's limits and the global ones, settle when it ends.

Admission happens once the body is read (so `max_tokens` can be reserved), before any backend is chosen:
a refused request never reaches a backend. The concurrency slot it takes is held until the request ends -
the whole stream - and given back in the pipeline's `finish`, whatever the ending; token limits and
budgets are charged there too, from the request's usage record (reported or estimated), exactly once
even when failover tried several backends.

The counters live in a store (memory, or Redis shared by workers and instances). When Redis cannot be
reached, `on_store_error` decides: fail_open serves without limits, fail_closed answers 503. Either way
the proxy keeps running, counts the error and logs it (at most every LOG_EVERY seconds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmproxy.config.model import LimitConfig, RateLimitConfig
from llmproxy.errors import ProxyError
from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.store import Decision, Limits, RateStore, StoreUnavailable

if TYPE_CHECKING:
    from llmproxy.metrics import Metrics

log = logging.getLogger("llmproxy")
LOG_EVERY = 10.0
GLOBAL_SCOPE = "global"
_DENIAL_KINDS = {"requests": "rate_limited_requests", "tokens": "rate_limited_tokens",
                 "concurrency": "rate_limited_concurrency", "budget": "budget_exhausted"}


class Caller(Protocol):
    """Who a request is limited as (tenant.Tenant)."""

    key_id: str
    limits: Limits

    @property
    def scope(self) -> str: ...


def limits_for(base: LimitConfig, override: LimitConfig | None = None) -> Limits:
    """The store's Limits for `base`, with the fields `override` sets taking precedence."""
    if override is not None:
        changes = {f.name: getattr(override, f.name) for f in dataclasses.fields(override)
                   if getattr(override, f.name) is not None}
        base = dataclasses.replace(base, **changes)
    budget = base.budget
    return Limits(
        requests_per_minute=base.requests_per_minute, burst=base.burst, max_concurrent=base.max_concurrent,
        tokens_per_minute=base.tokens_per_minute,
        budget_tokens=budget.tokens if budget else None, budget_usd=budget.usd if budget else None,
        budget_period=budget.per if budget else None,
    )


def open_store(config: RateLimitConfig) -> RateStore:
    if config.store == "redis":
        from llmproxy.ratelimit.redis_store import RedisStore

        return RedisStore(config.redis_url, cluster=config.cluster)
    return MemoryStore()


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until it ends; `settle` it exactly once."""

    limiter: Limiter
    checks: list[tuple[str, Limits]]
    leases: list[tuple[str, str]]
    reserved: int
    headers: bytes  # OpenAI's x-ratelimit-* header lines, for the response

    def settle(self, record: dict[str, Any] | None) -> None:
        """Give back the concurrency slots and charge the usage of `record` (None: nothing was used)."""
        self.release()
        self.charge(record)

    def release(self) -> None:
        """Give back the concurrency slots (the request ended); call once."""
        self.limiter.release(self)

    def charge(self, record: dict[str, Any] | None) -> None:
        """Charge the usage of the request's record (None: nothing was used); call once, after release."""
        self.limiter.charge(self, record)


class Limiter:
    def __init__(self, config: RateLimitConfig, store: RateStore, metrics: Metrics | None,
                 metrics_per_key: bool, previous: Limiter | None = None) -> None:
        self.config = config
        self.store = store
        self._global = limits_for(config.global_limits)
        self._metrics = metrics
        self._per_key_labels = metrics_per_key
        self._local = isinstance(store, MemoryStore)  # its coroutines never suspend: run them inline
        self._last_log = 0.0
        # Admissions not settled yet in this process (0 whenever nothing is in flight), shared with the
        # limiter a reload replaced: its admissions settle there.
        self._held = previous._held if previous is not None else [0]
        self._preparing: asyncio.Task | None = None

    async def admit(self, tenant: Caller | None, body: Any) -> Admission | None:
        """Admit a request of `tenant` (None: anonymous) whose parsed JSON body is `body`, or raise ProxyError
        (429 with retry-after and the x-ratelimit-* headers, or 503 with fail_closed).

        Returns None when no limit applies (or the store is down and fail_open lets the request through).
        """
        checks = self._checks(tenant)
        if not checks:
            return None
        reserve = self._reservation(body, checks)
        try:
            decision = await self.store.admit(checks, reserve)
        except StoreUnavailable as error:
            self._store_failed(error)
            if self.config.on_store_error == "fail_closed":
                raise ProxyError("ratelimit_unavailable", "rate limiting is unavailable; try again shortly") from None
            return None
        headers = rate_headers(decision, _requests_per_minute(checks))
        if not decision.allowed:
            self._refuse(tenant, decision, headers)
        self._held[0] += 1
        return Admission(self, checks, decision.leases, reserve, headers)

    def release(self, admission: Admission) -> None:
        self._held[0] -= 1
        if admission.leases:
            self._run(self._release(admission.leases))

    def charge(self, admission: Admission, record: dict[str, Any] | None) -> None:
        tokens = (record["prompt_tokens"] + record["completion_tokens"]) if record else 0
        usd = (record.get("cost_usd") or 0.0) if record else 0.0
        if tokens or usd or admission.reserved:
            self._run(self._charge(admission, tokens, usd))

    @property
    def held(self) -> int:
        return self._held[0]

    def prepare(self) -> None:
        """Let a new store connect in the background, ahead of the first admission (see RedisStore.prepare)."""
        if not self._local:
            self._preparing = asyncio.get_running_loop().create_task(self.store.prepare())

    async def close(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
        await self.store.close()

    # internals ------------------------------------------------------------------------------------

    def _checks(self, tenant: Caller | None) -> list[tuple[str, Limits]]:
        checks = []
        if tenant is not None and tenant.limits != Limits():
            checks.append((tenant.scope, tenant.limits))
        if self._global != Limits():
            checks.append((GLOBAL_SCOPE, self._global))
        return checks

    def _reservation(self, body: Any, checks: list[tuple[str, Limits]]) -> int:
        if not self.config.reserve_max_tokens or not any(limits.tokens_per_minute for _, limits in checks):
            return 0
        wanted = body.get("max_completion_tokens") or body.get("max_tokens") if isinstance(body, dict) else None
        return wanted if isinstance(wanted, int) and wanted > 0 else 0

    def _refuse(self, tenant: Caller | None, decision: Decision, headers: bytes) -> None:
        reason = decision.reason or "requests"
        if self._metrics is not None:
            self._metrics.observe_ratelimited(reason, tenant.key_id if tenant and self._per_key_labels else "")
        retry_after = max(1, math.ceil(decision.retry_after))
        headers += b"retry-after: %d\r\n" % retry_after
        who = "this API key" if decision.scope != GLOBAL_SCOPE else "the proxy"
        if reason == "budget":
            resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + decision.retry_after))
            message = f"You exceeded the usage budget of {who}; it resets at {resets}."
        else:
            message = f"Rate limit reached for {who} ({reason}). Retry after {retry_after}s."
        raise ProxyError(_DENIAL_KINDS[reason], message, headers=headers)

    async def _release(self, leases: list[tuple[str, str]]) -> None:
        try:
            await self.store.release(leases)
        except StoreUnavailable as error:
            self._store_failed(error)  # leases in Redis expire on their own

    async def _charge(self, admission: Admission, tokens: int, usd: float) -> None:
        try:
            await self.store.charge(admission.checks, tokens, usd, admission.reserved)
        except StoreUnavailable as error:
            self._store_failed(error)  # a lost charge is logged

    def _run(self, coro: Any) -> None:
        if self._local:
            try:
                coro.send(None)
            except StopIteration:
                return
            raise RuntimeError("the memory store suspended")  # never: it does no I/O
        asyncio.get_running_loop().create_task(coro)

    def _store_failed(self, error: StoreUnavailable) -> None:
        if self._metrics is not None:
            self._metrics.observe_store_error()
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.error("rate-limit store unavailable (%s): %s", self.config.on_store_error, error)


def rate_headers(decision: Decision, requests_per_minute: float | None = None) -> bytes:
    """OpenAI's x-ratelimit-* headers for a decision (requests trio, and tokens trio where limited).

    As OpenAI means them: the requests limit is the rate per minute (`requests_per_minute` of the scope the
    store reported on; the burst capacity when not given), remaining is what may be sent right now.
    """
    parts = []
    if decision.requests_limit is not None:
        limit = max(1, round(requests_per_minute)) if requests_per_minute else decision.requests_limit
        parts.append(b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
                     b"x-ratelimit-reset-requests: %s\r\n" % (limit, decision.requests_remaining or 0,
                                                             _duration(decision.requests_reset or 0.0)))
    if decision.tokens_limit is not None:
        parts.append(b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %d\r\n"
                     b"x-ratelimit-reset-tokens: %s\r\n" % (decision.tokens_limit, decision.tokens_remaining or 0,
                                                           _duration(decision.tokens_reset or 0.0)))
    return b"".join(parts)


def _requests_per_minute(checks: list[tuple[str, Limits]]) -> float | None:
    """The request rate of the first scope that has one: the one the stores report x-ratelimit-* values of."""
    return next((limits.requests_per_minute for _, limits in checks if limits.requests_per_minute is not None), None)


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return b"%dms" % round(seconds * 1000)
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3g}s" if not minutes else f"{int(minutes)}m{rest:.0f}s"
    return text.encode()
