"""One HTTP/1.1 connection to a backend: an asyncio.Protocol that parses responses with httptools and
hands every event to the current exchange (the relay) in the same callback it arrives in."""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Protocol

import httptools

# How the response body is delimited, decided once the head has arrived.
FRAMING_NONE = 0  # no body: HEAD, 204, 304
FRAMING_LENGTH = 1  # Content-Length
FRAMING_CHUNKED = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE = 3  # read until the backend closes


class ResponseSink(Protocol):
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_lost(self, reason: str) -> None: ...
    def end_of_read(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """A pooled connection. Idle, it must receive nothing: any byte or EOF makes it dead (stale)."""

    __slots__ = ("_framing", "_headers", "_informational", "_is_head", "_keep_alive", "_parser",
                 "_sink", "closed", "complete", "idle_since", "read_at", "received_any", "reused", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._sink: ResponseSink | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing = FRAMING_NONE
        self._informational = False
        self._is_head = False
        self._keep_alive = False
        self.closed = False
        self.complete = False  # the current response ended cleanly
        self.received_any = False  # any byte of the current response arrived
        self.reused = False
        self.idle_since = 0.0
        self.read_at = 0.0  # when the bytes being handled now were read: the relay measures its overhead from it

    # Used by the pool and the relay --------------------------------------------------------------

    def begin(self, sink: ResponseSink, request: bytes, is_head: bool) -> None:
        """Send one request and route its response events to `sink`."""
        self._sink = sink
        self._is_head = is_head
        self.complete = False
        self.received_any = False
        self._headers = []
        self.transport.write(request)

    def detach(self) -> None:
        self._sink = None

    def reusable(self) -> bool:
        """True if the last exchange ended cleanly and the connection can serve another request.

        A backend may answer (an early 400) before reading the whole request body: what is still unsent in
        the write buffer would go out ahead of the next request, so such a connection is closed instead.
        """
        return (self.complete and not self.closed and not self._is_head
                and self._framing != FRAMING_CLOSE and self._keep_alive
                and not self.transport.get_write_buffer_size())

    def abort(self) -> None:
        """Drop the connection at once (RST-free close is not needed: the backend must stop generating)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP_NODELAY: uvloop sets it on every TCP transport

    def data_received(self, data: bytes) -> None:
        if self._sink is None:
            self.abort()  # bytes on an idle connection: the backend is confused, never reuse it
            return
        self.read_at = perf_counter()
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(f"malformed response from backend: {exc}")
            return
        sink = self._sink
        if sink is not None:
            sink.end_of_read()  # one client write per upstream read (the sink is gone if the response ended)

    def eof_received(self) -> bool:
        if self._sink is not None and not self.complete and self._framing == FRAMING_CLOSE and self._headers_done:
            self.read_at = perf_counter()
            self._finish()  # a close-delimited body ends here, cleanly
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser = None  # it points back at us: break the cycle so the memory goes now, not at a GC pass
        if self._sink is not None and not self.complete:
            self._lost("backend closed the connection" if exc is None else f"backend connection lost: {exc}")

    # httptools callbacks --------------------------------------------------------------------------

    @property
    def _headers_done(self) -> bool:
        return self._headers is None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers is None:
            return  # a trailer field after a chunked body: not forwarded
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers = self._headers
        if 100 <= status < 200:
            # 100 Continue / 103 Early Hints: not forwarded; the real status follows on this connection.
            self._informational = True
            self._headers = []
            if status == 101:
                self._lost("backend switched protocols")
            return
        self._headers = None  # marks "head done"
        self._keep_alive = self._parser.should_keep_alive()  # reset by httptools once the message ends
        self._framing = self._body_framing(status, headers)
        self._sink.on_response_head(status, headers, self._framing)
        if self._framing == FRAMING_NONE and self._is_head and self._sink is not None:
            self._finish()  # httptools does not know a HEAD response has no body

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:  # None: the relay refused this response at its head (to retry it elsewhere)
            sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._sink is not None and not self.complete:
            self._finish()

    # internals ------------------------------------------------------------------------------------

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

    def _finish(self) -> None:
        self.complete = True
        sink = self._sink
        self._sink = None
        sink.on_response_complete()

    def _lost(self, reason: str) -> None:
        sink = self._sink
        self._sink = None
        self.abort()
        if sink is not None:
            sink.on_upstream_lost(reason)
