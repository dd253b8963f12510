"""The mock's client connection: httptools parsing, keep-alive and sequential pipelining."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import httptools

from llmproxy.http11.wire import CONTINUE_100
from llmproxy.mockbackend.stats import MockStats
from llmproxy.mockbackend.writer import ResponseWriter, abort_with_rst

_BAD_REQUEST_BODY = b'{"error":"malformed request"}'
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%b" % (len(_BAD_REQUEST_BODY), _BAD_REQUEST_BODY))


@dataclass(slots=True)
class ParsedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]  # lower-case names, in arrival order
    body: bytes
    keep_alive: bool
    http10: bool


class Responder(Protocol):
    """What answers the requests of every connection (server.MockState)."""

    stats: MockStats

    def connection_opened(self, conn: MockConnection) -> None: ...

    def connection_closed(self, conn: MockConnection) -> None: ...

    def respond(self, conn: MockConnection, request: ParsedRequest) -> ResponseWriter: ...


class MockConnection(asyncio.Protocol):
    """Parses requests as they arrive and answers them one at a time, in order."""

    __slots__ = (
        "_body", "_dispatching", "_headers", "_parser", "_queue", "_url", "closed", "closing_by_server",
        "loop", "state", "stats", "transport", "write_paused", "writer",
    )

    def __init__(self, state: Responder, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.stats = state.stats
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.writer: ResponseWriter | None = None
        self.write_paused = self.closed = self.closing_by_server = self._dispatching = False
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[ParsedRequest] = deque()
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # events are small and must leave at once; Nagle would hold them for the previous ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject()
        except httptools.HttpParserError:
            self._reject()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._queue.clear()
        if self.writer is not None:
            self.writer.connection_lost(by_server=self.closing_by_server)
            self.writer = None
        self.state.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writer is not None and self.writer.waiting == "paused":
            self.writer.pump()

    # --- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = [], [], []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        # curl and others wait up to a second for this before sending a large body
        if any(n == "expect" and v.lower() == "100-continue" for n, v in self._headers):
            self.transport.write(CONTINUE_100)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        request = ParsedRequest(
            method=parser.get_method().decode("latin-1"), target=b"".join(self._url).decode("latin-1"),
            headers=self._headers, body=b"".join(self._body), keep_alive=parser.should_keep_alive(),
            http10=parser.get_http_version() == "1.0",
        )
        self._queue.append(request)
        self._dispatch()

    # --- responses ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start the next queued response unless one is in progress.

        Responses that end synchronously call back into here; the flag turns that recursion into
        this loop, so a long pipeline cannot overflow the stack.
        """
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self.writer is None and self._queue and not self.closed:
                request = self._queue.popleft()
                self.writer = self.state.respond(self, request)
                self.writer.start()
        finally:
            self._dispatching = False

    def response_done(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None and not writer.keep_alive:
            self.closed = True  # the rest of a pipeline after Connection: close is dropped
            self._queue.clear()
            return
        self._dispatch()

    def reset_when_flushed(self) -> None:
        """RST the connection once everything written so far has left the transport's buffer.

        abort() discards that buffer, so waiting for it to drain is what makes "exactly N bytes,
        then a reset" hold even when the peer reads slowly.
        """
        self.closed = True
        self.writer = None
        self._abort_when_drained()

    def _abort_when_drained(self) -> None:
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            self.loop.call_later(0.001, self._abort_when_drained)
            return
        abort_with_rst(self.transport)

    def _reject(self) -> None:
        if self.writer is None:
            self.transport.write(_BAD_REQUEST)
        self.closed = True
        self.transport.close()

    def close_by_server(self) -> None:
        self.closing_by_server = True
        self.transport.abort()
