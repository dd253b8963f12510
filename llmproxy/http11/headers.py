"""Header rewriting in both directions: the request head sent to a backend, the response head sent back.

Up: framing is never forwarded (the body was read whole, so it goes with a fresh Content-Length);
hop-by-hop headers, the client's Host and its credentials are dropped, and so are headers in the proxy's
own namespace (`x-llmproxy-*`: the backend must be able to trust them as the proxy's) and the client's
own claims of where it is from (`Forwarded`, `X-Real-IP`) unless it is a trusted proxy; the backend gets
its own Host, its own credential, X-Request-Id and X-Forwarded-For.

Down: hop-by-hop headers are dropped and the proxy sets framing and Connection itself; X-Request-Id is
added when the backend sent none; a streamed response tells buffering layers in front (nginx, CDNs) to
pass its events through at once.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Protocol

from llmproxy.http11.request import RequestHead
from llmproxy.http11.wire import CRLF, HOP_BY_HOP, connection_tokens, status_line

# Replaced by the proxy, or never sent upstream (client credentials are for the proxy only).
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"authorization", b"x-api-key", b"x-request-id",
    b"x-forwarded-for",
}
OWN_PREFIX = b"x-llmproxy-"  # the proxy's header namespace: what a client sends under it is never forwarded
# Where the request comes from, as a client may claim it: kept only from a trusted proxy.
CLAIMED_ORIGIN = frozenset({b"forwarded", b"x-real-ip"})
BODY_METHODS = (b"POST", b"PUT", b"PATCH")
CONNECTION_CLOSE = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"


class Upstream(Protocol):
    """What the request head needs to know of the backend it goes to (fleet/backend.py)."""

    base_path: bytes  # prefixed to the request target
    host_header: bytes


class HeaderRules:
    """The header rules of one configuration: credential headers never forwarded, proxies trusted with
    X-Forwarded-For."""

    __slots__ = ("_trusted", "credential_headers")

    def __init__(self, credential_headers: frozenset[bytes] = frozenset(), trusted_proxies: tuple[str, ...] = ()):
        self.credential_headers = credential_headers  # auth.header_names, lower-case
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_proxies)

    def upstream_request(self, head: RequestHead, peer: str, request_id: bytes, upstream: Upstream, body: bytes, *,
                         credential: bytes = b"", target: bytes | None = None,
                         skip: frozenset[bytes] = frozenset()) -> bytes:
        """The complete request (head and body) for `upstream`, ready for one write().

        `credential`: the backend's own credential header lines; `target`: the path to send instead of the
        client's (a translated request); `skip`: client headers not to forward (a translated request's
        Accept-Encoding: its response is read and rewritten, so it must come uncompressed).
        """
        parts = [head.method, b" ", upstream.base_path, head.target if target is None else target,
                 b" HTTP/1.1\r\nhost: ", upstream.host_header, CRLF]
        extra_hop = head.connection_tokens
        credentials = self.credential_headers
        forwarded_for = None
        for name, value in head.headers:
            if name in DROPPED_REQUEST_HEADERS or name in extra_hop or name in credentials:
                if name == b"x-forwarded-for":
                    forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            if name.startswith(OWN_PREFIX) or (name in CLAIMED_ORIGIN and not self.is_trusted_proxy(peer)):
                continue
            if skip and name in skip:
                continue
            parts += (name, b": ", value, CRLF)
        parts += (b"x-request-id: ", request_id, CRLF)
        parts += (b"x-forwarded-for: ", self._forwarded_for(peer, forwarded_for), CRLF)
        if credential:
            parts.append(credential)
        if body or head.method in BODY_METHODS:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(CRLF)
        parts.append(body)
        return b"".join(parts)

    def is_trusted_proxy(self, peer: str) -> bool:
        return bool(self._trusted) and _in_networks(peer, self._trusted)

    def _forwarded_for(self, peer: str, client_value: bytes | None) -> bytes:
        if client_value is not None and self.is_trusted_proxy(peer):
            return client_value + b", " + peer.encode()  # a trusted proxy in front of us: keep its chain
        return peer.encode()  # anyone else could forge the chain: replace it


def response_head(status: int, headers: list[tuple[bytes, bytes]], *, keeps_length: bool, chunked: bool,
                  streaming: bool, request_id: bytes, extra: bytes, connection: bytes) -> bytes:
    """The head relayed to the client for a backend's response.

    `keeps_length`: the backend's Content-Length still holds (else the body is re-framed); `chunked`: the
    proxy frames the body as chunked; `extra`: header lines the proxy adds (rate limits, Server-Timing);
    `connection`: the Connection line, or b"" (see connection_line).
    """
    extra_hop = connection_tokens(headers)
    parts = [status_line(status)]
    has_request_id = cache_control = accel = False
    for name, value in headers:
        if name in HOP_BY_HOP or name in extra_hop:
            continue
        if name == b"x-request-id":
            has_request_id = True
        elif name == b"content-length" and not keeps_length:
            continue  # re-framed as chunked
        elif name == b"cache-control":
            cache_control = True
        elif name == b"x-accel-buffering":
            accel = True
        parts += (name, b": ", value, CRLF)
    if not has_request_id:
        parts += (b"x-request-id: ", request_id, CRLF)
    if streaming:
        if not cache_control:
            parts.append(b"cache-control: no-cache\r\n")
        if not accel:
            parts.append(b"x-accel-buffering: no\r\n")
    if extra:
        parts.append(extra)
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(connection)
    parts.append(CRLF)
    return b"".join(parts)


def local_response(status: int, content_type: bytes, body: bytes, *, request_id: bytes, extra: bytes,
                   connection: bytes, with_body: bool = True) -> bytes:
    """A complete response the proxy answers itself (an error, /health...), head and body."""
    head = b"%bcontent-type: %b\r\ncontent-length: %d\r\nx-request-id: %b\r\n%b%b\r\n" % (
        status_line(status), content_type, len(body), request_id, extra, connection)
    return head + body if with_body else head


def connection_line(keep_alive: bool, http10: bool) -> bytes:
    """The Connection header a response needs: close when the connection ends with it; keep-alive for an
    HTTP/1.0 client, whose default is to close; none for HTTP/1.1, whose default is to keep it."""
    if not keep_alive:
        return CONNECTION_CLOSE
    return CONNECTION_KEEP_ALIVE if http10 else b""


@lru_cache(maxsize=4096)
def _in_networks(peer: str, networks: tuple) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)
