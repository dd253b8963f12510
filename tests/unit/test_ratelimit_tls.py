"""The shared store over TLS: rediss:// to a redis-server that speaks only TLS, and rediss+sentinel:// to a
Sentinel set-up where the Sentinels, the master and the replica all do, through a failover. Certificates are
self-signed, made by openssl for the test (tests/redis_server.py's Tls)."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy.ratelimit.redis_store import RedisStore
from llmproxy.ratelimit.store import Limits, StoreUnavailable
from tests.redis_cluster import SentinelSetup, admin
from tests.redis_server import RedisServer, Tls

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Tls:
    return Tls.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tls: Tls):
    with RedisServer(tls=tls) as server:
        yield server


def admitted(url: str, count: int, scope: str = "k") -> int:
    async def run() -> int:
        store = RedisStore(url, prefix="tls:")
        try:
            decisions = [await store.admit([(scope, Limits(requests_per_minute=1, burst=3))]) for _ in range(count)]
        finally:
            await store.close()
        return sum(d.allowed for d in decisions)

    return asyncio.run(run())


def test_rediss_with_the_servers_ca_admits_the_burst(tls_server: RedisServer, tls: Tls) -> None:
    assert admitted(f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={tls.cert}", 5) == 3


def test_rediss_refuses_a_certificate_it_cannot_verify(tls_server: RedisServer) -> None:
    with pytest.raises(StoreUnavailable):
        admitted(f"rediss://127.0.0.1:{tls_server.port}/1", 1)


def test_plain_redis_to_a_tls_port_is_unavailable_not_a_hang(tls_server: RedisServer) -> None:
    with pytest.raises(StoreUnavailable):
        admitted(f"redis://127.0.0.1:{tls_server.port}/1", 1)


def test_rediss_sentinel_finds_the_master_over_tls_before_and_after_a_failover(tls: Tls) -> None:
    limits = Limits(requests_per_minute=1, burst=3)

    async def after_failover(store: RedisStore) -> list[bool]:
        """The same client, once it reaches the new master: the old key's answer, then a fresh key's burst."""
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                first = await store.admit([("k", limits)])
                break
            except StoreUnavailable:
                assert asyncio.get_running_loop().time() < deadline, "the new master was never reached"
                await asyncio.sleep(0.1)
        return [first.allowed] + [(await store.admit([("fresh", limits)])).allowed for _ in range(5)]

    async def scenario(setup: SentinelSetup) -> list[bool]:
        store = RedisStore(setup.url, prefix="tls:")
        try:
            assert [(await store.admit([("k", limits)])).allowed for _ in range(5)] == [True] * 3 + [False] * 2
            old = setup.master()
            with admin(old.port, tls) as client:
                assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has the burst
            old.kill()
            await asyncio.get_running_loop().run_in_executor(None, setup.wait_failover, old)
            return await after_failover(store)
        finally:
            await store.close()

    with SentinelSetup(tls=tls) as setup:
        assert setup.url.startswith("rediss+sentinel://")
        assert asyncio.run(scenario(setup)) == [False] + [True] * 3 + [False] * 2
