"""Client addresses let in or kept out: `security.ip_whitelist` / `ip_blacklist`, and a key's `allowed_ips`.

Rules apply to the client's address as the proxy knows it after `server.trusted_proxies`: a connection from
anyone else is judged by its own address when it is accepted (answered 403 before a byte is read), while a
trusted proxy's connection carries many clients, each named by X-Forwarded-For, so each of its requests is
judged when its head has arrived (403 before the body is read and before auth). The client a trusted proxy
forwards for is the right-most X-Forwarded-For address that is not itself a trusted proxy: entries to its
left were written by the client and prove nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_SIZE = 4096  # addresses remembered per list: a busy proxy sees the same clients again and again


class IpList:
    """Addresses and CIDR ranges, IPv4 and IPv6 (an IPv4-mapped IPv6 address is its IPv4 one)."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, entries: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(ipaddress.ip_network(e, strict=False) for e in entries)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: str) -> bool:
        found = self._cache.get(address)
        if found is None:
            found = self._lookup(address)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()  # cheaper than an LRU, and a flood of new addresses only costs lookups
            self._cache[address] = found
        return found

    def _lookup(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])  # a zone (fe80::1%eth0) is not part of it
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket names IPv4 clients ::ffff:a.b.c.d
        return any(ip in network for network in self._networks)


class IpRules:
    """The `security:` section with server.trusted_proxies: who may connect, who may send requests."""

    __slots__ = ("_trusted", "blacklist", "whitelist")

    def __init__(self, whitelist: Iterable[str], blacklist: Iterable[str], trusted_proxies: IpList) -> None:
        """`trusted_proxies`: the generation's one list of them, which the gate reads too."""
        self.whitelist = IpList(whitelist)
        self.blacklist = IpList(blacklist)
        self._trusted = trusted_proxies

    def allows(self, address: str) -> bool:
        """The blacklist wins; an empty whitelist lets in everyone else."""
        if address in self.blacklist:
            return False
        return not self.whitelist or address in self.whitelist

    def judged_at_accept(self, peer: str) -> bool:
        """A connection from `peer` is judged by its own address (not a trusted proxy's connection)."""
        return not (self._trusted and peer in self._trusted)

    def check_request(self, peer: str, head: RequestHead) -> None:
        """For a trusted proxy's connection: raises ProxyError ("ip_forbidden", 403) if the client it forwards
        for may not send requests."""
        client = client_address(peer, head, self._trusted)
        if not self.allows(client):
            raise ProxyError("ip_forbidden", "Your address is not allowed to use this service.",
                             detail=f"client address {client} (via {peer}) not allowed by security rules")


def client_address(peer: str, head: RequestHead, trusted: IpList) -> str:
    """The client's address: `peer`, or for a trusted proxy the right-most X-Forwarded-For entry that is not
    itself a trusted proxy (the left-most when all are)."""
    if not trusted or peer not in trusted:
        return peer
    chain = [part.strip().decode("latin-1") for name, value in head.headers if name == b"x-forwarded-for"
             for part in value.split(b",")]
    client = peer
    for entry in reversed(chain):
        if not entry:
            continue
        client = _strip_port(entry)
        if client not in trusted:
            break
    return client


def _strip_port(entry: str) -> str:
    """"[2001:db8::1]:443" and "192.0.2.1:80" name their address; a bare IPv6 address has colons of its own."""
    if entry.startswith("["):
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:
        return entry.partition(":")[0]
    return entry
