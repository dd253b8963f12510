"""A name's addresses: from the system resolver, or by asking one DNS server ourselves.

Without a server configured, `loop.getaddrinfo` (resolv.conf, so cluster DNS in Kubernetes, and
/etc/hosts). With one, A and AAAA queries go to it over UDP (dnswire.py), again over TCP when the answer
was truncated; each datagram is sent twice at most. Off the request path: once per `interval` per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct

from llmproxy.discovery.dnswire import (
    AAAA,
    NOERROR,
    NXDOMAIN,
    RCODE_NAMES,
    A,
    Answer,
    DnsFormatError,
    decode_answer,
    encode_query,
)

UDP_ATTEMPTS = 2  # a lost datagram is sent once more before the lookup counts as failed
UDP_TIMEOUT = 1.0  # seconds per datagram
TCP_TIMEOUT = 3.0  # seconds for a whole TCP exchange


class ResolveError(Exception):
    """No answer we can use: the last known addresses stay."""


async def resolve(name: str, port: int, server: tuple[str, int] | None) -> tuple[str, ...]:
    """The IPv4 and IPv6 addresses of `name`, sorted (IPv4 first); raises ResolveError when there are none or
    the lookup failed. `server` is the DNS server to ask, None for the system resolver."""
    if server is None:
        addresses = await _system(name, port)
    else:
        answers = await asyncio.gather(_ask(server, name, A), _ask(server, name, AAAA))
        addresses = {address for answer in answers for address in answer.addresses}
    if not addresses:
        raise ResolveError(f"{name} has no A or AAAA record")
    return tuple(sorted(addresses, key=lambda text: (ipaddress.ip_address(text).version,
                                                      ipaddress.ip_address(text))))


async def _system(name: str, port: int) -> set[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ResolveError(f"cannot resolve {name}: {exc.strerror or exc}") from None
    return {str(info[4][0]).partition("%")[0] for info in infos}  # an IPv6 scope id is no part of the address


async def _ask(server: tuple[str, int], name: str, qtype: int) -> Answer:
    query_id = secrets.randbelow(65536)  # random, so a stray or forged datagram rarely matches
    query = encode_query(query_id, name, qtype)
    answer = await _over_udp(server, query, query_id)
    if answer.truncated:
        answer = await _over_tcp(server, query, query_id)
    if answer.rcode not in (NOERROR, NXDOMAIN):
        raise ResolveError(f"DNS server {server[0]}:{server[1]} answered "
                           f"{RCODE_NAMES.get(answer.rcode, answer.rcode)} for {name}")
    return answer


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        with contextlib.suppress(DnsFormatError):  # not ours, or garbage: keep waiting for the real one
            answer = decode_answer(data, self.query_id)
            if not self.answer.done():
                self.answer.set_result(answer)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _over_udp(server: tuple[str, int], query: bytes, query_id: int) -> Answer:
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Datagrams(query_id), remote_addr=server)
    except OSError as exc:
        raise ResolveError(f"cannot reach DNS server {server[0]}:{server[1]}: {exc.strerror or exc}") from None
    try:
        for _ in range(UDP_ATTEMPTS):
            transport.sendto(query)
            try:
                return await asyncio.wait_for(asyncio.shield(protocol.answer), UDP_TIMEOUT)
            except asyncio.TimeoutError:
                continue
            except OSError as exc:  # e.g. ICMP port unreachable: nobody listens there
                raise ResolveError(f"DNS server {server[0]}:{server[1]}: {exc.strerror or exc}") from None
        raise ResolveError(f"DNS server {server[0]}:{server[1]} did not answer "
                           f"({UDP_ATTEMPTS} tries of {UDP_TIMEOUT:g}s)")
    finally:
        transport.close()


async def _over_tcp(server: tuple[str, int], query: bytes, query_id: int) -> Answer:
    try:
        return await asyncio.wait_for(_tcp_exchange(server, query, query_id), TCP_TIMEOUT)
    except asyncio.TimeoutError:
        raise ResolveError(f"DNS server {server[0]}:{server[1]} did not answer over TCP") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise ResolveError(f"DNS over TCP to {server[0]}:{server[1]} failed: {exc}") from None
    except DnsFormatError as exc:
        raise ResolveError(f"DNS server {server[0]}:{server[1]} sent a malformed answer: {exc}") from None


async def _tcp_exchange(server: tuple[str, int], query: bytes, query_id: int) -> Answer:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(query)) + query)  # over TCP a message is preceded by its length
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return decode_answer(await reader.readexactly(length), query_id)
    finally:
        writer.transport.abort()
