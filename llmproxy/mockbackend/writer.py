"""Sends one response: framing, pacing and the fault knobs (stall, reset, gate, close-delimited).

Pacing uses one `loop.call_later` handle per response rather than a task, so 10,000 slow streams
cost 10,000 timer entries and nothing else. Events that may go out at once are joined into one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Protocol

from llmproxy.http11.wire import LAST_CHUNK, chunk, status_line
from llmproxy.mockbackend.options import Knobs
from llmproxy.mockbackend.reply import Reply
from llmproxy.mockbackend.stats import Gate, MockStats, RequestRecord

CHUNKED, LENGTH, CLOSE = 0, 1, 2
_FLUSH_AT = 64 * 1024  # bytes gathered before writing when events need no pacing
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


class Client(Protocol):
    """The connection a response is written to (connection.py)."""

    stats: MockStats
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    write_paused: bool

    def response_done(self) -> None: ...

    def reset_when_flushed(self) -> None: ...


class ResponseWriter:
    __slots__ = (
        "_body_bytes", "_conn", "_delay_elapsed", "_done", "_events", "_gate", "_hash", "_head",
        "_head_only", "_head_sent", "_knobs", "_mode", "_out", "_out_size", "_pending", "_record",
        "_reply", "_sent", "_stats", "_timer", "keep_alive", "waiting",
    )

    def __init__(self, conn: Client, reply: Reply, knobs: Knobs, record: RequestRecord | None,
                 *, keep_alive: bool, http10: bool, request_id: str | None, gate: Gate | None,
                 head_only: bool = False) -> None:
        self._conn = conn
        self._stats: MockStats = conn.stats
        self._reply = reply
        self._knobs = knobs
        self._record = record
        self._gate = gate
        if knobs.close_delimited or (reply.events is not None and http10):
            self._mode = CLOSE  # HTTP/1.0 has no chunked encoding either
        else:
            self._mode = CHUNKED if reply.events is not None else LENGTH
        self.keep_alive = keep_alive and self._mode != CLOSE and not reply.close_after
        self._head_only = head_only  # HEAD: the head a GET would get (Content-Length included), no body
        self._events: Iterator[bytes]
        if head_only or (reply.events is None and not reply.body):
            self._events = iter(())
        else:
            self._events = reply.events if reply.events is not None else iter((reply.body,))
        self._head = self._build_head(request_id)
        self._pending: bytes | None = None  # the next event, fetched but not yet sent
        self._out: list[bytes] = []
        self._out_size = 0
        self._hash = hashlib.sha256()
        self._body_bytes = self._sent = 0
        self._timer: asyncio.TimerHandle | None = None
        self._head_sent = self._done = self._delay_elapsed = False
        self.waiting: str | None = None  # what the response is blocked on: delay, gate, paused, stall

    def _build_head(self, request_id: str | None) -> bytes:
        reply = self._reply
        lines = [status_line(reply.status)]
        if reply.content_type is not None:
            lines.append(b"content-type: %b\r\n" % reply.content_type)
        if self._mode == LENGTH:
            lines.append(b"content-length: %d\r\n" % len(reply.body))
        elif self._mode == CHUNKED:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.extend(b"%b: %b\r\n" % pair for pair in reply.headers)
        if request_id is not None:
            lines.append(b"x-request-id: %b\r\n" % request_id.encode("latin-1", "replace"))
        if not self.keep_alive and not reply.close_after:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._reply.generation:
            self._stats.requests_waiting += 1
        delay = self._knobs.first_byte_delay
        if delay > 0:
            self.waiting = "first_byte"
            self._timer = self._conn.loop.call_later(delay, self._send_head)
        else:
            self._send_head()

    def _send_head(self) -> None:
        self._timer = None
        if self._reply.generation:
            self._stats.requests_waiting -= 1
            self._stats.requests_running += 1
        self._head_sent = True
        self._out.append(self._head)
        self.pump()

    def pump(self) -> None:
        """Send every event that may go now; stop at a reset, stall, back-pressure, delay, gate or the end."""
        self.waiting = None
        knobs = self._knobs
        while not self._done:
            if knobs.reset_after_bytes is not None and self._body_bytes >= knobs.reset_after_bytes:
                self._reset()
                return
            if self._sent == knobs.stall_after:
                self.waiting = "stall"  # keep the connection open and never send again
                break
            if self._pending is None:
                # looked up before the delay, so the end of a stream follows its last event at once
                self._pending = next(self._events, None)
                if self._pending is None:
                    self._finish()
                    return
            if self._conn.write_paused:
                self.waiting = "paused"  # the connection's resume_writing calls pump again
                break
            if self._sent and knobs.delay > 0 and not self._delay_elapsed:
                self.waiting = "delay"
                self._timer = self._conn.loop.call_later(knobs.delay, self._on_delay)
                break
            if self._sent and self._gate is not None and not self._gate.take():
                self.waiting = "gate"
                self._gate.wait(self._on_gate)
                break
            event, self._pending = self._pending, None
            self._emit(event)
        self._flush()

    def _emit(self, event: bytes) -> None:
        budget = self._knobs.reset_after_bytes
        if budget is not None and self._body_bytes + len(event) > budget:
            event = event[: budget - self._body_bytes]  # the reset check at the loop top fires next
        self._hash.update(event)
        self._body_bytes += len(event)
        self._sent += 1
        self._delay_elapsed = False
        if event:
            self._out.append(chunk(event) if self._mode == CHUNKED else event)
            self._out_size += len(event)
            if self._out_size >= _FLUSH_AT:
                self._flush()

    def _flush(self) -> None:
        if self._out:
            self._conn.transport.write(b"".join(self._out))
            self._out.clear()
            self._out_size = 0

    def _on_delay(self) -> None:
        self._timer = None
        self._delay_elapsed = True
        self.pump()

    def _on_gate(self) -> None:
        if not self._done:
            self.pump()

    def _finish(self) -> None:
        if self._mode == CHUNKED and not self._head_only:
            self._out.append(LAST_CHUNK)
        self._flush()
        self._complete("complete")
        if not self.keep_alive:
            self._conn.transport.close()  # close-delimited bodies end here; close() flushes first
        self._conn.response_done()

    def _reset(self) -> None:
        self._flush()
        self._complete("reset")
        self._stats.resets_sent += 1
        self._conn.reset_when_flushed()

    def connection_lost(self, by_server: bool) -> None:
        """The socket went away before the response ended."""
        if self._done:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._gate is not None:
            self._gate.forget(self._on_gate)
        if by_server:
            self._complete("server_close")
            return
        if self._head_sent:
            self._stats.client_disconnects_midstream += 1
        else:
            self._stats.client_disconnects_before_response += 1
        self._stats.last_disconnect_monotonic = time.monotonic()
        self._complete("client_disconnect")

    def _complete(self, outcome: str) -> None:
        self._done = True
        self.waiting = None
        done, self._reply.on_done = self._reply.on_done, None
        if done is not None:
            done()
        if self._reply.generation:
            if self._head_sent:
                self._stats.requests_running -= 1
            else:
                self._stats.requests_waiting -= 1
        if self._record is not None:
            self._record.outcome = outcome
            self._record.response_body_sha256 = self._hash.hexdigest()
            self._record.response_bytes = self._body_bytes


def abort_with_rst(transport: asyncio.Transport) -> None:
    """Drop the connection with a TCP RST, so the peer sees ECONNRESET rather than a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()
