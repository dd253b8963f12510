"""A DNS server on a loopback UDP port, inside the test process (dnslib), whose records a test changes.

`records` maps a name to its addresses (IPv4 and IPv6 alike); a name it does not hold is NXDOMAIN; with
`failing` set, every query gets SERVFAIL. dnslib truncates a UDP answer over 512 bytes (it ignores EDNS), so a
name of many addresses is asked again over TCP: start(tcp=True) serves TCP on the same port number too.
"""

from __future__ import annotations

import ipaddress
import threading

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

TTL = 1


class _Records(BaseResolver):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[str]] = {}
        self.failing = False
        self.queries = 0

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            self.queries += 1
            if self.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            addresses = self.records.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in addresses:
            version = ipaddress.ip_address(address).version
            if version == 4 and request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=TTL))
            elif version == 6 and request.q.qtype == QTYPE.AAAA:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=TTL))
        return reply


class _QuietLogger:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class TestDnsServer:
    """Started on 127.0.0.1 (an ephemeral UDP port) by start(); stop() ends its thread."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self) -> None:
        self.resolver = _Records()
        self._servers: list[DNSServer] = []
        self.port = 0

    def start(self, tcp: bool = False) -> TestDnsServer:
        for _ in range(10):  # the UDP port's number may be taken for TCP: try another
            udp = DNSServer(self.resolver, port=0, address="127.0.0.1", logger=_QuietLogger())
            self.port = udp.server.server_address[1]
            self._servers = [udp]
            if not tcp:
                break
            try:
                self._servers.append(DNSServer(self.resolver, port=self.port, address="127.0.0.1", tcp=True,
                                               logger=_QuietLogger()))
                break
            except OSError:
                udp.server.server_close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        for server in self._servers:
            server.start_thread()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        with self.resolver.lock:
            self.resolver.records[name] = list(addresses)

    def fail(self, failing: bool = True) -> None:
        with self.resolver.lock:
            self.resolver.failing = failing

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers = []
