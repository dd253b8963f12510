"""Rate-limit stores: one suite run against MemoryStore and RedisStore, which must behave identically.

RedisStore runs it three times: on one redis-server, on a real Redis Cluster (tests/redis_cluster.py), where
every script must find all its keys, the budget keys it builds included, in one slot, and on the same
cluster of Valkey servers.

The memory store runs on fake clocks, so its numbers are exact; the Redis store runs against a real
redis-server on 127.0.0.1 (tests/redis_server.py) on Redis' own clock, so its numbers are compared with a
small tolerance and its refills use short intervals and real sleeps of well under a second. Redis-only
tests cover what only a shared store has: instances sharing limits, lease expiry and renewal, Redis
crashing, hanging and coming back.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.redis_store import RELEASE_RETRY_FOR
from llmproxy.ratelimit.store import Decision, Limits, RateStore, StoreUnavailable, period_bounds
from tests.redis_server import RedisServer
from tests.support import free_port

pytestmark = pytest.mark.timeout(30)

# Wednesday 2024-03-06 12:00:00 UTC: the fake wall clock starts mid-day, mid-week, mid-month.
WALL = datetime(2024, 3, 6, 12, tzinfo=timezone.utc).timestamp()
RPM_1S = 60.0  # one request a second: bursts finish long before Redis' clock moves a whole interval


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


class Harness:
    """Makes stores of one kind and moves time for them: fake clocks for memory, real sleeps for Redis.

    Kinds: "memory", "redis" (one server), "cluster" (a real Redis Cluster: the same scripts, keys in one slot),
    "valkey-cluster" (the same cluster of Valkey servers).
    """

    def __init__(self, kind: str, server: Any) -> None:
        self.kind = kind
        self.server = server
        self.now = 1000.0
        self.wall = WALL
        self.stores: list[Any] = []
        # Redis runs on its own clock while the test runs: allow for the milliseconds between calls.
        self.tolerance = 1e-9 if kind == "memory" else 0.1

    def store(self, **kwargs: Any) -> Any:
        if self.kind == "memory":
            store: Any = MemoryStore(clock=lambda: self.now, wall_clock=lambda: self.wall)
        else:
            from llmproxy.ratelimit.redis_store import RedisStore

            assert self.server is not None
            cluster = self.kind.endswith("cluster")
            if cluster:  # its first call also learns the slot map: more than 0.5 s on a loaded machine
                kwargs.setdefault("timeout", 2.0)
            store = RedisStore(self.server.url, prefix="test:", cluster=cluster, **kwargs)
        self.stores.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        if self.kind == "memory":
            self.now += seconds
            self.wall += seconds
        else:
            await asyncio.sleep(seconds)

    def to_period_end(self, period: str) -> float:
        wall = self.wall if self.kind == "memory" else time.time()
        return period_bounds(period, wall)[1] - wall

    def approx(self, value: float) -> Any:
        return pytest.approx(value, abs=self.tolerance)

    def run(self, scenario: Callable[[Harness], Awaitable[None]], timeout: float = 20.0) -> None:
        async def bounded() -> None:
            try:
                await asyncio.wait_for(scenario(self), timeout)
            finally:
                for store in self.stores:
                    await store.close()

        asyncio.run(bounded())


@pytest.fixture(params=["memory", "redis", "cluster", "valkey-cluster"])
def harness(request: pytest.FixtureRequest) -> Harness:
    server = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.start()  # in case a test that killed it failed before bringing it back
        server.flushall()
    elif request.param in ("cluster", "valkey-cluster"):
        server = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "valkey_cluster")
        server.flushall()
    return Harness(request.param, server)


@pytest.fixture
def redis_harness(redis_server: RedisServer) -> Harness:
    redis_server.start()
    redis_server.flushall()
    return Harness("redis", redis_server)


def redis_store(server: RedisServer, **kwargs: Any) -> Any:
    from llmproxy.ratelimit.redis_store import RedisStore

    return RedisStore(server.url, prefix="test:", **kwargs)


# Requests: GCRA --------------------------------------------------------------------------------------


def test_burst_counts_down_then_denies_with_retry_after_one_interval(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store: RateStore = h.store()
        limits = Limits(requests_per_minute=RPM_1S, burst=5)
        for remaining in (4, 3, 2, 1, 0):
            decision = await store.admit([("key:a", limits)])
            assert decision.allowed
            assert (decision.requests_limit, decision.requests_remaining) == (5, remaining)
        assert decision.requests_reset == h.approx(5.0)  # five intervals until the burst is whole again
        denied = await store.admit([("key:a", limits)])
        assert (denied.allowed, denied.reason, denied.scope) == (False, "requests", "key:a")
        assert denied.retry_after == h.approx(1.0)
        assert (denied.requests_limit, denied.requests_remaining) == (5, 0)
        assert denied.leases == []

    harness.run(scenario)


def test_default_burst_is_one_minute_allowance_at_least_one(harness: Harness) -> None:
    assert Limits(requests_per_minute=3).request_capacity == 3
    assert Limits(requests_per_minute=0.5).request_capacity == 1
    assert Limits(requests_per_minute=90.7).request_capacity == 90

    async def scenario(h: Harness) -> None:
        store = h.store()
        limits = Limits(requests_per_minute=3)
        results = [(await store.admit([("k", limits)])).allowed for _ in range(4)]
        assert results == [True, True, True, False]

    harness.run(scenario)


def test_requests_refill_one_interval_at_a_time(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        limits = Limits(requests_per_minute=300, burst=2)  # T = 0.2 s
        assert (await store.admit([("k", limits)])).allowed
        assert (await store.admit([("k", limits)])).allowed
        denied = await store.admit([("k", limits)])
        assert not denied.allowed and 0 < denied.retry_after <= 0.2 + 1e-9
        await h.advance(denied.retry_after + 0.01)
        again = await store.admit([("k", limits)])
        assert again.allowed and again.requests_remaining == 0
        assert not (await store.admit([("k", limits)])).allowed
        await h.advance(0.5)  # idle for longer than the burst takes to refill: whole again
        assert (await store.admit([("k", limits)])).requests_remaining == 1

    harness.run(scenario)


def test_empty_checks_admit_without_headers(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        decision = await h.store().admit([])
        assert decision == Decision(allowed=True)
        assert (await h.store().admit([("k", Limits())])).allowed

    harness.run(scenario)


# Concurrency -------------------------------------------------------------------------------------------


def test_concurrency_limit_then_release_frees_a_slot(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        limits = Limits(max_concurrent=2)
        first = await store.admit([("k", limits)])
        second = await store.admit([("k", limits)])
        assert first.allowed and second.allowed
        assert len(first.leases) == 1 and first.leases[0][0] == "k" and first.leases != second.leases
        denied = await store.admit([("k", limits)])
        assert (denied.allowed, denied.reason, denied.scope, denied.leases) == (False, "concurrency", "k", [])
        assert denied.retry_after > 0
        await store.release(first.leases)
        third = await store.admit([("k", limits)])
        assert third.allowed
        await store.release(first.leases)  # releasing twice frees nothing more
        assert not (await store.admit([("k", limits)])).allowed
        await store.release(second.leases + third.leases)
        await store.release([])

    harness.run(scenario)


def test_concurrency_denial_consumes_no_request_slot(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        limits = Limits(requests_per_minute=RPM_1S, burst=2, max_concurrent=1)
        held = await store.admit([("k", limits)])
        assert held.allowed and held.requests_remaining == 1
        for _ in range(3):
            assert (await store.admit([("k", limits)])).reason == "concurrency"
        await store.release(held.leases)
        last = await store.admit([("k", limits)])
        assert last.allowed and last.requests_remaining == 0

    harness.run(scenario)


def test_global_denial_consumes_nothing_of_the_key(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        key = ("key:ab12", Limits(requests_per_minute=RPM_1S, burst=3, max_concurrent=5, tokens_per_minute=100))
        world = ("global", Limits(requests_per_minute=RPM_1S, burst=1))
        first = await store.admit([key, world], reserve_tokens=10)
        assert first.allowed and [scope for scope, _ in first.leases] == ["key:ab12"]
        assert (first.requests_limit, first.requests_remaining) == (3, 2)  # the key's, which comes first
        assert (first.tokens_limit, first.tokens_remaining) == (100, 90)
        for _ in range(3):
            denied = await store.admit([key, world], reserve_tokens=10)
            assert (denied.allowed, denied.reason, denied.scope) == (False, "requests", "global")
            assert (denied.requests_remaining, denied.tokens_remaining) == (2, 90)  # still the key's view
        alone = await store.admit([key], reserve_tokens=10)
        assert (alone.requests_remaining, alone.tokens_remaining) == (1, 80)
        await store.release(first.leases + alone.leases)

    harness.run(scenario)


def test_checks_run_budget_tokens_concurrency_requests_and_scopes_in_order(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        assert (await store.admit([("s", Limits(requests_per_minute=RPM_1S, burst=1))])).allowed
        await store.charge([("s", Limits(tokens_per_minute=100))], tokens=1000, usd=0.0)
        everything = {"requests_per_minute": RPM_1S, "burst": 1, "max_concurrent": 0, "tokens_per_minute": 100,
                      "budget_tokens": 0, "budget_period": "day"}
        for reason, dropped in (("budget", ()), ("tokens", ("budget_tokens", "budget_period")),
                                ("concurrency", ("tokens_per_minute",)), ("requests", ("max_concurrent",))):
            for name in dropped:
                everything.pop(name)
            checks = [("ok", Limits()), ("s", Limits(**everything)), ("t", Limits(max_concurrent=0))]
            decision = await store.admit(checks)
            assert (decision.allowed, decision.reason, decision.scope) == (False, reason, "s")
        first = await store.admit([("t", Limits(max_concurrent=0)), ("s", Limits(**everything))])
        assert (first.reason, first.scope) == ("concurrency", "t")

    harness.run(scenario)


# Tokens -------------------------------------------------------------------------------------------------


def test_tokens_charged_below_zero_deny_until_refilled_and_refunds_cap_at_capacity(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        limits = Limits(tokens_per_minute=6000)  # 100 tokens a second
        check = [("k", limits)]
        fresh = await store.admit(check)
        assert (fresh.tokens_limit, fresh.tokens_remaining, fresh.tokens_reset) == (6000, 6000, 0.0)
        await store.charge(check, tokens=6020, usd=0.0)
        denied = await store.admit(check)
        assert (denied.allowed, denied.reason, denied.tokens_remaining) == (False, "tokens", 0)
        assert denied.retry_after == h.approx(0.2)
        assert denied.tokens_reset == h.approx(60.2)
        await h.advance(denied.retry_after + 0.02)
        assert (await store.admit(check)).allowed
        await store.charge(check, tokens=-100_000, usd=0.0)  # a refund fills the bucket, never more
        assert (await store.admit(check)).tokens_remaining == 6000
        await store.charge(check, tokens=1000, usd=0.0)
        await store.charge(check, tokens=-500, usd=0.0)
        assert (await store.admit(check)).tokens_remaining == pytest.approx(5500, abs=20)
        await store.charge(check, tokens=-100_000, usd=0.0)
        full = await store.admit(check)
        assert (full.tokens_remaining, full.tokens_reset) == (6000, 0.0)

    harness.run(scenario)


def test_reserved_tokens_must_be_in_the_bucket_unless_more_than_it_holds(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        check = [("k", Limits(tokens_per_minute=100))]  # 100/60 tokens a second
        first = await store.admit(check, reserve_tokens=60)
        assert first.allowed and first.tokens_remaining == 40
        denied = await store.admit(check, reserve_tokens=60)
        assert (denied.reason, denied.tokens_remaining) == ("tokens", 40)
        assert denied.retry_after == h.approx(12.0)  # 20 tokens short
        assert (await store.admit(check)).allowed  # without a reservation any positive level passes
        # The request used 50 of the 60 it reserved: 10 come back.
        await store.charge(check, tokens=50, usd=0.0, reserved=60)
        assert (await store.admit(check)).tokens_remaining == 50
        # More than the capacity passes only on a full bucket, or it would never pass.
        too_big = await store.admit(check, reserve_tokens=500)
        assert (too_big.reason, too_big.retry_after) == ("tokens", h.approx(30.0))
        big = await store.admit([("other", Limits(tokens_per_minute=100))], reserve_tokens=500)
        assert big.allowed and big.tokens_remaining == 0 and big.tokens_reset == h.approx(300.0)
        after = await store.admit([("other", Limits(tokens_per_minute=100))])
        assert (after.reason, after.retry_after) == ("tokens", h.approx(240.0))

    harness.run(scenario)


# Budgets ------------------------------------------------------------------------------------------------


def test_budget_in_tokens_denies_until_the_period_ends(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        check = [("k", Limits(budget_tokens=1000, budget_period="day"))]
        assert (await store.admit(check)).allowed
        await store.charge(check, tokens=999, usd=0.0)
        assert (await store.admit(check)).allowed
        await store.charge(check, tokens=1, usd=0.0)
        denied = await store.admit(check)
        assert (denied.allowed, denied.reason, denied.scope) == (False, "budget", "k")
        assert denied.retry_after == pytest.approx(h.to_period_end("day"), abs=2.0)
        assert (await store.admit([("other", Limits(budget_tokens=1000, budget_period="day"))])).allowed

    harness.run(scenario)


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_budget_in_usd_denies_until_the_period_ends(harness: Harness, period: str) -> None:
    async def scenario(h: Harness) -> None:
        store = h.store()
        check = [("k", Limits(budget_usd=1.0, budget_period=period))]
        await store.charge(check, tokens=10, usd=0.5)
        assert (await store.admit(check)).allowed
        await store.charge(check, tokens=10, usd=0.5)
        denied = await store.admit(check)
        assert denied.reason == "budget"
        assert denied.retry_after == pytest.approx(h.to_period_end(period), abs=2.0)
        assert (await store.admit([("k", Limits(budget_usd=1.01, budget_period=period))])).allowed

    harness.run(scenario)


@pytest.mark.parametrize(("period", "start", "end"), [
    ("day", utc(2024, 3, 6), utc(2024, 3, 7)),
    ("week", utc(2024, 3, 4), utc(2024, 3, 11)),  # ISO weeks start on Monday
    ("month", utc(2024, 3, 1), utc(2024, 4, 1)),
])
def test_memory_budget_resets_when_the_period_ends(period: str, start: float, end: float) -> None:
    harness = Harness("memory", None)

    async def scenario(h: Harness) -> None:
        store = h.store()
        check = [("k", Limits(budget_tokens=100, budget_usd=5.0, budget_period=period))]
        await store.charge(check, tokens=100, usd=0.0)
        assert (await store.admit(check)).retry_after == end - h.wall
        await h.advance(end - 1 - h.wall)
        assert (await store.admit(check)).retry_after == pytest.approx(1.0)
        await h.advance(1.0)
        assert (await store.admit(check)).allowed
        await store.charge(check, tokens=0, usd=5.0)  # the dollar cap alone denies too
        assert (await store.admit(check)).reason == "budget"
        assert start < WALL < end

    harness.run(scenario)


@pytest.mark.parametrize(("moment", "period", "start", "end"), [
    (utc(2024, 2, 29, 23, 59, 59), "month", utc(2024, 2, 1), utc(2024, 3, 1)),  # leap day
    (utc(2023, 12, 31, 18), "month", utc(2023, 12, 1), utc(2024, 1, 1)),
    (utc(2024, 12, 31, 18), "week", utc(2024, 12, 30), utc(2025, 1, 6)),  # a week across new year
    (utc(2024, 3, 10, 23, 59), "week", utc(2024, 3, 4), utc(2024, 3, 11)),  # Sunday is the week's last day
    (utc(2024, 3, 11), "week", utc(2024, 3, 11), utc(2024, 3, 18)),
    (utc(1970, 1, 1), "week", utc(1969, 12, 29), utc(1970, 1, 5)),
    (utc(2024, 3, 6, 0, 0, 0), "day", utc(2024, 3, 6), utc(2024, 3, 7)),
])
def test_period_bounds(moment: float, period: str, start: float, end: float) -> None:
    assert period_bounds(period, moment) == (start, end)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budget_tokens": 10}, "budget_period"),
    ({"budget_usd": 1.0, "budget_period": "year"}, "budget_period"),
    ({"requests_per_minute": 0}, "requests_per_minute"),
    ({"requests_per_minute": 10, "burst": 0}, "burst"),
    ({"tokens_per_minute": 0}, "tokens_per_minute"),
    ({"max_concurrent": -1}, "max_concurrent"),
    ({"budget_usd": -1.0, "budget_period": "day"}, "budget_usd"),
])
def test_impossible_limits_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)


# Memory store only -----------------------------------------------------------------------------------


def test_memory_store_never_suspends() -> None:
    store = MemoryStore()
    check = [("k", Limits(requests_per_minute=10, max_concurrent=1, tokens_per_minute=10, budget_usd=1.0,
                          budget_period="day"))]
    for coroutine in (store.admit(check, 1), store.charge(check, 1, 0.1), store.release([("k", "x")]), store.close()):
        with pytest.raises(StopIteration):
            coroutine.send(None)  # runs to the end at once: nothing can interleave on the event loop


def test_memory_store_forgets_idle_scopes() -> None:
    harness = Harness("memory", None)

    async def scenario(h: Harness) -> None:
        store = h.store()
        assert (await store.admit([("never", Limits())])).allowed
        assert "never" not in store._scopes  # nothing to remember: no state at all
        held = await store.admit([("busy", Limits(max_concurrent=1))])
        await store.admit([("rate", Limits(requests_per_minute=60))])
        await store.charge([("spent", Limits(budget_tokens=10, budget_period="day"))], 5, 0.0)
        await h.advance(120.0)
        await store.admit([])
        assert set(store._scopes) == {"busy", "spent"}  # a lease held, and a budget of the current day
        await store.release(held.leases)
        await h.advance(24 * 3600.0)
        await store.admit([])
        assert store._scopes == {}

    harness.run(scenario)


# Redis store only ---------------------------------------------------------------------------------------


def test_redis_instances_share_limits(redis_harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        one, two = h.store(), h.store()
        limits = Limits(requests_per_minute=RPM_1S, burst=5)
        allowed = [(await store.admit([("k", limits)])).allowed for store in (one, two) * 5]
        assert allowed.count(True) == 5
        held = await one.admit([("c", Limits(max_concurrent=1))])
        assert (await two.admit([("c", Limits(max_concurrent=1))])).reason == "concurrency"
        await one.release(held.leases)
        assert (await two.admit([("c", Limits(max_concurrent=1))])).allowed

    redis_harness.run(scenario)


def test_redis_concurrent_admissions_never_exceed_the_burst(redis_harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        stores = [h.store() for _ in range(4)]
        limits = Limits(requests_per_minute=RPM_1S, burst=7, max_concurrent=20)
        decisions = await asyncio.gather(*(stores[i % 4].admit([("k", limits)]) for i in range(40)))
        assert sum(d.allowed for d in decisions) == 7
        assert sorted(d.requests_remaining for d in decisions if d.allowed) == list(range(7))

    redis_harness.run(scenario)


def test_redis_lease_of_a_crashed_instance_expires(redis_harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        crashed, survivor = h.store(lease_ttl=0.5), h.store(lease_ttl=0.5)
        limits = Limits(max_concurrent=1)
        assert (await crashed.admit([("k", limits)])).allowed
        await crashed.close()  # renewal stops, the lease is never released
        started = time.monotonic()
        assert (await survivor.admit([("k", limits)])).reason == "concurrency"
        while not (decision := await survivor.admit([("k", limits)])).allowed:
            assert time.monotonic() - started < 2.0, "the lease never expired"
            await asyncio.sleep(0.02)
        assert time.monotonic() - started > 0.3
        await survivor.release(decision.leases)

    redis_harness.run(scenario)


def test_redis_renewal_keeps_a_lease_past_its_ttl(redis_harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        holder, other = h.store(lease_ttl=0.5), h.store(lease_ttl=0.5)
        limits = Limits(max_concurrent=1)
        held = await holder.admit([("k", limits)])
        for _ in range(6):  # 1.2 s: more than twice the TTL
            await asyncio.sleep(0.2)
            assert (await other.admit([("k", limits)])).reason == "concurrency"
        await holder.release(held.leases)
        assert (await other.admit([("k", limits)])).allowed

    redis_harness.run(scenario)


def test_redis_keys_expire_when_idle(redis_harness: Harness) -> None:
    import redis

    async def scenario(h: Harness) -> None:
        store = h.store(lease_ttl=0.5)
        check = [("k", Limits(requests_per_minute=600, burst=1, max_concurrent=1, tokens_per_minute=6000,
                              budget_tokens=10, budget_period="day"))]
        decision = await store.admit(check, reserve_tokens=10)
        await store.charge(check, tokens=10, usd=0.0, reserved=10)
        client = redis.Redis.from_url(h.server.url, decode_responses=True)
        day_start, day_end = period_bounds("day", time.time())
        budget_key = f"test:bg:k:{day_start}"
        assert 0 < client.pttl("test:rq:k") <= 102
        assert 0 < client.pttl("test:tk:k") <= 102
        assert 0 < client.pttl("test:cc:k") <= 502
        assert client.ttl(budget_key) == pytest.approx(day_end + 86400 - time.time(), abs=2)
        await store.release(decision.leases)
        await asyncio.sleep(0.15)
        assert client.exists("test:rq:k", "test:tk:k") == 0
        client.close()

    redis_harness.run(scenario)


def test_redis_period_bounds_match_python(redis_harness: Harness) -> None:
    """The scripts' calendar arithmetic against datetime, on edges and random moments over 200 years."""
    import redis

    from llmproxy.ratelimit.redis_store import _LUA_COMMON

    client = redis.Redis.from_url(redis_harness.server.url, decode_responses=True)
    script = client.register_script(_LUA_COMMON + "local a, b = period_bounds(ARGV[1], tonumber(ARGV[2]))"
                                                  " return {a, b}")
    rng = random.Random(7)
    moments = [utc(y, m, 1) + d for y in (1999, 2000, 2023, 2024, 2100) for m in (1, 2, 3, 12) for d in (-1, 0, 1)]
    moments += [rng.uniform(0, utc(2170, 1, 1)) for _ in range(300)]
    for moment in moments:
        for period in ("day", "week", "month"):
            assert tuple(script(args=[period, repr(moment)])) == period_bounds(period, moment), (period, moment)
    client.close()


def test_redis_down_is_store_unavailable_within_the_timeout_and_recovers(redis_harness: Harness) -> None:
    server = redis_harness.server

    async def scenario(h: Harness) -> None:
        store = h.store(timeout=0.5)
        check = [("k", Limits(requests_per_minute=RPM_1S, burst=10, max_concurrent=5, tokens_per_minute=100))]
        held = await store.admit(check)
        server.kill()
        try:
            # A release, which nobody waits on, is tried again for RELEASE_RETRY_FOR before it gives up too.
            for call, within in ((lambda: store.admit(check), 0.8), (lambda: store.charge(check, 1, 0.0), 0.8),
                                 (lambda: store.release(held.leases), RELEASE_RETRY_FOR + 0.8)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - started < within
        finally:
            server.start()
        decision = await store.admit(check)  # the very first call after the restart: scripts loaded again
        assert decision.allowed and decision.requests_remaining == 9  # a new, empty Redis
        await store.release(decision.leases)

    redis_harness.run(scenario)


def test_redis_hung_is_store_unavailable_within_the_timeout(redis_harness: Harness) -> None:
    server = redis_harness.server

    async def scenario(h: Harness) -> None:
        store = h.store(timeout=0.3)
        check = [("k", Limits(requests_per_minute=RPM_1S, burst=10))]
        assert (await store.admit(check)).allowed
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.admit(check)
            assert time.monotonic() - started < 0.6
        finally:
            server.resume()
        assert (await store.admit(check)).allowed

    redis_harness.run(scenario)


def test_a_cluster_with_no_node_reachable_is_store_unavailable() -> None:
    """redis-py's cluster errors are no RedisError: they must still be a store error, which on_store_error
    decides, and not an exception through the admission."""
    from llmproxy.ratelimit.redis_store import RedisStore

    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}", cluster=True, timeout=0.3)
        try:
            with pytest.raises(StoreUnavailable, match="cannot be connected"):
                await store.admit([("key:a", Limits(requests_per_minute=60))])
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_prepare_connects_ahead_of_the_first_call_and_only_logs_when_redis_is_away(
        redis_harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_harness.server

    async def scenario(h: Harness) -> None:
        store = h.store()
        await store.prepare()
        assert "not reachable" not in caplog.text
        server.kill()
        try:
            await h.store(timeout=0.3).prepare()  # does not raise: admissions will try again
            assert "not reachable" in caplog.text
        finally:
            server.start()

    redis_harness.run(scenario)


def test_a_release_outlasts_a_hung_moment_that_an_admission_would_not(redis_harness: Harness) -> None:
    """Nobody waits on a release: one that meets Redis hung for longer than the admission timeout still frees
    the slot once Redis answers, instead of leaving the lease held until it expires."""
    server = redis_harness.server

    async def scenario(h: Harness) -> None:
        store = h.store(timeout=0.3)
        check = [("k", Limits(max_concurrent=1))]
        first = await store.admit(check)
        assert first.allowed
        server.pause()
        try:
            release = asyncio.ensure_future(store.release(first.leases))
            await asyncio.sleep(1.0)
            assert not release.done()
        finally:
            server.resume()
        await asyncio.wait_for(release, timeout=5)
        assert (await store.admit(check)).allowed

    redis_harness.run(scenario)


def test_redis_store_without_redis_py_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmproxy.ratelimit.redis_store import RedisStore

    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'llmproxy\[redis\]'"):
        RedisStore("redis://127.0.0.1:1/0")


def test_a_plain_client_on_a_cluster_node_is_unavailable_with_a_hint(redis_cluster: Any) -> None:
    """Without rate_limit.cluster the scripts' keys span slots: refused (CROSSSLOT), and the error says what to set."""
    from llmproxy.ratelimit.redis_store import RedisStore

    async def scenario() -> None:
        store = RedisStore(redis_cluster.url.split(",")[0], prefix="test:")
        try:
            with pytest.raises(StoreUnavailable, match=r"set rate_limit\.cluster: true"):
                await store.admit([("key:a", Limits(requests_per_minute=60)), ("global", Limits(max_concurrent=5))])
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
