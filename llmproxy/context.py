"""Per-request state, created when a request head arrives and dropped when its response ends."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmproxy.catalogue import OTHER, Endpoint
from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead
from llmproxy.http11.wire import CONTINUE_100, status_line

if TYPE_CHECKING:
    from llmproxy.auth import ApiKey
    from llmproxy.connection import ClientConnection
    from llmproxy.eager import EagerRun
    from llmproxy.metering import Meter, Usage
    from llmproxy.ratelimit import Admission
    from llmproxy.relay import Exchange


# A client may pass its own X-Request-Id (1-128 visible ASCII characters) through to the backend.
_VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def valid_client_request_id(head: RequestHead) -> bytes | None:
    """Return the client's X-Request-Id if it may be forwarded, else None."""
    supplied = head.request_id
    return supplied if supplied is not None and _VALID_REQUEST_ID.fullmatch(supplied) else None


@dataclass(slots=True, eq=False)
class RequestContext:
    conn: ClientConnection
    head: RequestHead
    request_id: str  # ours, unique per request: usage records and webhook-ids rely on it
    t_start: float
    keep_alive: bool
    forwarded_request_id: bytes  # the X-Request-Id sent upstream and back: the client's own, else ours
    client_request_id: str | None  # the client's valid X-Request-Id, recorded beside ours
    path: str = ""  # decoded path without the query
    endpoint: Endpoint = OTHER  # the path's row of the catalogue
    # Request body, filled by the connection as it arrives.
    body_parts: list[bytes] = field(default_factory=list)
    body_done: bool = False
    body_error: ProxyError | None = None
    body_waiter: asyncio.Future[None] | None = None
    # Facts read from the body (request_body.py), and what the meter read off the response.
    model: str | None = None  # as forwarded: an alias is already resolved to its target
    model_aliased: bool = False  # the client named an alias: the body's model is rewritten
    is_stream: bool = False
    body_data: Any = None  # the parsed JSON body, kept for estimating prompt tokens
    dialect: str | None = None  # metering dialect of this endpoint, None if not metered
    meter: Meter | None = None
    usage: Usage | None = None  # as reported by the backend
    content_events: int = 0  # content-bearing events relayed (the completion estimate without usage)
    upstream_sent: bool = False  # the request was written to a backend: it gets a usage record
    user_id: str | None = None
    key_id: str | None = None
    api_key: ApiKey | None = None  # the caller's key, when auth is enabled
    admission: Admission | None = None  # rate-limit slots held until the request ends
    response_headers: bytes = b""  # extra header lines for the response (x-ratelimit-*, retry-after)
    # Outcome.
    backend: str = ""  # the last one tried
    retries: int = 0  # attempts on further backends after the first failed
    status: int = 0
    termination: str = "--"
    error_message: str = ""
    response_started: bool = False
    bytes_out: int = 0
    t_first_byte: float = 0.0
    t_ready: float = 0.0  # the request was complete and its turn had come (pipelined ones wait their turn)
    proxy_s: float = 0.0  # request fully read -> written upstream (the request side of the proxy's overhead)
    exchange: Exchange | None = None
    run: EagerRun | None = None  # the running pipeline

    async def read_body(self) -> bytes:
        """Return the whole request body; raises ProxyError if the client sent a bad or oversize one."""
        if not self.body_done and self.body_error is None:
            if self.head.expect_continue and not self.body_parts:
                self.conn.transport.write(CONTINUE_100)
            self.body_waiter = asyncio.get_running_loop().create_future()
            self.conn.arm_body_timer()
            await self.body_waiter
        if self.body_error is not None:
            raise self.body_error
        parts = self.body_parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def body_received(self, data: bytes) -> None:
        self.body_parts.append(data)

    def body_finished(self, error: ProxyError | None = None) -> None:
        self.body_done = True
        self.body_error = error
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send_response(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Write a complete local response (not relayed from a backend)."""
        self.status = status
        self.response_started = True
        parts = [status_line(status), b"content-type: ", content_type, b"\r\ncontent-length: %d\r\n" % len(body),
                 b"x-request-id: ", self.forwarded_request_id, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if self.response_headers:
            parts.append(self.response_headers)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.head.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if self.head.method != b"HEAD":
            parts.append(body)
        self.bytes_out += len(body)
        self.conn.transport.write(b"".join(parts))
