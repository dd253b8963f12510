"""The limiter (llmproxy/ratelimit/) and the auth/rate_limit config, without sockets.

The key ring is tested in test_auth.py, keygen in test_keygen.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace
from typing import Any

import pytest

from llmproxy.config import ConfigError, parse_config
from llmproxy.errors import ProxyError
from llmproxy.ratelimit import Limiter, limits_for, rate_headers
from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.store import Decision, Limits, StoreUnavailable

KEY = "sk-unit-test-key-0123456789"
BACKENDS = [{"url": "http://b"}]


def config(**sections: Any):
    return parse_config({"backends": BACKENDS, **sections})


# --- auth and rate_limit config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("auth", "rate", "where"), [
    ({"enabled": True}, {}, "auth.keys"),
    ({"keys": [{"key": "short"}]}, {}, "auth.keys[0].key"),
    ({"keys": [{"key": KEY, "key_sha256": "ab"}]}, {}, "auth.keys[0]"),
    ({"keys": [{"key_sha256": "xyz"}]}, {}, "auth.keys[0].key_sha256"),
    ({"keys": [{"key": KEY}, {"key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}, {}, "auth.keys[1]"),
    ({"header_names": ["Bad Header"]}, {}, "auth.header_names[0]"),
    ({"skip_paths": ["health"]}, {}, "auth.skip_paths[0]"),
    ({}, {"enabled": True, "per_key": {"requests_per_minute": 5}}, "rate_limit.per_key"),
    ({}, {"enabled": True, "store": "redis"}, "rate_limit.redis_url"),
    ({}, {"enabled": True, "global": {"budget": {"per": "year", "tokens": 5}}}, "rate_limit.global.budget.per"),
    ({}, {"enabled": True, "global": {"budget": {"per": "day"}}}, "rate_limit.global.budget"),
])
def test_bad_access_config_names_the_key(auth: dict, rate: dict, where: str):
    with pytest.raises(ConfigError) as error:
        config(auth=auth, rate_limit=rate)
    assert error.value.path == where


def test_workers_with_the_memory_store_are_refused_and_need_metering_for_tokens():
    with pytest.raises(ConfigError) as error:
        config(server={"workers": 2}, rate_limit={"enabled": True, "global": {"max_concurrent": 5}})
    assert error.value.path == "server.workers" and "redis" in error.value.reason
    with pytest.raises(ConfigError) as error:
        config(usage={"metering": False}, rate_limit={"enabled": True, "global": {"tokens_per_minute": 5}})
    assert error.value.path == "rate_limit"


def test_a_keys_override_replaces_only_the_fields_it_sets():
    cfg = config(auth={"enabled": True, "keys": [{"key": KEY, "rate_limit": {"max_concurrent": 9}}]},
                 rate_limit={"enabled": True, "per_key": {"requests_per_minute": 60, "max_concurrent": 2,
                                                          "budget": {"usd": 5, "per": "month"}}})
    assert limits_for(cfg.rate_limit.per_key, cfg.auth.keys[0].rate_limit) == Limits(
        requests_per_minute=60, max_concurrent=9, budget_usd=5, budget_period="month")


# --- limiter ----------------------------------------------------------------------------------------------


BODY = {"max_tokens": 50}


def _limiter(store, **rate: Any) -> Limiter:
    cfg = config(rate_limit={"enabled": True, "global": {"requests_per_minute": 60, "burst": 2,
                                                          "max_concurrent": 5}, **rate})
    metrics = SimpleNamespace(limited=[], errors=0)
    metrics.observe_ratelimited = lambda reason, key_id: metrics.limited.append(reason)

    def store_error() -> None:
        metrics.errors += 1

    metrics.observe_store_error = store_error
    return Limiter(cfg.rate_limit, store, metrics, False)


def test_admission_sets_headers_refusal_raises_429_and_settle_gives_slots_back():
    async def run() -> None:
        limiter = _limiter(MemoryStore())
        first = await limiter.admit(None, BODY)
        # OpenAI's meaning: the limit is per minute (60), remaining what may be sent now (burst 2, one used)
        assert b"x-ratelimit-limit-requests: 60\r\nx-ratelimit-remaining-requests: 1\r\n" in first.headers
        second = await limiter.admit(None, BODY)
        with pytest.raises(ProxyError) as refused:
            await limiter.admit(None, BODY)
        assert refused.value.spec.status == 429 and refused.value.kind == "rate_limited_requests"
        assert b"retry-after: 1\r\n" in refused.value.headers
        assert b"x-ratelimit-remaining-requests: 0\r\n" in refused.value.headers
        assert limiter.held == 2 and limiter._metrics.limited == ["requests"]
        for admission in (first, second):
            admission.settle({"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": None})
        assert limiter.held == 0

    asyncio.run(run())


class DownStore:
    async def admit(self, checks, reserve_tokens=0):
        raise StoreUnavailable("connection refused")

    async def release(self, leases):
        raise StoreUnavailable("connection refused")

    async def charge(self, checks, tokens, usd, reserved=0):
        raise StoreUnavailable("connection refused")

    async def close(self):
        pass


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_an_unreachable_store_fails_open_or_closed(policy: str):
    async def run() -> None:
        limiter = _limiter(DownStore(), on_store_error=policy)
        if policy == "fail_open":
            assert await limiter.admit(None, BODY) is None
        else:
            with pytest.raises(ProxyError) as error:
                await limiter.admit(None, BODY)
            assert error.value.spec.status == 503
        assert limiter._metrics.errors == 1

    asyncio.run(run())


def test_max_tokens_is_reserved_only_when_asked_and_a_token_limit_exists():
    async def run() -> None:
        limiter = _limiter(MemoryStore(), reserve_max_tokens=True,
                           per_key=None, **{"global": {"tokens_per_minute": 1000}})
        admission = await limiter.admit(None, BODY)
        assert admission.reserved == 50
        assert b"x-ratelimit-remaining-tokens: 950\r\n" in admission.headers

    asyncio.run(run())


@pytest.mark.parametrize(("seconds", "text"), [(0.02, b"20ms"), (1.5, b"1.5s"), (59.0, b"59s"), (360.0, b"6m0s")])
def test_reset_durations_are_written_as_openai_does(seconds: float, text: bytes):
    headers = rate_headers(Decision(True, requests_limit=5, requests_remaining=1, requests_reset=seconds))
    assert b"x-ratelimit-reset-requests: " + text + b"\r\n" in headers
