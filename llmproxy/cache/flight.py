"""Singleflight: identical requests in flight share one upstream request.

The first request of a key leads: it goes upstream as usual, and its relay (recording.py's RecordingExchange)
appends every chunk it writes to its own client to the Flight's `chunks` (a reference, nothing copied) and, at
the end of each upstream read, `publish`es the read's chunks to the followers. Identical requests that arrive
meanwhile follow: each gets the stream from its first byte (the chunks so far, then live), through its own
Follower.

Backpressure is per client. The upstream is read at the pace of the leader's client while it is alone; once
followers are there, no client holds it back: a client that falls `max_lag` bytes behind (follower or leader)
is cut, a truncation the others never notice. A leader whose client goes away keeps reading for its followers;
the upstream is closed only when every client has gone.

The chunks so far are kept (as references) while the response stays within `max_entry` bytes: the cache stores
them when the response completes, and latecomers start from them. Past it the flight takes no new followers
and the answer is not stored. A flight that fails before its response head leaves its followers free to go
upstream on their own; after it, they are truncated like the leader's client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol

from llmproxy.cache.entry import Usage
from llmproxy.http11.wire import LAST_CHUNK, chunk

LIVE, COMPLETE, FAILED = "live", "complete", "failed"
# How a follower's stream ended: the whole of it; cut for falling behind (or not reading in time); the flight
# failed after its head (truncated); the client went away; the flight ended before any head (go upstream alone).
FOLLOWED, CUT, TRUNCATED, GONE, FALLBACK = "complete", "cut", "truncated", "gone", "fallback"


class ClientWriter(Protocol):
    """A client connection as a follower writes to it (connection.py's ClientConnection)."""

    transport: asyncio.Transport
    writing_paused: bool

    def abort(self) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FlightHead:
    """The response head as the backend gave it (the relay's view of it, translated if translated)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    streaming: bool


def chunk_frames(chunks: list[bytes]) -> bytes:
    """`chunks` in HTTP/1.1 chunked framing, as one write."""
    return b"".join([chunk(piece) for piece in chunks if piece])


class Flight:
    __slots__ = ("_close_joins", "abandon", "chunks", "followers", "head", "joined", "key",
                 "leader_gone", "max_entry", "max_lag", "settled", "state")

    def __init__(self, key: bytes, max_entry: int, max_lag: int, close_joins: Callable[[Flight], None]) -> None:
        self.key = key
        self.max_entry = max_entry
        self.max_lag = max_lag  # how far behind a client may fall before it is cut
        self.chunks: list[bytes] | None = []  # None: past max_entry, neither stored nor joinable
        self.head: FlightHead | None = None
        self.state = LIVE
        self.followers: set[Follower] = set()
        self.leader_gone = False
        self.abandon: Callable[[], None] | None = None  # closes the upstream (set by the leader's relay)
        self.joined: Callable[[], None] | None = None  # the leader's relay: no client paces the upstream now
        self._close_joins = close_joins  # takes the flight out of the cache's table of flights
        # The leader's usage and backend, for the followers' records: set when the leader's request ends. Made
        # with the first follower: most flights have none.
        self.settled: asyncio.Future[tuple[Usage | None, str]] | None = None

    @property
    def joinable(self) -> bool:
        return self.state == LIVE and self.chunks is not None and not self.leader_gone

    def join(self, follower: Follower) -> bool:
        """Add a follower; False if the flight takes no more (then the request goes upstream alone)."""
        if not self.joinable:
            return False
        if self.settled is None:
            self.settled = asyncio.get_running_loop().create_future()
        self.followers.add(follower)
        follower.flight = self
        if self.joined is not None:
            self.joined()
        if self.head is not None:
            follower.begin(self.head)
            follower.send(chunk_frames(self.chunks))
        return True

    def leave(self, follower: Follower) -> None:
        self.followers.discard(follower)
        if self.leader_gone and not self.followers and self.state == LIVE and self.abandon is not None:
            self.abandon()  # every client has gone

    # From the leader's relay ------------------------------------------------------------------------

    def started(self, head: FlightHead) -> None:
        """The response head went out to the leader's client: the followers get theirs."""
        self.head = head
        for follower in list(self.followers):
            follower.begin(head)

    def publish(self, new: list[bytes]) -> None:
        """New chunks (of one upstream read): to every follower in one write each. While the flight records,
        the relay has already appended them to `chunks` (it appends to that very list)."""
        frames = chunk_frames(new)
        for follower in list(self.followers):
            follower.send(frames)

    def too_big(self) -> None:
        """The answer outgrew max_entry: nothing kept, nothing stored, no latecomers."""
        self.chunks = None
        self._close_joins(self)

    def complete(self) -> None:
        self.state = COMPLETE
        self._close_joins(self)
        for follower in list(self.followers):
            follower.send(LAST_CHUNK)
            follower.end_of_stream()

    def failed(self) -> None:
        """The attempt ended without completing: before its head, the leader may retry (the flight goes on,
        empty again); after it, every follower is truncated."""
        if self.head is None:
            if self.chunks is not None:
                self.chunks.clear()
            else:  # the failed attempt was too big: the next one records afresh
                self.chunks = []
            return
        if self.state == LIVE:
            self.state = FAILED
            self._close_joins(self)
            for follower in list(self.followers):
                follower.truncate()

    def leader_lost(self) -> bool:
        """The leader's client went away: True if followers remain (the upstream goes on for them)."""
        if not self.followers or self.state != LIVE:
            return False
        self.leader_gone = True
        self._close_joins(self)
        return True

    def end(self, usage: Usage | None, backend: str) -> None:
        """The leader's request ended (its record is built): followers still without a head go upstream alone."""
        self._close_joins(self)
        if self.head is None:
            for follower in list(self.followers):
                follower.fallback()
        if self.settled is not None and not self.settled.done():
            self.settled.set_result((usage, backend))


class Follower:
    """One client's copy of a shared (or stored) response, with its own backpressure: what its socket does not
    take waits here, up to `max_lag` bytes; beyond that, or after `write_timeout` without the client reading,
    it is cut. It is the request's ResponseStream (context.py): the client connection tells it of pauses."""

    __slots__ = ("_conn", "_ended", "_head_for", "_lag", "_loop", "_max_lag", "_pending", "_timer",
                 "_write_timeout", "bytes_out", "done", "first_byte_at", "flight", "head")

    def __init__(self, conn: ClientWriter, head_for: Callable[[FlightHead], bytes], max_lag: float,
                 write_timeout: float) -> None:
        self._conn = conn
        self._head_for = head_for  # this client's response head for a flight's head
        self._max_lag = max_lag
        self._write_timeout = write_timeout
        self._loop = asyncio.get_running_loop()
        self._pending: deque[bytes] = deque()
        self._lag = 0
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        self.flight: Flight | None = None
        self.head: FlightHead | None = None
        self.bytes_out = 0
        self.first_byte_at = 0.0
        self.done: asyncio.Future[str] = self._loop.create_future()

    def begin(self, head: FlightHead) -> None:
        self.head = head
        self.send(self._head_for(head))

    def send(self, data: bytes) -> None:
        if self.done.done() or not data:
            return
        if self._pending or self._conn.writing_paused:
            self._pending.append(data)
            self._lag += len(data)
            if self._lag > self._max_lag:
                self._cut()
            return
        self._write(data)

    def end_of_stream(self) -> None:
        self._ended = True
        if not self._pending:
            self._finish(FOLLOWED)

    def truncate(self) -> None:
        if not self.done.done():
            self._conn.abort()
            self._finish(TRUNCATED)

    def fallback(self) -> None:
        self._finish(FALLBACK)

    # ResponseStream: from the client connection ------------------------------------------------------

    def client_paused(self) -> None:
        if self._timer is None and not self.done.done():
            self._timer = self._loop.call_later(self._write_timeout, self._cut)

    def client_resumed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = self._pending
        while pending and not self._conn.writing_paused:  # paced as the client reads
            data = pending.popleft()
            self._lag -= len(data)
            self._write(data)
        if self._ended and not pending:
            self._finish(FOLLOWED)

    def client_lost(self) -> None:
        self._finish(GONE)

    # internals ----------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self.first_byte_at and self.head is not None:
            self.first_byte_at = perf_counter()
        self.bytes_out += len(data)
        self._conn.transport.write(data)

    def _cut(self) -> None:
        if not self.done.done():
            self._conn.reset()  # a client that stopped reading: free what the kernel still queues for it
            self._finish(CUT)

    def _finish(self, outcome: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        if not self.done.done():
            self.done.set_result(outcome)
        flight = self.flight
        if flight is not None:
            self.flight = None
            flight.leave(self)
