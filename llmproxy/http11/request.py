"""Sans-IO request codec: bytes in, request events out, strict HTTP/1.1 framing and size limits.

httptools (llhttp) already rejects CL+TE, duplicate or malformed Content-Length, bare LF/CR, obs-fold,
whitespace before the colon, control characters and bad chunk framing. It lets through, and this codec
rejects: a missing or duplicate Host, Transfer-Encoding other than exactly ``chunked`` or on HTTP/1.0,
trailers, HTTP/0.9 and versions other than 1.0/1.1, CONNECT and absolute-form targets, and unbounded
sizes (httptools buffers a header value of any length). Every rejection is a `ProtocolError` carrying
the error kind (status) to answer with; the connection then answers and closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httptools

from llmproxy.errors import ProxyError
from llmproxy.http11.path import InvalidPath, canonical_target

ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})


class ProtocolError(ProxyError):
    """The request bytes are malformed or over a limit; answer `kind`'s status and close.

    `target` is the request's canonical target when the head was valid enough to know it (refused for its
    body's size or an upgrade, say), else None: the answer can then speak the API of the path it was for.
    """

    __slots__ = ("target",)

    def __init__(self, kind: str, message: str, target: bytes | None = None) -> None:
        super().__init__(kind, message)
        self.target = target


@dataclass(slots=True)
class CodecLimits:
    max_header_size: int = 32 * 1024
    max_request_line: int = 8 * 1024
    max_body_size: int = 10 * 1024 * 1024


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form path and query, made canonical (http11/path.py): what decisions and the backend see
    version: str  # "1.1" or "1.0"
    headers: list[tuple[bytes, bytes]]  # lower-case names, in arrival order, framing headers included
    host: bytes
    content_length: int | None  # None for chunked or no body
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    request_id: bytes | None = None  # the client's X-Request-Id, as sent
    connection_tokens: frozenset[bytes] = frozenset()  # header names listed in Connection (hop-by-hop too)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def has_header(self, name: bytes) -> bool:
        """The client sent a header of this (lower-case) name."""
        return any(header == name for header, _ in self.headers)


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_complete(self) -> None: ...


# Header names that change how a request is parsed or handled; every other header is just carried.
_FRAMING_HEADERS = frozenset({b"host", b"transfer-encoding", b"content-length", b"expect", b"upgrade",
                              b"x-request-id", b"connection"})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


class RequestCodec:
    """Feeds bytes to httptools and reports requests to a sink, enforcing limits and strict rules."""

    __slots__ = ("_body_size", "_error", "_fed_in_head", "_fed_in_trailer", "_head_done", "_in_trailer", "_limits",
                 "_parser", "_raw", "_sink", "_slice", "_url", "in_head")

    def __init__(self, sink: RequestSink, limits: CodecLimits) -> None:
        self._sink = sink
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        # Part of a request head has arrived, not all of it. Read by the connection on every read: an attribute,
        # not a property (a Python call each time).
        self.in_head = False
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []  # header fields of the head being received, as sent
        self._head_done = False
        self._fed_in_head = 0
        self._in_trailer = False  # after a chunk-size line, until chunk data: maybe the trailer section
        self._fed_in_trailer = 0
        self._body_size = 0
        self._error: ProtocolError | None = None
        # Reads are parsed in slices of this size, so a head (or a trailer section) is measured in steps of
        # at most a quarter of the limit however large the read: whitespace llhttp strips, or a second head
        # behind the end of a first request in the same read, cannot slip past the limit.
        self._slice = max(1024, limits.max_header_size // 4)

    def release(self) -> None:
        """The connection is gone: drop the parser and what it buffered now, not at the next GC pass.

        Codec and parser point at each other (the parser calls the codec back), a reference cycle only the
        cyclic collector frees, and with it whatever half-received head the parser holds.
        """
        self._parser = None
        self._sink = None
        self._raw = []

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises ProtocolError on malformed or over-limit input (the codec is then dead)."""
        if self._error is not None:
            raise self._error
        step = self._slice
        if len(data) <= step:  # the usual read: one call
            self._feed_slice(data)
            return
        for start in range(0, len(data), step):
            self._feed_slice(data[start:start + step])

    def _feed_slice(self, data: bytes) -> None:
        limit = self._limits.max_header_size
        if not self._head_done:
            # Conservative: the whole slice counts against the head limit, which bounds the memory
            # httptools uses for a head that never ends (it buffers header values of any length).
            self._fed_in_head += len(data)
        elif self._in_trailer:
            self._fed_in_trailer += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._after_upgrade(data, upgrade.args[0])
        except httptools.HttpParserError as exc:
            self._raise(self._error or ProtocolError("bad_request", f"malformed request: {exc}"))
        if (self.in_head and self._fed_in_head > limit) or (self._in_trailer and self._fed_in_trailer > limit):
            self._raise(ProtocolError("header_too_large", "request header block is too large"))

    def _raise(self, error: ProtocolError) -> None:
        self._error = error
        raise error

    def _after_upgrade(self, data: bytes, offset: int) -> None:
        # llhttp stops at the end of a head with `Upgrade:` (e.g. `Upgrade: h2c` from curl --http2).
        # We never switch protocols: serve it as a plain request (_validate refused one with a body).
        self._parser = httptools.HttpRequestParser(self)
        rest = data[offset:]
        if rest:
            self.feed(rest)

    # httptools callbacks: kept minimal, they run once per header of every request -----------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self._url = b""
        self._raw = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url  # usually a single call
        self._url = url
        if len(url) > self._limits.max_request_line:
            self._raise(ProtocolError("uri_too_long", "request target is too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self._raise(ProtocolError("bad_request", "trailer fields are not accepted"))
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._head_done = True
        if self._fed_in_head > self._limits.max_header_size + self._slice:
            # The head ended inside this slice, so at most a slice of what was counted is not head.
            self._raise(ProtocolError("header_too_large", "request header block is too large"))
        self._fed_in_head = 0
        request = self._validate()
        self._sink.on_request_head(request)

    def on_chunk_header(self) -> None:
        # Until chunk data arrives this may be the last chunk, and what follows it the trailer section,
        # which httptools buffers without limit: it is measured like a head.
        self._in_trailer = True
        self._fed_in_trailer = 0

    def on_body(self, body: bytes) -> None:
        self._in_trailer = False
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_size:
            self._raise(ProtocolError("body_too_large", "request body is too large"))
        self._sink.on_request_body(body)

    def on_message_complete(self) -> None:
        self._head_done = False  # between messages, bytes count towards the next head
        self._in_trailer = False
        self._sink.on_request_complete()

    # Strict rules httptools does not enforce -----------------------------------------------------

    def _validate(self) -> RequestHead:
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        target = self._url
        size = len(method) + len(target) + 12
        headers = []
        host = request_id = None
        host_count = te_count = 0
        content_length: int | None = None
        expect_continue = False
        upgrade: bytes | None = None
        connection_tokens: frozenset[bytes] = frozenset()
        for name, value in self._raw:
            name = name.lower()
            size += len(name) + len(value) + 4
            headers.append((name, value))
            if name not in _FRAMING_HEADERS:
                continue
            if name == b"host":
                host = value
                host_count += 1
            elif name == b"content-length":
                content_length = int(value)  # llhttp has validated the digits
            elif name == b"transfer-encoding":
                te_count += 1
                if value.strip().lower() != b"chunked":
                    self._raise(ProtocolError("not_implemented", "only Transfer-Encoding: chunked is supported"))
            elif name == b"expect":
                if value.strip().lower() != b"100-continue":
                    self._raise(ProtocolError("bad_request", "unsupported Expect value"))
                expect_continue = True
            elif name == b"upgrade":
                upgrade = value.strip().lower()
            elif name == b"connection":
                if value.lower() not in _PLAIN_CONNECTION:
                    connection_tokens |= {token.strip() for token in value.lower().split(b",")}
            elif request_id is None:
                request_id = value
        if size > self._limits.max_header_size:
            self._raise(ProtocolError("header_too_large", "request header block is too large"))
        if version not in ("1.1", "1.0"):
            kind = "bad_request" if version.startswith("0.") else "version_not_supported"
            self._raise(ProtocolError(kind, f"HTTP/{version} is not supported"))
        if method not in ALLOWED_METHODS:
            self._raise(ProtocolError("not_implemented", f"method {method.decode('latin-1')} is not supported"))
        if not target.startswith(b"/"):
            self._raise(ProtocolError("bad_request", "request target must be a path (origin-form)"))
        try:
            target = canonical_target(target)
        except InvalidPath as error:
            self._raise(ProtocolError("invalid_path", str(error)))
        # From here on the target is known: a refusal carries it.
        if host_count > 1 or (host_count == 0 and version == "1.1"):
            self._raise(ProtocolError("bad_request", "exactly one Host header is required", target))
        if te_count > 1 or (te_count and version == "1.0"):
            self._raise(ProtocolError("bad_request", "invalid Transfer-Encoding", target))
        if upgrade is not None and upgrade != b"h2c":
            # WebSocket and the like: the proxy switches no protocol, and relaying one as a plain request
            # would answer 200 to a client waiting for 101. (curl --http2 asks for h2c: ignoring that
            # offer is allowed, and the request is served as HTTP/1.1.)
            self._raise(ProtocolError("upgrade_not_supported", "protocol upgrades are not supported", target))
        if upgrade is not None and (content_length or te_count):
            # llhttp would skip the body of an upgrade request and parse it as the next request.
            self._raise(ProtocolError("not_implemented", "protocol upgrade with a request body", target))
        if content_length is not None and content_length > self._limits.max_body_size:
            self._raise(ProtocolError("body_too_large", "request body is too large", target))
        return RequestHead(method, target, version, headers, host or b"", content_length, te_count == 1,
                           parser.should_keep_alive(), expect_continue, request_id, connection_tokens)
