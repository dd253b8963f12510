"""The relay: one upstream exchange streamed to the client as it arrives.

What one upstream read brings is written to the client inside the very callback that parsed it, in one
write: no queue, no task hop, nothing held back for a later read (the response head goes with the first
chunk). Backpressure is symmetric and cheap: when the client's transport
goes over its high-water mark the upstream socket stops being read, and resumes on drain, so memory per
stream stays bounded by the two socket buffers however slow the client is.

Before the response head reached the client any failure is reported to the pipeline as a ProxyError
(it may retry or answer 502/504). After that, a failure aborts the client connection without the
terminating chunk, so the client sees a truncated response instead of a fake clean end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from llmproxy.errors import ProxyError
from llmproxy.http11.headers import connection_line, response_head
from llmproxy.http11.response import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE
from llmproxy.http11.wire import LAST_CHUNK
from llmproxy.overhead import server_timing
from llmproxy.upstream.connection import UPSTREAM_FAILED, UpstreamConnection

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.services import RelaySettings

log = logging.getLogger("llmproxy")
STREAMING_TYPES = (b"text/event-stream", b"application/x-ndjson")
TRANSLATION_FAILED = "translation_failed"
WRITEV_MIN = 4096  # bytes: a chunk above this goes out by writev (no copy), one below framed in one piece


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for header, value in headers:
        if header == name:
            return value
    return None


def _translated_headers(headers: list[tuple[bytes, bytes]], streaming: bool) -> list[tuple[bytes, bytes]]:
    """The backend's headers for a translated body: its type is the translation's (JSON for a whole body, an
    error included), its length and encoding no longer hold."""
    kept = [(name, value) for name, value in headers
            if name not in (b"content-type", b"content-length", b"content-encoding")]
    kept.append((b"content-type", b"text/event-stream" if streaming else b"application/json"))
    return kept


def _is_streaming(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(STREAMING_TYPES)
    return False


class Exchange:
    """Implements the upstream ResponseSink for one request and writes the client side directly."""

    __slots__ = ("_awaiting_head", "_backend", "_chunked", "_deadline", "_feed", "_in", "_last_progress", "_loop",
                 "_out", "_overhead", "_pending_head", "_ping", "_ping_at", "_ping_sent", "_progress",
                 "_refuse_statuses", "_settings", "_stream_idle", "_sweeper", "_t_sent", "_write", "_write_pieces",
                 "_write_timer", "ctx", "done", "retry_after", "upstream")

    def __init__(self, ctx: RequestContext, upstream: UpstreamConnection, backend: Backend,
                 settings: RelaySettings, refuse_statuses: frozenset[int] = frozenset()) -> None:
        self.ctx = ctx
        self.upstream = upstream
        self._backend = backend  # told the time to first token, for latency-based balancing
        self._refuse_statuses = refuse_statuses  # statuses the pipeline will retry elsewhere: not relayed
        self._loop = settings.loop
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._write = ctx.conn.transport.write
        # A big read's pieces (the head, a chunk's size line, its bytes, its end) go out in one vectored write:
        # uvloop hands them to writev as they are, where joining them first would copy the whole read again.
        self._write_pieces = ctx.conn.transport.writelines
        self._chunked = False
        self._pending_head: bytes | None = None  # the response head, until it can go with the first chunk
        # The body chunks of this upstream read, metered and relayed at its end. The parser puts each chunk
        # straight in this list (the connection's): a backend that puts a whole stream in one write sends it as
        # dozens of HTTP chunks, and metering and framing them one by one cost more than all the rest of the
        # request (bench.instructions); a Python call per chunk was most of what was left.
        self._in: list[bytes] = upstream.body
        self._out: list[bytes] = []  # what this upstream read produced for the client: one write at its end
        self._progress = 0  # reads relayed; the deadline sweeper compares it between ticks
        self._last_progress = -1
        self._awaiting_head = True
        self._deadline = self._loop.time() + backend.first_byte_timeout  # first byte, then stream idle
        self._stream_idle = backend.stream_idle_timeout
        self._t_sent = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._settings = settings
        self._sweeper = settings.sweeper
        self._overhead = settings.overhead
        self._feed: Callable[[bytes], bytes] | None = None  # the metering session's reader of this response
        # A translated Messages stream's keep-alive: the events to send when the backend is silent too long.
        self._ping: Callable[[], bytes] | None = None
        self._ping_at = 0.0
        self._ping_sent = 0  # the client's byte count when pings were last considered
        self.retry_after: bytes | None = None  # a 429's retry-after, for the backend's key rotation

    def start(self, request: bytes) -> None:
        ctx = self.ctx
        first_attempt = ctx.retries == 0 and not ctx.upstream_sent
        ctx.exchange = self
        ctx.upstream_sent = True
        self._sweeper.active.add(self)
        self.upstream.begin(self, request, ctx.head.method == b"HEAD")
        self._t_sent = now = perf_counter()
        if first_attempt:  # a retry's time includes the failed attempt: not the proxy's overhead
            ctx.proxy_s = now - ctx.t_ready
            self._overhead.request.observe(ctx.proxy_s)

    def check_deadlines(self, now: float) -> None:
        """Called by the deadline sweeper on every tick."""
        if self._awaiting_head:
            if now >= self._deadline:
                self._first_byte_timeout()
            return
        if self._progress != self._last_progress or self._client_holds_upstream():
            # A client that reads slowly is the write timeout's business, not the backend's.
            self._last_progress = self._progress
            self._deadline = now + self._stream_idle
        elif now >= self._deadline:
            self._stream_idle_timeout()
            return
        if self._ping is not None:
            self._keep_alive(now)

    def _client_holds_upstream(self) -> bool:
        """The client's backpressure is what keeps the upstream from progressing (asked once per tick)."""
        return self.ctx.conn.writing_paused

    def _keep_alive(self, now: float) -> None:
        """Ping a translated stream's client that has heard nothing for a ping interval: the backend may be
        silent (a long prefill) or busy with what maps to no client event (a reasoning model's thoughts)."""
        sent = self.ctx.bytes_out
        if sent != self._ping_sent or self.ctx.conn.writing_paused:
            self._ping_sent = sent
            self._ping_at = now + self._settings.ping_interval
        elif now >= self._ping_at:
            self._send_ping()
            self._ping_sent = self.ctx.bytes_out
            self._ping_at = now + self._settings.ping_interval

    # ResponseSink: called from the upstream protocol's data_received ------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self._awaiting_head = False
        self.ctx.backend_status = status
        if status == 429:
            self.retry_after = _header(headers, b"retry-after") or b""  # b"": the key rests the default time
        if status in self._refuse_statuses:
            self._refuse(status)
            return
        ctx = self.ctx
        ctx.status = status
        streaming = _is_streaming(headers)
        session = ctx.meter
        if session is not None:
            self._feed = session.response_started(status, streaming, headers)
            if session.streamed:
                ctx.is_stream = True
            if session.translation is not None:
                headers = _translated_headers(headers, streaming)
                self._ping = session.pinger()
                self._ping_at = self._loop.time() + self._settings.ping_interval
            if session.rewrites and framing == FRAMING_LENGTH:
                framing = FRAMING_CHUNKED  # the meter may drop an event: the original length would be wrong
        self._chunked = framing not in (FRAMING_LENGTH, FRAMING_NONE) and ctx.head.version == "1.1"
        if self._settings.traffic.draining:
            ctx.keep_alive = False  # shutting down: tell the client this connection ends with the response
        if framing not in (FRAMING_LENGTH, FRAMING_NONE) and ctx.head.version == "1.0":
            ctx.keep_alive = False  # an HTTP/1.0 client can only see the end of this body as a close
        self._pending_head = self._response_head(status, headers, framing, streaming)
        if ctx.conn.writing_paused:
            self.client_paused()

    def _take_input(self) -> bool:
        """Meter (or translate) the body bytes of this read as one piece and queue them for the client.
        False if that ended the exchange (a translator that could not follow): nothing more may be written."""
        chunks = self._in
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        feed = self._feed
        if feed is not None:
            try:
                data = feed(data)  # the same bytes, unless it removed the usage event we injected
            except Exception:  # a metering bug must never cost the client its stream
                if self.ctx.meter is not None and self.ctx.meter.translation is not None:
                    self._translation_failed()  # the backend's API is not the client's: nothing to fall back to
                    return False
                log.exception("meter failed; relaying the rest of request %s unmetered", self.ctx.request_id)
                self._feed = None
        if data:
            self._forward(data)
        return True

    def _forward(self, data: bytes) -> None:
        size = len(data)
        if not self._chunked:
            self._out.append(data)
        elif size <= WRITEV_MIN:  # an event or a few: framed in one piece, copying it costs less than a writev
            self._out.append(b"%x\r\n%b\r\n" % (size, data))
        else:
            self._out += (b"%x\r\n" % size, data, b"\r\n")
        self.ctx.bytes_out += size

    def end_of_read(self) -> None:
        """Write what one upstream read produced, in one write: every event of that read leaves now, in
        one syscall and one packet (a burst of 300 events is not 300 writes), the head with the first."""
        if self._in:
            self._progress += 1
            if not self._take_input():
                return
        out = self._out
        head = self._pending_head
        if head is not None:
            out.insert(0, head)
            self._pending_head = None
            self.ctx.response_started = True
        elif not out:
            return
        ctx = self.ctx
        first = not ctx.t_first_byte and (head is None or len(out) > 1)  # the first body bytes go now
        if first:
            ctx.t_first_byte = perf_counter()
        if len(out) == 1:
            self._write(out[0])
        elif len(out) < 3:  # the head and a small piece: one copy is cheaper than a writev
            self._write(b"".join(out))
        else:
            self._write_pieces(out)
        out.clear()
        if first:  # told after the write: the balancer's bookkeeping is not on the first token's path
            self._backend.observe_ttft(ctx.t_first_byte - self._t_sent, ctx.t_first_byte)
        # The proxy's own time on this read: from the read to the write (the in-product overhead histograms).
        histogram = self._overhead.chunk if head is None else self._overhead.first_byte
        histogram.observe(perf_counter() - self.upstream.read_at)

    def _translation_failed(self) -> None:
        """A translator that cannot follow the backend's response: the client must not get it in the backend's API,
        nor a clean end. Before any byte went out it is a 502; after, a truncation."""
        log.exception("translating the response of request %s failed", self.ctx.request_id)
        self._feed = None
        self.upstream.detach()
        self.upstream.abort()
        self._out.clear()
        self._end()
        reason = "the backend's response could not be translated"
        if self.ctx.response_started:
            self._abort_client("PD", reason)  # the proxy's failure, in the data phase
        elif not self.done.done():
            self.done.set_exception(ProxyError(TRANSLATION_FAILED, reason))

    def _send_ping(self) -> None:
        """Keep a silent translated stream alive: its ping goes out at once (with the head, if still held)."""
        try:
            data = self._ping()
        except Exception:
            log.exception("ping of request %s failed", self.ctx.request_id)
            self._ping = None
            return
        if not data:  # the translated stream is over: nothing to keep alive
            return
        self._forward(data)
        out = self._out
        if self._pending_head is not None:
            out.insert(0, self._pending_head)
            self._pending_head = None
            self.ctx.response_started = True
        self._write(b"".join(out))
        out.clear()

    def on_response_complete(self) -> None:
        if self._in and not self._take_input():
            return
        if self._feed is not None:
            try:
                tail = self.ctx.meter.response_ended()
                if tail:
                    self._forward(tail)
            except Exception:  # a metering bug must never cost the client the end of its response
                if self.ctx.meter.translation is not None:
                    self._translation_failed()
                    return
                log.exception("metering the end of request %s failed", self.ctx.request_id)
        if self._chunked:
            self._out.append(LAST_CHUNK)
        self.end_of_read()
        self._completed()
        self._end()
        if not self.done.done():
            self.done.set_result(None)

    def _completed(self) -> None:
        """The response arrived whole and was relayed (RecordingExchange hands it on)."""

    def on_upstream_lost(self, reason: str, kind: str = UPSTREAM_FAILED) -> None:
        if self._in and not self._take_input():  # metered still: usage that came just before the loss is billed
            return
        self._out.clear()
        self._end()
        if self.ctx.response_started:
            self._abort_client("SD", reason)
        elif not self.done.done():
            self.done.set_exception(ProxyError(kind, reason))

    # Client-side events, from the client connection ------------------------------------------------

    def client_paused(self) -> None:
        if not self.upstream.closed:
            self.upstream.transport.pause_reading()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._settings.write_timeout, self._write_timeout)

    def client_resumed(self) -> None:
        if not self.upstream.closed:
            self.upstream.transport.resume_reading()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def client_lost(self) -> None:
        """The client went away: close the upstream at once so the backend stops generating."""
        self.upstream.detach()
        self.upstream.abort()
        self._end()
        if not self.done.done():
            self.ctx.termination = "CD" if self.ctx.response_started else "CH"
            self.done.set_result(None)

    # internals ------------------------------------------------------------------------------------

    def _response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int,
                       streaming: bool) -> bytes:
        ctx = self.ctx
        extra = ctx.response_headers  # x-ratelimit-*
        if not streaming:  # a streamed response's head leaves before the proxy's time is known
            extra += server_timing(ctx.proxy_s + perf_counter() - self.upstream.read_at)
        # A HEAD response's Content-Length describes the body a GET would get: it holds, and is kept.
        keeps_length = framing == FRAMING_LENGTH or ctx.head.method == b"HEAD"
        return response_head(status, headers, keeps_length=keeps_length, chunked=self._chunked,
                             streaming=streaming, request_id=ctx.forwarded_request_id, extra=extra,
                             connection=connection_line(ctx.keep_alive, ctx.head.version == "1.0"))

    def _end(self) -> None:
        self._sweeper.active.discard(self)
        upstream = self.upstream
        if upstream.transport is not None and not upstream.closed and not upstream.transport.is_reading():
            upstream.transport.resume_reading()  # paused for a slow client: the pool must get it reading
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.ctx.exchange is self:
            self.ctx.exchange = None

    def _abort_client(self, termination: str, reason: str, reset: bool = False) -> None:
        ctx = self.ctx
        ctx.termination = termination
        ctx.error_message = reason
        ctx.keep_alive = False
        if reset:
            ctx.conn.reset()  # a client that stopped reading: free what the kernel still queues for it
        else:
            ctx.conn.abort()  # a truncation the client must see after reading what it was sent
        if not self.done.done():
            self.done.set_result(None)

    def _refuse(self, status: int) -> None:
        # Its body is not wanted: closing costs a reconnect, reading it to the end could cost a long wait.
        self.upstream.detach()
        self.upstream.abort()
        self._end()
        if not self.done.done():
            self.done.set_exception(ProxyError("upstream_status", f"backend answered {status}", status))

    def _first_byte_timeout(self) -> None:
        self.upstream.detach()
        self.upstream.abort()
        self._end()
        if not self.done.done():
            self.done.set_exception(ProxyError("first_byte_timeout", "backend sent no response in time"))

    def _stream_idle_timeout(self) -> None:
        self.upstream.detach()
        self.upstream.abort()
        self._end()
        self._abort_client("sD", "backend stream idle timeout")

    def _write_timeout(self) -> None:
        self._write_timer = None
        self.upstream.detach()
        self.upstream.abort()
        self._end()
        self._abort_client("cD", "client did not read the response in time", reset=True)
