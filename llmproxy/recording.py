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

    __slots__ = ("_cap", "_chunks", "_flight", "_head", "_orphaned", "_sent", "_whole")

    def __init__(self, ctx: RequestContext, upstream: UpstreamConnection, backend: Backend,
                 settings: RelaySettings, refuse_statuses: frozenset[int], flight: Flight) -> None:
        super().__init__(ctx, upstream, backend, settings, refuse_statuses)
        self._flight = flight
        self._head: FlightHead | None = None  # the response head, until the followers are told of it
        self._orphaned = False  # the leader's client is gone; the upstream is read for the followers
        # The chunks relayed: the flight's own list while it records (one append per chunk is all the relay does
        # for the cache), a scratch list cleared each read once the answer is past the flight's max_entry.
        self._chunks: list[bytes] = flight.chunks if flight.chunks is not None else []
        self._sent = len(self._chunks)  # how many of them the followers have
        # bytes_out beyond which the answer is too big to keep (-1: already is, every read clears the scratch)
        self._cap = ctx.bytes_out + flight.max_entry if flight.chunks is not None else -1
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
        Exchange._forward(self, data)
        self._chunks.append(data)  # what followers and the cache get: the same bytes the leader's client got

    def end_of_read(self) -> None:
        Exchange.end_of_read(self)
        ctx = self.ctx
        if self._head is not None or self._flight.followers or ctx.bytes_out > self._cap:
            self._hand_on()
        if ctx.conn.writing_paused and not self._orphaned:
            self._client_behind()

    def _send_ping(self) -> None:
        Exchange._send_ping(self)
        self._hand_on()

    def _hand_on(self) -> None:
        """What went to the leader's client goes on: the head once, the new chunks to the followers; past
        max_entry the flight stops keeping them."""
        flight = self._flight
        head = self._head
        if head is not None and self.ctx.response_started:
            self._head = None
            flight.started(head)
        chunks = self._chunks
        if flight.followers and len(chunks) > self._sent:
            flight.publish(chunks[self._sent:])
        self._sent = len(chunks)
        if self._cap >= 0 and self.ctx.bytes_out > self._cap:
            flight.too_big()
            self._cap = -1
            self._chunks = chunks = []
        if self._cap < 0:
            chunks.clear()
            self._sent = 0

    def _client_behind(self) -> None:
        """The leader's client is not keeping up: alone, it paces the upstream (as any relay's client does);
        with followers, it is cut once max_lag behind."""
        if not self._flight.followers:
            Exchange.client_paused(self)
        elif self.ctx.conn.transport.get_write_buffer_size() > self._flight.max_lag:
            self._cut_leader()

    def _client_holds_upstream(self) -> bool:
        # With followers (or none but them) the leader's client paces nothing: a silent backend is idle.
        return self.ctx.conn.writing_paused and not self._orphaned and not self._flight.followers

    def _completed(self) -> None:
        self._whole = True
        self._flight.complete()

    def _end(self) -> None:
        super()._end()
        if not self._whole:
            self._flight.failed()
            self._sent = len(self._chunks)  # a failed attempt's chunks are gone (or were never the flight's)

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
        self._write = self._write_pieces = _discard
        self._out.clear()  # its chunks still go to the flight (self._chunks)
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._resume_upstream()  # nobody paces the upstream now but the followers' own bounds

    def _follower_joined(self) -> None:
        """A follower joined, given every chunk so far: the next ones are new to it; and its client must not
        wait on the leader's (which may have paused the upstream while alone)."""
        self._sent = len(self._chunks)
        self._resume_upstream()

    def _resume_upstream(self) -> None:
        upstream = self.upstream
        if upstream.transport is not None and not upstream.closed and not upstream.transport.is_reading():
            upstream.transport.resume_reading()

    def _abandon(self) -> None:
        """Every client has gone: close the upstream."""
        super().client_lost()
