"""The relay of a cacheable request: the leader of identical requests in flight (cache/flight.py).

RecordingExchange is relay.py's Exchange that also hands what it relays to its client to its Flight, for the
requests that follow it and for the cache. Only cacheable requests get one (the pipeline chooses): the relay of
every other request pays nothing for caching, not even a test per chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmproxy.cache.flight import Flight, FlightHead
from llmproxy.relay import Exchange, _header, _is_streaming, _translated_headers

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.services import RelaySettings
    from llmproxy.upstream.connection import UpstreamConnection


def _discard(data: bytes) -> None:
    pass


class RecordingExchange(Exchange):
    """An Exchange whose relayed bytes also go to its Flight (chunk references, and only while the response
    is within the cache's max_entry_kb).

    With followers, the leader's client no longer paces the upstream: it is cut when `max_lag` bytes behind,
    as a follower is, and if it goes away the upstream goes on for the followers (until they too have gone).
    """

    __slots__ = ("_flight", "_head", "_orphaned", "_whole")

    def __init__(self, ctx: RequestContext, upstream: UpstreamConnection, backend: Backend,
                 settings: RelaySettings, refuse_statuses: frozenset[int], flight: Flight) -> None:
        super().__init__(ctx, upstream, backend, settings, refuse_statuses)
        self._flight = flight
        self._head: FlightHead | None = None  # the response head, until the followers are told of it
        self._orphaned = False  # the leader's client is gone; the upstream is read for the followers
        self._whole = False
        flight.abandon = self._abandon
        flight.joined = self._follower_joined

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        super().on_response_head(status, headers, framing)
        if self._pending_head is None:
            return  # refused: the pipeline retries elsewhere
        streaming = _is_streaming(headers)
        meter = self.ctx.meter
        if meter is not None and meter.translation is not None:
            headers = _translated_headers(headers, streaming)
        content_type = _header(headers, b"content-type")
        self._head = FlightHead(status, [(b"content-type", content_type)] if content_type else [], streaming)

    def _forward(self, data: bytes) -> None:
        super()._forward(data)
        self._flight.add(data)

    def end_of_read(self) -> None:
        super().end_of_read()
        self._announce()
        conn = self.ctx.conn
        if conn.writing_paused and not self._orphaned:
            if not self._flight.followers:
                super().client_paused()  # alone again: its client paces the upstream, as any relay's
            elif conn.transport.get_write_buffer_size() > self._flight.max_lag:
                self._cut_leader()

    def _send_ping(self) -> None:
        super()._send_ping()
        self._announce()

    def _announce(self) -> None:
        head = self._head
        if head is not None and self.ctx.response_started:
            self._head = None
            self._flight.started(head)
        self._flight.flush()

    def _completed(self) -> None:
        self._whole = True
        self._flight.complete()

    def _end(self) -> None:
        super()._end()
        if not self._whole:
            self._flight.failed()

    def client_paused(self) -> None:
        if not self._flight.followers:
            super().client_paused()
        elif self._write_timer is None:  # the others go on; this client is cut if it reads nothing in time
            self._write_timer = self._loop.call_later(self._settings.write_timeout, self._write_timeout)

    def client_lost(self) -> None:
        if self._orphaned:
            return
        if self._flight.leader_lost():
            self.ctx.termination = "CD" if self.ctx.response_started else "CH"
            self._orphan()
            return
        super().client_lost()

    def _write_timeout(self) -> None:
        if self._flight.followers and not self._orphaned:
            self._write_timer = None
            self._cut_leader()
            return
        super()._write_timeout()

    def _cut_leader(self) -> None:
        """The leader's client fell too far behind: it is cut, the upstream goes on for the followers."""
        ctx = self.ctx
        ctx.termination = "cD"
        ctx.error_message = "client fell too far behind a shared stream"
        ctx.keep_alive = False
        self._flight.leader_lost()
        self._orphan()
        ctx.conn.reset()

    def _orphan(self) -> None:
        self._orphaned = True
        self._write = _discard
        self._out.clear()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._follower_joined()  # nobody paces the upstream now but the followers' own bounds

    def _follower_joined(self) -> None:
        upstream = self.upstream
        if upstream.transport is not None and not upstream.closed and not upstream.transport.is_reading():
            upstream.transport.resume_reading()

    def _abandon(self) -> None:
        """Every client has gone: close the upstream."""
        super().client_lost()
