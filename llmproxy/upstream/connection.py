"""One HTTP/1.1 connection to a backend: an asyncio.Protocol that parses responses with the response codec
(http11/response.py) and hands every event to the current exchange (the relay) in the callback it arrives in."""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Protocol

from llmproxy.http11.response import FRAMING_CLOSE, FRAMING_NONE, MalformedBody, ResponseCodec, ResponseError

UPSTREAM_FAILED = "upstream_failed"  # the connection broke: the backend crashed, restarted or reset it
PROTOCOL_ERROR = "upstream_protocol_error"  # the backend answered something that is not an acceptable response


class ResponseSink(Protocol):
    """Where a response's events go. Its body is not an event: the parser puts each piece in the connection's
    `body` list, which the sink takes (and clears) at end_of_read, on_response_complete and on_upstream_lost."""

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_lost(self, reason: str, kind: str = UPSTREAM_FAILED) -> None: ...
    def end_of_read(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """A pooled connection. Idle, it must receive nothing: any byte or EOF makes it dead (stale)."""

    __slots__ = ("_codec", "_is_head", "_sink", "body", "closed", "complete", "idle_since", "read_at",
                 "received_any", "reused", "transport")

    def __init__(self, max_header_size: int = 32 * 1024) -> None:
        self.transport: asyncio.Transport | None = None
        self._codec = ResponseCodec(self, max_header_size)
        self.body = self._codec.body  # the current response's body pieces, parsed and not yet taken by the sink
        self._sink: ResponseSink | None = None
        self._is_head = False
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
        self._codec.expect(is_head)
        self.transport.write(request)

    def detach(self) -> None:
        """No more events to the sink. What the parser still puts in `body` in this read is cleared after it
        (data_received): the sink that ends the response in it (_finish) takes the body after detaching."""
        self._sink = None

    def reusable(self) -> bool:
        """True if the last exchange ended cleanly and the connection can serve another request.

        A backend may answer (an early 400) before reading the whole request body: what is still unsent in
        the write buffer would go out ahead of the next request, so such a connection is closed instead.
        """
        codec = self._codec
        return (self.complete and not self.closed and not self._is_head and not codec.in_head
                and codec.framing != FRAMING_CLOSE and codec.keep_alive
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
        codec = self._codec
        try:
            if codec.in_head:
                codec.feed(data)
            else:
                codec.feed_body(data)  # the usual read: body bytes straight to the parser, and on to the relay
        except ResponseError as error:
            self._lost(str(error), PROTOCOL_ERROR)
            return
        except MalformedBody as error:
            self._lost(f"malformed response body: {error}", PROTOCOL_ERROR)
            return
        sink = self._sink
        if sink is not None:
            sink.end_of_read()  # one client write per upstream read (the sink is gone if the response ended)
        elif self.body:
            self.body.clear()  # refused or abandoned in this read: what followed goes nowhere

    def eof_received(self) -> bool:
        codec = self._codec
        if self._sink is not None and not self.complete and codec.framing == FRAMING_CLOSE and not codec.in_head:
            self.read_at = perf_counter()
            self._finish()  # a close-delimited body ends here, cleanly
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._codec.release()  # its parser points back at it: the memory goes now, not at a GC pass
        if self._sink is not None and not self.complete:
            self._lost("backend closed the connection" if exc is None else f"backend connection lost: {exc}")

    # ResponseEvents: called by the codec ----------------------------------------------------------

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self._sink.on_response_head(status, headers, framing)
        if framing == FRAMING_NONE and self._is_head and self._sink is not None:
            self._finish()  # httptools does not know a HEAD response has no body

    def on_complete(self) -> None:
        if self._sink is not None and not self.complete:
            self._finish()

    # internals ------------------------------------------------------------------------------------

    def _finish(self) -> None:
        self.complete = True
        sink = self._sink
        self.detach()
        sink.on_response_complete()

    def _lost(self, reason: str, kind: str = UPSTREAM_FAILED) -> None:
        sink = self._sink
        self.detach()
        self.abort()
        if sink is not None:
            sink.on_upstream_lost(reason, kind)  # takes what was parsed before the loss (it may carry usage)
        self.body.clear()  # what nobody took (a refused response that then broke) goes with the connection
