"""Sans-IO request codec: bytes in, request events out, strict HTTP/1.1 framing and size limits.

httptools (llhttp) already rejects CL+TE, duplicate or malformed Content-Length, bare LF/CR, obs-fold,
whitespace before the colon, control characters and bad chunk framing. It lets through, and this codec
rejects: a missing or duplicate Host, Transfer-Encoding other than exactly ``chunked`` or on HTTP/1.0,
trailers, HTTP/0.9 and versions other than 1.0/1.1, CONNECT and absolute-form targets, and unbounded
sizes (httptools buffers a header value of any length). Every rejection is a `ProtocolError` carrying
the error kind (status) to answer with; the connection then answers and closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import httptools

from ..errors import ProxyError

ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})


class ProtocolError(ProxyError):
    """The request bytes are malformed or over a limit; answer `kind`'s status and close."""


@dataclass(slots=True)
class CodecLimits:
    max_header_size: int = 32 * 1024
    max_request_line: int = 8 * 1024
    max_body_size: int = 10 * 1024 * 1024


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form: path and query, as received
    version: str  # "1.1" or "1.0"
    headers: list[tuple[bytes, bytes]]  # lower-case names, in arrival order, framing headers included
    host: bytes
    content_length: int | None  # None for chunked or no body
    chunked: bool
    keep_alive: bool
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of the lower-case header `name`, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_complete(self) -> None: ...


@dataclass(slots=True)
class _HeadState:
    url_parts: list[bytes] = field(default_factory=list)
    url_size: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 0  # request line + header lines, as counted from the callbacks
    host_count: int = 0
    te_count: int = 0
    content_length: int | None = None
    expect_continue: bool = False


class RequestCodec:
    """Feeds bytes to httptools and reports requests to a sink, enforcing limits and strict rules."""

    __slots__ = ("_body_size", "_error", "_fed_in_head", "_head", "_head_done", "_limits", "_parser",
                 "_sink", "_upgrade_body")

    def __init__(self, sink: RequestSink, limits: CodecLimits) -> None:
        self._sink = sink
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._head: _HeadState | None = None  # set while a request head is being received
        self._head_done = False
        self._fed_in_head = 0
        self._body_size = 0
        self._error: ProtocolError | None = None
        self._upgrade_body = False

    @property
    def in_head(self) -> bool:
        """True while part of a request head has arrived but not all of it."""
        return self._head is not None

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises ProtocolError on malformed or over-limit input (the codec is then dead)."""
        if self._error is not None:
            raise self._error
        if not self._head_done:
            # Conservative: the whole read counts against the head limit, which bounds the memory
            # httptools uses for a head that never ends (it buffers header values of any length).
            self._fed_in_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._after_upgrade(data, upgrade.args[0])
        except httptools.HttpParserError as exc:
            self._raise(self._error or ProtocolError("bad_request", f"malformed request: {exc}"))
        if self._head is not None and self._fed_in_head > self._limits.max_header_size:
            self._raise(ProtocolError("header_too_large", "request header block is too large"))

    def _raise(self, error: ProtocolError) -> None:
        self._error = error
        raise error

    def _after_upgrade(self, data: bytes, offset: int) -> None:
        # llhttp stops at the end of a head with `Upgrade:` (e.g. `Upgrade: h2c` from curl --http2).
        # We never switch protocols: serve it as a plain request, which is safe only without a body.
        if self._upgrade_body:
            self._raise(ProtocolError("not_implemented", "protocol upgrade with a request body"))
        self._parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if rest:
            self.feed(rest)

    # httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head = _HeadState()
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        head = self._head
        head.url_parts.append(url)
        head.url_size += len(url)
        if head.url_size > self._limits.max_request_line:
            self._raise(ProtocolError("uri_too_long", "request target is too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None:
            self._raise(ProtocolError("bad_request", "trailer fields are not accepted"))
        name = name.lower()
        head.size += len(name) + len(value) + 4
        if name == b"host":
            head.host_count += 1
        elif name == b"transfer-encoding":
            head.te_count += 1
            if value.strip().lower() != b"chunked":
                self._raise(ProtocolError("not_implemented", "only Transfer-Encoding: chunked is supported"))
        elif name == b"content-length":
            head.content_length = int(value)  # llhttp has validated the digits
        elif name == b"expect":
            if value.strip().lower() != b"100-continue":
                self._raise(ProtocolError("bad_request", "unsupported Expect value"))
            head.expect_continue = True
        head.headers.append((name, value))

    def on_headers_complete(self) -> None:
        head = self._head
        self._head = None
        self._head_done = True
        self._fed_in_head = 0
        request = self._validate(head)
        self._upgrade_body = request.has_body
        self._sink.on_request_head(request)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_size:
            self._raise(ProtocolError("body_too_large", "request body is too large"))
        self._sink.on_request_body(body)

    def on_message_complete(self) -> None:
        self._head_done = False  # between messages, bytes count towards the next head
        self._sink.on_request_complete()

    # Strict rules httptools does not enforce -----------------------------------------------------

    def _validate(self, head: _HeadState) -> RequestHead:
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        target = b"".join(head.url_parts)
        if head.size + len(target) + len(method) + 12 > self._limits.max_header_size:
            self._raise(ProtocolError("header_too_large", "request header block is too large"))
        if version not in ("1.1", "1.0"):
            kind = "bad_request" if version.startswith("0.") else "version_not_supported"
            self._raise(ProtocolError(kind, f"HTTP/{version} is not supported"))
        if method not in ALLOWED_METHODS:
            self._raise(ProtocolError("not_implemented", f"method {method.decode('latin-1')} is not supported"))
        if not target.startswith(b"/"):
            self._raise(ProtocolError("bad_request", "request target must be a path (origin-form)"))
        if head.host_count > 1 or (head.host_count == 0 and version == "1.1"):
            self._raise(ProtocolError("bad_request", "exactly one Host header is required"))
        if head.te_count > 1 or (head.te_count and version == "1.0"):
            self._raise(ProtocolError("bad_request", "invalid Transfer-Encoding"))
        content_length = head.content_length
        if (content_length or head.te_count) and any(name == b"upgrade" for name, _ in head.headers):
            # llhttp would skip the body of an upgrade request and parse it as the next request.
            self._raise(ProtocolError("not_implemented", "protocol upgrade with a request body"))
        if content_length is not None and content_length > self._limits.max_body_size:
            self._raise(ProtocolError("body_too_large", "request body is too large"))
        host = b""
        for name, value in head.headers:
            if name == b"host":
                host = value
                break
        return RequestHead(
            method=method,
            target=target,
            version=version,
            headers=head.headers,
            host=host,
            content_length=content_length,
            chunked=head.te_count == 1,
            keep_alive=parser.should_keep_alive(),
            expect_continue=head.expect_continue,
        )
