"""Sans-IO response codec: the bytes of one upstream connection in, response events out, the head size capped.

httptools (llhttp) parses; this codec bounds what it may buffer. llhttp keeps a header value of any length
until its line ends, so a backend that sends a 70 KB header, or one header line that never ends, would
otherwise be relayed, or grow the proxy's memory without bound. Every head (1xx ones too) is measured
against `max_header_size` as its bytes arrive, in slices of a quarter of the limit, and the finished head
exactly (status line and header lines, as `server.max_header_size` measures a request head); over the
limit is a ResponseError. Body bytes go to the parser whole: the cap costs nothing per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import httptools

# How the response body is delimited, decided once the head has arrived.
FRAMING_NONE = 0  # no body: HEAD, 204, 304
FRAMING_LENGTH = 1  # Content-Length
FRAMING_CHUNKED = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE = 3  # read until the backend closes
STATUS_LINE_SIZE = len(b"HTTP/1.1 200 \r\n")  # without the reason phrase


class ResponseError(Exception):
    """The backend's response is malformed or its head over the limit; the connection must be dropped."""


# What `feed_body` raises on a malformed body (bad chunk framing): the caller turns it into a ResponseError.
MalformedBody = httptools.HttpParserError


class ResponseEvents(Protocol):
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None: ...

    def on_complete(self) -> None: ...


def _discard(data: bytes) -> None:
    pass


class ResponseCodec:
    """Parses the responses of one upstream connection, one request at a time (`expect` before each).

    Body pieces go straight into the list `body`, which the parser appends to itself (its `on_body` callback is
    that list's `append`): no Python call per piece. The consumer takes them when the parser returns and clears
    the list. While `in_head` is False the caller may hand a read to `feed_body` (the parser itself) instead
    of `feed`: one Python call less per read.
    """

    __slots__ = ("_error", "_events", "_fed_in_head", "_headers", "_informational", "_is_head", "_limit", "_parser",
                 "_reason", "_slice", "body", "feed_body", "framing", "in_head", "keep_alive", "on_body")

    def __init__(self, events: ResponseEvents, max_header_size: int) -> None:
        self._events = events
        self._limit = max_header_size
        self._slice = max(1024, max_header_size // 4)
        self.body: list[bytes] = []  # the body pieces parsed and not yet taken
        # Read once, when the parser is made: httptools keeps the callbacks it finds on its protocol object.
        self.on_body: Callable[[bytes], None] = self.body.append
        self._parser = httptools.HttpResponseParser(self)
        self.feed_body = self._parser.feed_data
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self.in_head = True  # bytes arriving now belong to a head
        self._fed_in_head = 0
        self._informational = False
        self._is_head = False
        self._error: ResponseError | None = None  # raised inside a parser callback, which httptools wraps
        self.framing = FRAMING_NONE
        self.keep_alive = False  # the backend will keep the connection open after this response

    def expect(self, is_head: bool) -> None:
        """A request was sent: parse its response (`is_head`: a HEAD request, whose response has no body)."""
        self._is_head = is_head
        self.body.clear()
        self._headers = []
        self._reason = b""
        self.in_head = True
        self._fed_in_head = 0

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises ResponseError on a malformed response or an oversize head."""
        try:
            if not self.in_head:
                self._parser.feed_data(data)  # the usual read: body bytes, whole
                return
            step, size = self._slice, len(data)
            start = 0
            while start < size:
                if not self.in_head:  # the head ended inside the last slice: the rest is body
                    self._parser.feed_data(data[start:])
                    return
                piece = data[start:start + step] if start or size > step else data
                start += len(piece)
                self._fed_in_head += len(piece)
                self._parser.feed_data(piece)
                if self.in_head and self._fed_in_head > self._limit:
                    raise ResponseError(f"response head over {self._limit} bytes")
        except httptools.HttpParserError as exc:
            raise self._error or ResponseError(f"malformed response: {exc}") from None

    def release(self) -> None:
        """The connection is gone: break the parser <-> codec cycle now, not at a GC pass."""
        self._parser = None
        self.feed_body = _discard

    # httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # Also for bytes that follow the end of a response in the same read (a backend whose Content-Length
        # undercounts): they start a head nobody asked for, and the connection is not reusable until then.
        self.in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field after a chunked body: not forwarded
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        headers = self._headers
        if self._fed_in_head > self._limit:  # the head is at most what was fed: measure it only if that is over
            size = STATUS_LINE_SIZE + len(self._reason) + sum(len(name) + len(value) + 4 for name, value in headers)
            if size > self._limit:
                self._fail(f"response head of {size} bytes, over {self._limit}")
        status = self._parser.get_status_code()
        self._reason = b""
        if 100 <= status < 200:
            # 100 Continue / 103 Early Hints: not forwarded; the real status follows on this connection, and
            # its head counts against the limit together with this one (so one slice cannot hide it).
            if status == 101:
                self._fail("backend switched protocols")
            self._informational = True
            self._headers = []
            return
        self._fed_in_head = 0
        self.in_head = False
        self.keep_alive = self._parser.should_keep_alive()  # reset by httptools once the message ends
        self.framing = self._body_framing(status, headers)
        self._events.on_head(status, headers, self.framing)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._events.on_complete()

    def _fail(self, message: str) -> None:
        self._error = ResponseError(message)
        raise self._error

    def _body_framing(self, status: int, headers: list[tuple[bytes, bytes]]) -> int:
        if self._is_head or status in (204, 304):
            return FRAMING_NONE
        for name, value in headers:
            if name == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                return FRAMING_CHUNKED
        for name, _ in headers:
            if name == b"content-length":
                return FRAMING_LENGTH
        return FRAMING_CLOSE
