"""`rate_limit.redis_url`: which Redis the shared store talks to, and how, read from one URL.

    redis://[[user]:password@]host[:port][/db]           one server (or a load balancer in front of one)
    rediss://...                                          the same over TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]  a local socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master name>[/db]
    rediss+sentinel://...                                 Sentinel, master and replicas over TLS
    with rate_limit.cluster: true, redis:// or rediss:// naming one or more nodes of a Redis Cluster:
    redis://[[user]:password@]host[:port][,host[:port]...]

Sentinels listen on 26379 by default, data nodes on 6379. The credentials are the data nodes' (master,
replicas, cluster nodes); Sentinels are asked without any. TLS options go in the query string: ssl_ca_certs,
ssl_certfile, ssl_keyfile (paths), ssl_cert_reqs (none | optional | required). Nothing is connected here:
a bad URL is refused when the config loads, naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

SENTINEL_PORT = 26379
REDIS_PORT = 6379
_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("none", "optional", "required")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed redis_url. `kind` is "server" (redis://, rediss://, unix://), "sentinel" or "cluster"."""

    kind: str
    url: str  # as configured: a "server" URL is handed to redis-py's from_url unchanged
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster start-up nodes
    master: str = ""  # the Sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: dict[str, str] = field(default_factory=dict)


def parse_redis_url(url: str, cluster: bool = False) -> RedisTarget:
    """The target `url` names; raises ValueError saying what is wrong."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in _SCHEMES)}")
    scheme = scheme.lower()
    sentinel = scheme.endswith("+sentinel")
    if cluster and (sentinel or scheme == "unix"):
        raise ValueError(f"a Redis Cluster is named by redis:// or rediss:// URLs of its nodes, not {scheme}://")
    parts = urlsplit(url)
    if not sentinel and not cluster:
        if "," in parts.netloc:
            raise ValueError("names several hosts: for a Redis Cluster set rate_limit.cluster: true, "
                             "for Sentinel use redis+sentinel://")
        return RedisTarget("server", url, tls=scheme == "rediss")
    hosts = _hosts(parts.netloc.rpartition("@")[2], SENTINEL_PORT if sentinel else REDIS_PORT)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if sentinel:
        if not path:
            raise ValueError("needs the master's name as its path: redis+sentinel://host:26379/mymaster")
        master, db = path[0], _db(path[1:])
    else:
        master, db = "", _db(path)
        if db != 0:
            raise ValueError("a Redis Cluster has only database 0")
    return RedisTarget("sentinel" if sentinel else "cluster", url, hosts, master, db,
                       unquote(parts.username) if parts.username else None,
                       unquote(parts.password) if parts.password is not None else None,
                       scheme.startswith("rediss"), _tls_options(parts.query))


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in netloc.split(","):
        host, port = item, default_port
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), item)
        elif ":" in item:
            host, _, text = item.rpartition(":")
            port = _port(text, item)
        if not host:
            raise ValueError(f"names no host in {item!r}" if item else "names no host")
        hosts.append((host, port))
    return tuple(hosts)


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {item!r}")
    return int(text)


def _db(path: list[str]) -> int:
    if not path:
        return 0
    if len(path) > 1 or not path[0].isdigit():
        raise ValueError(f"expected a database number after the host(s), got {'/'.join(path)!r}")
    return int(path[0])


def _tls_options(query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_TLS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(_TLS_OPTIONS)})")
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return options
