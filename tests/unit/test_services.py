"""Services: one immutable snapshot per configuration generation, and what each generation hands the next."""

from __future__ import annotations

import dataclasses

import pytest

from tests.fakes import backend, make_config, make_lasting, make_services, running

KEY = "sk-services-test-key-0001"
LIMITED = {"enabled": True, "global": {"requests_per_minute": 60}}


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def test_a_generation_is_frozen():
    with running() as loop:
        services = make_services(make_config(), loop)
        with pytest.raises(dataclasses.FrozenInstanceError):
            services.prices = {}  # type: ignore[misc]


def test_the_next_generation_counts_on_and_keeps_what_outlives_a_reload(loop):
    first = make_services(make_config(), loop)
    config = make_config(backends=[backend("a"), backend("b")], pricing={"m": {"input_per_million": 1,
                                                                              "output_per_million": 2}})
    second = make_services(config, loop, previous=first)
    assert (first.generation, second.generation) == (1, 2)
    assert second.lasting is first.lasting  # metrics, access log, outbox, sweeper, traffic, recounter
    assert (second.metrics, second.outbox, second.traffic, second.relay) == (
        first.metrics, first.outbox, first.traffic, first.relay)
    assert [b.name for b in second.fleet.backends] == ["a", "b"] and first.fleet is not second.fleet
    assert second.fleet.backends[0] is first.fleet.backends[0]  # same settings: the same warm backend
    assert first.prices == {} and set(second.prices) == {"m"}  # the old generation is untouched


def test_keys_and_header_rules_are_the_generations_own(loop):
    first = make_services(make_config(auth={"enabled": True, "keys": [{"key": KEY}], "header_names": ["X-Key"]}),
                          loop)
    second = make_services(make_config(), loop, previous=first)
    assert first.keys.enabled and not second.keys.enabled
    assert first.headers.credential_headers == frozenset({b"x-key"})
    assert second.headers.credential_headers == frozenset({b"authorization", b"x-api-key"})


@pytest.mark.parametrize(("before", "after", "same_store"), [
    (LIMITED, {**LIMITED, "global": {"requests_per_minute": 5}}, True),  # new limits, the same counters
    (LIMITED, {"enabled": False}, None),  # off: no limiter
    ({"enabled": False}, LIMITED, False),  # on: a store of its own
])
def test_the_limiter_keeps_its_store_across_a_reload(loop, before, after, same_store):
    first = make_services(make_config(rate_limit=before), loop)
    second = make_services(make_config(rate_limit=after), loop, previous=first)
    if same_store is None:
        assert second.limiter is None
    elif same_store:
        assert second.limiter.store is first.limiter.store and second.limiter is not first.limiter
        assert second.limiter.config.global_limits.requests_per_minute == 5
    else:
        assert first.limiter is None and second.limiter is not None


def test_trusted_proxies_are_the_started_ones(loop):
    config = make_config(server={"trusted_proxies": ["10.0.0.0/8"]})
    lasting = make_lasting(config, loop)
    services = make_services(make_config(server={"trusted_proxies": []}), loop, lasting=lasting)
    assert services.headers.is_trusted_proxy("10.1.2.3")  # server.* needs a restart: a reload keeps these


def test_a_reload_keeps_the_redis_store_and_its_cluster_setting(loop, caplog):
    """rate_limit.store, redis_url and cluster need a restart: a reload that changes cluster keeps the old."""
    redis = {**LIMITED, "store": "redis", "redis_url": "redis://127.0.0.1:1,127.0.0.1:2", "cluster": True}
    first = make_services(make_config(rate_limit=redis), loop)
    plain = {**redis, "cluster": False, "redis_url": "redis://127.0.0.1:1"}
    second = make_services(make_config(rate_limit=plain), loop, previous=first)
    assert second.limiter.store is first.limiter.store and second.limiter.config.cluster is True
    assert second.limiter.config.redis_url == redis["redis_url"]
    assert "need a restart" in caplog.text
    loop.run_until_complete(first.limiter.close())
