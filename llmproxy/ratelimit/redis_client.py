"""The redis-py client of the shared store: one server, a master watched by Sentinel, or a Redis Cluster.

Whichever it is, the store sees one `redis.asyncio` client that runs scripts and pipelines; failing over is
the client's business. A Sentinel-managed client asks the Sentinels where the master is whenever it opens a
connection, and drops a connection whose server was demoted (READONLY); a Cluster client follows MOVED
replies and reloads the slot map after a node failed. Until the new master answers, calls fail and the
store's caller applies `on_store_error`.

On a Cluster every key of the store carries one hash tag (`{llmproxy}:...`), so all of them live in one
slot: a script may touch only keys of one slot, and an admission checks the key's scope and the global one
at once. See `hash_tagged`.
"""

from __future__ import annotations

from typing import Any

from llmproxy.config.redis_url import RedisTarget


def hash_tagged(prefix: str) -> str:
    """The key prefix as a Cluster hash tag: "llmproxy:" -> "{llmproxy}:", so every key maps to one slot.

    One slot for everything rather than one per scope: with global limits every admission touches the
    global scope's keys, so one master serves every admission whatever the tags, and one slot keeps each
    admission a single atomic script. The keys the scripts build themselves (a budget's period key, from
    its KEYS prefix) carry the same tag, so they are in the same slot too.
    """
    return "{" + prefix.rstrip(":") + "}:"


def connect(target: RedisTarget, timeout: float, decode_responses: bool = True) -> Any:
    """A redis.asyncio client for `target` whose every socket operation gives up after `timeout` seconds;
    replies are text unless `decode_responses` is False (the response cache stores bytes)."""
    import redis.asyncio as redis_asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "decode_responses": decode_responses}
    # One immediate retry: a pooled connection found dead after a restart or a failover is replaced at
    # once, so the first call after it already succeeds. The store's own deadline still bounds the pair.
    retry = Retry(NoBackoff(), 1)
    if target.kind == "server":
        return redis_asyncio.Redis.from_url(target.url, retry=retry, **common)
    auth = {"username": target.username, "password": target.password, **_tls(target)}
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinels = Sentinel(list(target.hosts), sentinel_kwargs={**common, **_tls(target)}, **common)
        return sentinels.master_for(target.master, db=target.db, retry=retry, **auth, **common)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    # The store's keys are in one slot: a slot map with holes elsewhere (a master down, not yet replaced)
    # must not stop the client from using it.
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
                        require_full_coverage=False, retry=Retry(NoBackoff(), 2), **auth, **common)


def _tls(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    return {"ssl": True, **target.tls_options}
