"""Building the request sent to a backend.

Framing is never forwarded: the body was read whole, so it always goes with a fresh Content-Length.
Hop-by-hop headers, the client's Host and credentials are dropped; the backend gets its own Host,
its own `api_key` (if configured), `X-Request-Id` and `X-Forwarded-For`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmproxy.http11.wire import CRLF, HOP_BY_HOP

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend

# Replaced by the proxy, or never sent upstream (client credentials are for the proxy only).
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"authorization", b"x-api-key", b"x-request-id",
    b"x-forwarded-for",
}
BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def build_upstream_request(ctx: RequestContext, backend: Backend, body: bytes) -> bytes:
    """Return the complete request (head and body) for `backend`, ready for one write()."""
    head = ctx.head
    parts = [head.method, b" ", backend.base_path, head.target, b" HTTP/1.1\r\nhost: ", backend.host_header, CRLF]
    extra_hop = head.connection_tokens
    credentials = ctx.conn.server.credential_headers  # auth.header_names: never forwarded either
    forwarded_for = None
    for name, value in head.headers:
        if name in DROPPED_REQUEST_HEADERS or name in extra_hop or name in credentials:
            if name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            continue
        parts += (name, b": ", value, CRLF)
    parts += (b"x-request-id: ", ctx.forwarded_request_id, CRLF)
    parts += (b"x-forwarded-for: ", _forwarded_for(ctx, forwarded_for), CRLF)
    if backend.authorization is not None:
        parts += (b"authorization: ", backend.authorization, CRLF)
    if body or head.method in BODY_METHODS:
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(CRLF)
    parts.append(body)
    return b"".join(parts)


def _forwarded_for(ctx: RequestContext, client_value: bytes | None) -> bytes:
    peer = ctx.conn.peer.encode()
    if client_value is not None and ctx.conn.server.is_trusted_proxy(ctx.conn.peer):
        return client_value + b", " + peer  # a trusted proxy in front of us: keep its chain
    return peer  # anyone else could forge the chain: replace it
