"""Per-request state, created when a request head arrives and dropped when its response ends.

Who writes what: the client connection creates the context and fills the body as it arrives; the
pipeline records the phases' outcomes (endpoint, caller, admission, model, backend, retries, errors);
request_body.py what the body says (model, stream, the parsed JSON); the relay what the response did
(status, bytes, first byte, how it ended). The metering session is an object of its own (`meter`).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from llmproxy.catalogue import OTHER, Endpoint, lookup
from llmproxy.errors import ProxyError
from llmproxy.http11.headers import connection_line, local_response
from llmproxy.http11.request import RequestHead
from llmproxy.http11.wire import CONTINUE_100

if TYPE_CHECKING:
    from llmproxy.cache import CachePlan
    from llmproxy.cache.entry import Usage
    from llmproxy.cache.flight import Flight
    from llmproxy.eager import EagerRun
    from llmproxy.metering.session import MeteringSession
    from llmproxy.ratelimit import Admission
    from llmproxy.tenant import Tenant
    from llmproxy.translate import Translation


# A client may pass its own X-Request-Id (1-128 visible ASCII characters) through to the backend.
_VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class ClientSide(Protocol):
    """The client connection as a request sees it (connection.py)."""

    transport: asyncio.Transport
    peer: str
    closed: bool
    judged_by: object  # the IpRules the peer was last judged by (None: no rules then), see gate.authenticate
    writing_paused: bool  # the client's socket buffer is over its high-water mark

    def arm_body_timer(self) -> None: ...

    def request_finished(self, ctx: RequestContext) -> None: ...

    def abort(self) -> None: ...

    def reset(self) -> None: ...


class ResponseStream(Protocol):
    """A response being relayed (relay.py), told what the client connection sees."""

    def client_lost(self) -> None: ...

    def client_paused(self) -> None: ...

    def client_resumed(self) -> None: ...


class RequestIds:
    """Request ids unique to this process: a random prefix and a counter (cheap, and sortable per process)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return "%s%08x" % (self._prefix, self._counter)  # noqa: UP031  # an f-string's :08x costs twice this


def valid_client_request_id(head: RequestHead) -> bytes | None:
    """Return the client's X-Request-Id if it may be forwarded, else None."""
    supplied = head.request_id
    return supplied if supplied is not None and _VALID_REQUEST_ID.fullmatch(supplied) else None


@dataclass(slots=True, eq=False)
class RequestContext:
    conn: ClientSide
    head: RequestHead
    request_id: str  # ours, unique per request: usage records and webhook-ids rely on it
    t_start: float
    keep_alive: bool
    forwarded_request_id: bytes  # the X-Request-Id sent upstream and back: the client's own, else ours
    client_request_id: str | None  # the client's valid X-Request-Id, recorded beside ours
    path: str  # decoded path without the query
    endpoint: Endpoint = OTHER  # the path's row of the catalogue
    # Request body, filled by the connection as it arrives.
    body_parts: list[bytes] = field(default_factory=list)
    body_done: bool = False
    body_error: ProxyError | None = None
    body_waiter: asyncio.Future[None] | None = None
    # Read from the body (request_body.py).
    model: str | None = None  # as forwarded: an alias is already resolved to its target
    model_aliased: bool = False  # the client named an alias: the body's model is rewritten
    model_requested: str | None = None  # the model the client named when rules picked another (model: auto)
    route_id: str | None = None  # the `routes:` entry that chose the backends, when one matched
    is_stream: bool = False
    body_data: Any = None  # the parsed JSON body
    meter: MeteringSession | None = None  # this request's metering, planned per attempt
    translation: Translation | None = None  # this attempt's backend does not serve the client's API
    backend_api: str = ""  # the API the backend was sent (catalogue family or endpoint api)
    key_throttled: bool = False  # this attempt's 429 would be retried with another of the backend's keys
    upstream_sent: bool = False  # the request was written to a backend: it gets a usage record
    tenant: Tenant | None = None  # the caller, when auth is enabled
    admission: Admission | None = None  # rate-limit slots held until the request ends
    response_headers: bytes = b""  # extra header lines for the response (x-ratelimit-*, x-llmproxy-cache)
    # The response cache (caching.py): a cacheable request's key, and the flight it leads upstream; or how it
    # was answered without going upstream (a hit, a follower of an identical request) and the usage it gets.
    cache_plan: CachePlan | None = None
    flight: Flight | None = None
    cache_role: str = ""  # "hit" | "follower"
    cached_usage: Usage | None = None
    # Outcome.
    backend: str = ""  # the last one tried
    retries: int = 0  # attempts on further backends after the first failed
    status: int = 0  # as answered to the client
    backend_status: int = 0  # as the last backend answered (0: none did), a refused attempt's included
    termination: str = "--"
    error_message: str = ""
    error_type: str = ""  # the code of the proxy's own error reply (errors.py), for the trace span
    response_started: bool = False
    bytes_out: int = 0
    t_first_byte: float = 0.0
    t_ready: float = 0.0  # the request was complete and its turn had come (pipelined ones wait their turn)
    proxy_s: float = 0.0  # request fully read -> written upstream (the request side of the proxy's overhead)
    exchange: ResponseStream | None = None
    span: Any = None  # its trace span (spans.py), once begun; only with tracing enabled
    run: EagerRun | None = None  # the running pipeline

    @property
    def key_id(self) -> str | None:
        return self.tenant.key_id if self.tenant is not None else None

    @property
    def user_id(self) -> str | None:
        return self.tenant.user_id if self.tenant is not None else None

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
                      headers: bytes = b"") -> None:
        """Write a complete local response (not relayed from a backend); `headers` are extra header lines."""
        self.status = status
        self.response_started = True
        self.bytes_out += len(body)
        self.conn.transport.write(local_response(
            status, content_type, body, request_id=self.forwarded_request_id, extra=headers + self.response_headers,
            connection=connection_line(self.keep_alive, self.head.version == "1.0"),
            with_body=self.head.method != b"HEAD"))


def new_context(conn: ClientSide, head: RequestHead, request_id: str, keep_alive: bool) -> RequestContext:
    """The context of a request whose head just arrived on `conn`."""
    supplied = valid_client_request_id(head)  # checked once per request, not at every use
    target = head.target
    path = target.partition(b"?")[0].decode("latin-1")  # partition, not `b"?" in`: see http11/path.py
    return RequestContext(
        conn=conn,
        head=head,
        request_id=request_id,
        t_start=perf_counter(),
        keep_alive=keep_alive,
        forwarded_request_id=supplied or request_id.encode(),
        client_request_id=None if supplied is None else supplied.decode(),
        path=path,
        endpoint=lookup(path),
    )
