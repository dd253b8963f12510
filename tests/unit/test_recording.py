"""The leader's relay (recording.py): what its client gets also goes to its flight, driven on fakes."""

from __future__ import annotations

import pytest

from llmproxy.cache.flight import FOLLOWED, Flight, Follower
from llmproxy.recording import RecordingExchange
from tests.fakes import (
    STREAM_HEAD,
    FakeBackend,
    FakeClientSide,
    chat,
    chunk,
    relay_settings,
    request_context,
    running,
    upstream_connection,
)
from tests.unit.test_relay import END, UPSTREAM_REQUEST


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def lead(loop, max_entry: int = 10_000) -> tuple[RecordingExchange, Flight, object]:
    closed: list[Flight] = []
    flight = Flight(b"k", max_entry, 1000, closed.append)
    ctx = request_context(chat(stream=True))
    upstream = upstream_connection(loop)
    exchange = RecordingExchange(ctx, upstream.conn, FakeBackend(), relay_settings(loop), frozenset(), flight)
    exchange.start(UPSTREAM_REQUEST)
    loop.run_ready()
    return exchange, flight, upstream


def follower_of(flight: Flight) -> tuple[Follower, FakeClientSide]:
    client = FakeClientSide()
    one = Follower(client, lambda head: b"H%d|" % head.status, 1000, 30.0)
    assert flight.join(one)
    return one, client


def test_the_flight_records_what_the_leaders_client_got_and_a_follower_gets_it_too(loop):
    exchange, flight, upstream = lead(loop)
    one, client = follower_of(flight)
    upstream.send(STREAM_HEAD + chunk(b"a") + chunk(b"b"))
    late, late_client = follower_of(flight)  # mid-stream: the chunks so far, then live
    upstream.send(chunk(b"c") + END)
    assert exchange.done.done() and flight.state == "complete"
    assert flight.chunks == [b"ab", b"c"] and flight.head.status == 200  # a read's chunks are one
    assert one.done.result() == late.done.result() == FOLLOWED
    expected = b"H200|" + chunk(b"ab") + chunk(b"c") + END
    assert client.transport.data == late_client.transport.data == expected


def test_the_upstream_outlives_the_leaders_client_until_every_follower_has_gone(loop):
    exchange, flight, upstream = lead(loop)
    one, _ = follower_of(flight)
    upstream.send(STREAM_HEAD + chunk(b"a"))
    exchange.ctx.conn.closed = True
    exchange.client_lost()  # the leader's client goes: its follower keeps the stream
    assert not upstream.transport.aborted and not exchange.done.done()
    upstream.send(chunk(b"b"))
    one.client_lost()  # the last client goes: the upstream is closed
    assert upstream.transport.aborted and exchange.done.done()
    assert exchange.ctx.termination == "CD"


def test_an_answer_past_max_entry_is_not_kept_and_takes_no_latecomers(loop):
    exchange, flight, upstream = lead(loop, max_entry=3)
    upstream.send(STREAM_HEAD + chunk(b"ab"))
    assert flight.chunks == [b"ab"] and flight.joinable
    upstream.send(chunk(b"cd") + END)
    assert flight.chunks is None and not flight.joinable and flight.state == "complete"
    assert exchange.ctx.bytes_out == 4


def test_a_silent_backend_is_idle_for_the_followers_even_when_the_leaders_client_was_paused(loop):
    closed: list[Flight] = []
    flight = Flight(b"k", 10_000, 1000, closed.append)
    ctx = request_context(chat(stream=True))
    upstream = upstream_connection(loop)
    exchange = RecordingExchange(ctx, upstream.conn, FakeBackend(stream_idle_timeout=2.0),
                                 relay_settings(loop, tick=0.5, write_timeout=30.0), frozenset(), flight)
    exchange.start(UPSTREAM_REQUEST)
    one, _ = follower_of(flight)
    upstream.send(STREAM_HEAD + chunk(b"a"))
    ctx.conn.writing_paused = True  # the leader's client stopped reading, then went away
    exchange.client_paused()
    ctx.conn.closed = True
    exchange.client_lost()
    loop.advance(3.0)
    assert upstream.transport.aborted and one.done.result() == "truncated"
