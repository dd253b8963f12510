"""rate_limit.redis_url and rate_limit.cluster (llmproxy/config/redis_url.py), and the Cluster hash tag."""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy.config import ConfigError, parse_config
from llmproxy.config.redis_url import RedisTarget, parse_redis_url
from llmproxy.ratelimit.redis_client import hash_tagged


@pytest.mark.parametrize(("url", "cluster", "expected"), [
    ("redis://127.0.0.1:6379/0", False, RedisTarget("server", "redis://127.0.0.1:6379/0")),
    ("rediss://:pw@redis.internal/2", False, RedisTarget("server", "rediss://:pw@redis.internal/2", tls=True)),
    ("unix:///run/redis.sock?db=1", False, RedisTarget("server", "unix:///run/redis.sock?db=1")),
    ("redis+sentinel://s1,s2:26380,[::1]:5000/mymaster/3", False,
     RedisTarget("sentinel", "redis+sentinel://s1,s2:26380,[::1]:5000/mymaster/3",
                 (("s1", 26379), ("s2", 26380), ("::1", 5000)), "mymaster", 3)),
    ("rediss+sentinel://app:p%40ss@s1/main?ssl_ca_certs=/ca.pem", False,
     RedisTarget("sentinel", "rediss+sentinel://app:p%40ss@s1/main?ssl_ca_certs=/ca.pem", (("s1", 26379),), "main",
                 0, "app", "p@ss", True, {"ssl_ca_certs": "/ca.pem"})),
    ("redis://n1:7000,n2:7001", True, RedisTarget("cluster", "redis://n1:7000,n2:7001", (("n1", 7000), ("n2", 7001)))),
    ("rediss://:secret@n1/0?ssl_cert_reqs=none", True,
     RedisTarget("cluster", "rediss://:secret@n1/0?ssl_cert_reqs=none", (("n1", 6379),), password="secret", tls=True,
                 tls_options={"ssl_cert_reqs": "none"})),
])
def test_redis_urls_name_their_target(url: str, cluster: bool, expected: RedisTarget) -> None:
    assert parse_redis_url(url, cluster) == expected


def config(**rate_limit: Any):
    return parse_config({"backends": [{"url": "http://b"}], "rate_limit": {"enabled": True, **rate_limit}})


@pytest.mark.parametrize(("rate_limit", "where", "reason"), [
    ({"store": "redis", "redis_url": "http://r:6379"}, "rate_limit.redis_url", "must start with one of redis://"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1:26379"}, "rate_limit.redis_url", "master's name"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1/m/x"}, "rate_limit.redis_url", "database number"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1:0/m"}, "rate_limit.redis_url", "bad port"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1,/m"}, "rate_limit.redis_url", "names no host"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1/m?password=x"}, "rate_limit.redis_url", "unknown option"),
    ({"store": "redis", "redis_url": "redis+sentinel://s1/m", "cluster": True}, "rate_limit.redis_url",
     "not redis+sentinel://"),
    ({"store": "redis", "redis_url": "redis://n1:7000/1", "cluster": True}, "rate_limit.redis_url", "only database 0"),
    ({"store": "redis", "redis_url": "rediss://n1?ssl_cert_reqs=maybe", "cluster": True}, "rate_limit.redis_url",
     "ssl_cert_reqs"),
    ({"store": "redis", "redis_url": "redis://n1:7000,n2:7000"}, "rate_limit.redis_url", "rate_limit.cluster: true"),
    ({"store": "memory", "cluster": True}, "rate_limit.cluster", "store: redis only"),
    ({"store": "redis", "redis_url": "redis://n1", "cluster": "yes please"}, "rate_limit.cluster", ""),
])
def test_bad_redis_settings_are_refused_naming_the_key(rate_limit: dict, where: str, reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        config(**rate_limit)
    assert error.value.path == where and reason in error.value.reason


def test_cluster_setting_defaults_off_and_is_kept() -> None:
    assert config(store="redis", redis_url="redis://r").rate_limit.cluster is False
    assert config(store="redis", redis_url="redis://n1:7000,n2:7000", cluster=True).rate_limit.cluster is True


def test_cluster_keys_share_one_hash_tag() -> None:
    assert hash_tagged("llmproxy:") == "{llmproxy}:"
    assert hash_tagged("test") == "{test}:"


def test_each_kind_of_target_gets_its_client_without_connecting() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import SentinelConnectionPool

    from llmproxy.ratelimit.redis_client import connect

    server = connect(parse_redis_url("rediss://127.0.0.1:1/0?ssl_cert_reqs=none"), 0.5)
    assert type(server) is Redis and server.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    sentinel = connect(parse_redis_url("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/main/4"), 0.5)
    pool = sentinel.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main"
    assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "pw"
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [1, 2]
    assert all(s.connection_pool.connection_kwargs.get("password") is None for s in pool.sentinel_manager.sentinels)
    cluster = connect(parse_redis_url("redis://127.0.0.1:1,127.0.0.1:2", cluster=True), 0.5)
    assert isinstance(cluster, RedisCluster)
    assert sorted(node.port for node in cluster.nodes_manager.startup_nodes.values()) == [1, 2]


def test_tls_reaches_every_client_of_a_target() -> None:
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    from llmproxy.ratelimit.redis_client import connect

    sentinel = connect(parse_redis_url("rediss+sentinel://127.0.0.1:1/main?ssl_ca_certs=/ca.pem"), 0.5)
    pool = sentinel.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    for each in pool.sentinel_manager.sentinels:  # the Sentinels are asked over TLS too
        assert each.connection_pool.connection_class is SSLConnection
        assert each.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    cluster = connect(parse_redis_url("rediss://127.0.0.1:1?ssl_cert_reqs=none", cluster=True), 0.5)
    node_kwargs = cluster.nodes_manager.connection_kwargs
    assert node_kwargs["connection_class"] is SSLConnection and node_kwargs["ssl_cert_reqs"] == "none"
