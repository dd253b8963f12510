"""The client side: one asyncio.Protocol per TCP connection.

It owns bytes, timers and flow control; requests are handled one at a time, in order (pipelined ones
wait in `_pending`, and reading pauses while any do). Timers are `loop.call_later` handles:
- keep-alive: an idle connection between requests is closed;
- request head: an absolute deadline for a head, from accept for the first one and from its first byte for
  the next ones (trickling bytes does not extend it);
- body: the longest pause without body progress, armed only while the pipeline waits for the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from time import perf_counter

from llmproxy.catalogue import error_shape
from llmproxy.config.model import ServerConfig, Timeouts
from llmproxy.context import RequestContext, RequestIds, new_context
from llmproxy.eager import EagerRun
from llmproxy.errors import ProxyError, drop_traceback, error_body
from llmproxy.gate import DENIED_AT_ACCEPT, refused_at_accept
from llmproxy.http11.request import CodecLimits, ProtocolError, RequestCodec, RequestHead
from llmproxy.http11.wire import status_line
from llmproxy.iprules import IpRules
from llmproxy.pipeline import handle_request, reject_malformed
from llmproxy.services import Services
from llmproxy.traffic import Traffic

WRITE_HIGH_WATER = 64 * 1024  # above this the relay stops reading the backend
LINGER = 5.0  # seconds a connection refused at accept is read (and dropped) while its 403 reaches the client


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What every client connection obeys; fixed at start (server.* needs a restart)."""

    codec_limits: CodecLimits
    timeouts: Timeouts
    max_connections: int

    @classmethod
    def from_config(cls, server: ServerConfig) -> ClientSettings:
        return cls(
            codec_limits=CodecLimits(max_header_size=server.max_header_size, max_request_line=server.max_request_line,
                                     max_body_size=server.max_body_size),
            timeouts=server.timeouts,
            max_connections=server.max_connections,
        )


class Clients:
    """The client connections of this process and what they share: their settings, the traffic counts,
    request ids, and the current Services, which a reload replaces (here, and only here). Called, it makes
    a connection: it is the listening socket's protocol factory."""

    __slots__ = ("connections", "ids", "loop", "services", "settings", "traffic")

    def __init__(self, settings: ClientSettings, services: Services, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.services = services
        self.traffic: Traffic = services.traffic
        self.loop = loop
        self.ids = RequestIds()
        self.connections: set[ClientConnection] = set()

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def streams_in_flight(self) -> int:
        """Requests in progress that stream their response (counted at scrape time: nothing on the request path)."""
        return sum(1 for conn in self.connections if conn.streaming)

    def close_idle(self) -> None:
        for conn in list(self.connections):
            conn.close_if_idle()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()


class ClientConnection(asyncio.Protocol):
    __slots__ = ("_body_progress_at", "_body_timer", "_clients", "_codec", "_current", "_head_timer", "_idle_since",
                 "_idle_timer", "_loop", "_parsing", "_pending", "_reading_paused", "_timeouts", "_to_start",
                 "closed", "judged_by", "peer", "transport", "writing_paused")

    def __init__(self, clients: Clients) -> None:
        self._clients = clients
        self._loop = clients.loop
        self._timeouts = clients.settings.timeouts
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.judged_by: IpRules | None = None  # the address rules this connection's peer was last judged by
        self._codec = RequestCodec(self, clients.settings.codec_limits)
        self._current: RequestContext | None = None  # the request being answered
        self._parsing: RequestContext | None = None  # the request whose body is arriving
        # Pipelined requests are rare: a list (56 bytes) rather than a deque (760) on every idle connection.
        self._pending: list[RequestContext | ProtocolError] = []
        self._to_start: RequestContext | None = None  # became current during this read; started after it
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the connection last became idle
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_progress_at = 0.0  # loop time the request body last made progress
        self._reading_paused = False
        self.writing_paused = False
        self.closed = False

    @property
    def streaming(self) -> bool:
        """The request being answered streams its response (the client asked, or the backend streams)."""
        current = self._current
        return current is not None and current.is_stream

    # asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        clients = self._clients
        if len(clients.connections) >= clients.settings.max_connections or clients.traffic.draining:
            transport.abort()  # refuse cheaply; the connections already served are untouched
            self.closed = True
            return
        clients.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.judged_by = clients.services.ip_rules  # a reload's new rules judge it again (gate.authenticate)
        if self.judged_by is not None and refused_at_accept(clients.services, self.peer):
            self._refuse_address()
            return
        # TCP_NODELAY is already set: uvloop (like asyncio) sets it on every TCP transport.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # The first head's deadline runs from accept, as nginx's client_header_timeout does: a connection
        # that never sends a byte is closed after request_head, not kept for the whole keep-alive timeout.
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        try:
            self._codec.feed(data)
        except ProtocolError as error:
            drop_traceback(error)  # kept and answered later: without frames that hold this connection
            self._protocol_error(error)
        to_start = self._to_start
        if to_start is not None:
            # Started once the whole read is parsed, so a body that came with its head is complete and the
            # pipeline can usually run straight through to the upstream write (see eager.py).
            self._to_start = None
            self._start(to_start)
        if self.closed:
            return
        if self._codec.in_head and self._head_timer is None and self._current is None:
            self._arm_head_timer()

    def eof_received(self) -> bool:
        # EOF from the client is treated as a disconnect, as nginx does by default: an HTTP client that
        # closes its side is gone, and the backend must stop generating now, not at the next chunk
        # (which may be minutes away during a long prefill). Returning False closes the transport.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._clients.connections.discard(self)
        self._cancel_timers()
        self._codec.release()
        current = self._current
        if current is not None:
            if current.exchange is not None:
                current.exchange.client_lost()
            elif current.run is not None and not current.response_started:
                current.termination = "CR" if not current.body_done else "CH"
                current.run.cancel()
            if not current.body_done:
                current.body_finished(ProxyError("bad_request", "client closed the connection"))
        self._pending.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        current = self._current
        if current is not None and current.exchange is not None:
            current.exchange.client_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        current = self._current
        if current is not None and current.exchange is not None:
            current.exchange.client_resumed()

    # RequestSink: called by the codec -------------------------------------------------------------

    def on_request_head(self, head: RequestHead) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        clients = self._clients
        ctx = new_context(self, head, clients.ids.next(), head.keep_alive and not clients.traffic.draining)
        self._parsing = ctx if head.has_body else None
        if not head.has_body:
            ctx.body_done = True
        if self._current is None:
            self._current = ctx
            self._to_start = ctx
        else:
            self._pending.append(ctx)
            self._pause_reading()

    def on_request_body(self, data: bytes) -> None:
        self._body_progress_at = self._loop.time()
        self._parsing.body_received(data)

    def on_request_complete(self) -> None:
        parsing = self._parsing
        if parsing is not None:
            self._parsing = None
            if parsing.run is not None:  # started already, waiting for this body (else _start stamps it)
                parsing.t_ready = perf_counter()
            self._cancel_body_timer()
            parsing.body_finished()

    # Used by the pipeline -------------------------------------------------------------------------

    def request_finished(self, ctx: RequestContext) -> None:
        """The response to `ctx` is complete: go on with the next request, or close."""
        self._current = None
        if self.closed:
            return
        if not ctx.keep_alive or not ctx.body_done or self._clients.traffic.draining:
            # An unread request body would be parsed as the next request: close instead.
            self._close()
            return
        if self._pending:
            item = self._pending.pop(0)
            if isinstance(item, ProtocolError):
                self._reply_error_and_close(item)
                return
            self._current = item
            self._loop.call_soon(self._start, item)  # not nested in the previous request's finish
        if not self._pending:
            self._resume_reading()
        if self._current is None:
            if self._codec.in_head:
                self._arm_head_timer()  # a pipelined head's deadline starts when it is its turn
            else:
                self._arm_idle_timer()

    def arm_body_timer(self) -> None:
        if self._body_timer is None and self._parsing is not None:
            self._body_progress_at = self._loop.time()  # the wait for the body starts now
            self._body_timer = self._loop.call_later(self._timeouts.body, self._body_tick)

    def abort(self) -> None:
        """Drop the connection without finishing the response (the client sees a truncation)."""
        self.closed = True
        self.transport.abort()

    def reset(self) -> None:
        """Abort with a TCP reset, discarding what the kernel still holds for a client that stopped reading.

        A plain abort leaves the socket orphaned in FIN-WAIT-1 with its whole send queue, still trickling
        to the slow reader (kernel memory an attacker can pin); nginx's reset_timedout_connection.
        """
        _set_linger_zero(self.transport)
        self.abort()

    def close_if_idle(self) -> None:
        """Close now if no request is in progress (used by graceful shutdown)."""
        if self._current is None and not self.closed:
            self._close()

    # internals ------------------------------------------------------------------------------------

    def _start(self, ctx: RequestContext) -> None:
        if not self.closed:
            if ctx.body_done:  # a pipelined request's wait behind the one before is not the proxy's overhead
                ctx.t_ready = perf_counter()
            # The request's one snapshot of the configuration: a reload from now on is the next request's.
            ctx.run = EagerRun(handle_request(self._clients.services, ctx), self._loop)

    def _protocol_error(self, error: ProtocolError) -> None:
        parsing = self._parsing
        if parsing is not None and not parsing.body_done:
            # The error is in the body of a request already started: that request answers it.
            self._parsing = None
            parsing.keep_alive = False
            parsing.body_finished(error)
        elif self._current is None:
            self._reply_error_and_close(error)
        else:
            self._pending.append(error)  # answered in order, after the requests before it
        self._pause_reading()

    def _reply_error_and_close(self, error: ProtocolError) -> None:
        """Answer a request that never became a RequestContext (bad head) and close."""
        self._write_error(error, error.target)
        self._close()
        self._cancel_timers()

    def _write_error(self, error: ProxyError, target: bytes | None = None) -> None:
        reject_malformed(self._clients.services, self.peer, error)
        spec = error.spec
        body = error_body(spec, error.message, error_shape(target))
        self.transport.write(status_line(spec.status) + b"content-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body))

    def _refuse_address(self) -> None:
        """403 before a byte is read, then a lingering close (as nginx's): what the client sends meanwhile is
        read and dropped, for a close with unread bytes would reset the connection, and a reset can destroy
        the answer in the client's kernel before it reads it. The linger ends at the client's close, or
        after LINGER seconds at most."""
        self._write_error(DENIED_AT_ACCEPT)
        self.closed = True
        self._codec.release()
        self._codec = _DISCARD
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        self._head_timer = self._loop.call_later(min(LINGER, self._timeouts.request_head), transport.abort)

    def _close(self) -> None:
        """Close after what is buffered has been sent, but never wait longer than the write timeout for a
        client that does not read (transport.close() alone would wait forever and hold the connection)."""
        self.closed = True
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            self._loop.call_later(self._timeouts.write, _reset_transport, transport)

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _arm_idle_timer(self) -> None:
        # Lazy: one pending timer per connection, never cancelled by traffic (that would cost a cancel and
        # a re-arm per request). When it fires it closes the connection only if it has been idle long enough.
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._timeouts.keepalive, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.closed or self._current is not None or self._codec.in_head:
            return  # busy: request_finished arms it again
        remaining = self._idle_since + self._timeouts.keepalive - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._idle_timeout)
            return
        self._close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(self._timeouts.request_head, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.closed:
            return
        if self._current is not None:
            self.abort()
        elif not self._codec.in_head:
            self._close()  # not a byte of a request: nothing to answer (as an idle keep-alive connection)
        else:
            self._reply_error_and_close(ProtocolError("request_timeout", "request head not received in time"))

    def _body_tick(self) -> None:
        # Lazy like the idle timer: progress only moves a timestamp; the timer, when it fires, measures the
        # pause since the last body bytes and either cuts the request or sleeps for what is left of it.
        self._body_timer = None
        parsing = self._parsing
        if parsing is None or parsing.body_done:
            return
        left = self._body_progress_at + self._timeouts.body - self._loop.time()
        if left <= 0:
            self._parsing = None
            parsing.keep_alive = False
            parsing.body_finished(ProtocolError("request_timeout", "request body not received in time"))
            return
        self._body_timer = self._loop.call_later(left, self._body_tick)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._head_timer = self._body_timer = None


class _Discard:
    """The codec of a refused connection: every byte dropped."""

    in_head = False

    def feed(self, data: bytes) -> None:
        return None

    def release(self) -> None:
        return None


_DISCARD = _Discard()


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset_transport(transport: asyncio.Transport) -> None:
    """The write timeout after a close: the client never read the rest, so drop it with a reset."""
    if transport.get_write_buffer_size():
        _set_linger_zero(transport)
    transport.abort()
