"""One upstream connection (upstream/connection.py) on a fake transport: the backend's bytes in, the events its
sink (the relay) gets out, and when the connection may serve another request.

The sink only records (RecordingSink); the backend's part is played through FakeUpstream (send, eof, close).
"""

from __future__ import annotations

import pytest

from llmproxy.upstream import connection as connection_module
from llmproxy.upstream.connection import PROTOCOL_ERROR, UPSTREAM_FAILED
from tests.fakes import FakeUpstream, HandClock, RecordingSink, chunk, running, upstream_connection

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: a:8000\r\ncontent-length: 2\r\n\r\n{}"
LENGTH = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"hello") + b"0\r\n\r\n"
CLOSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"  # no framing: the body ends with the connection


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def begun(loop, is_head: bool = False, **options) -> tuple[FakeUpstream, RecordingSink]:
    upstream = upstream_connection(loop, **options)
    sink = RecordingSink(upstream.conn.body)
    upstream.conn.begin(sink, REQUEST, is_head)
    return upstream, sink


# --- begin, the events of one exchange, detach ---------------------------------------------------------------


def test_begin_sends_the_request_and_routes_the_response_to_the_sink_with_an_end_of_read_per_read(loop):
    upstream, sink = begun(loop)
    assert upstream.received == REQUEST
    assert not upstream.conn.received_any
    upstream.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    upstream.send(chunk(b"one") + chunk(b"two"))
    upstream.send(b"0\r\n\r\n")
    assert sink.events == [("head", 200), ("end_of_read",),
                           ("body", b"one"), ("body", b"two"), ("end_of_read",),
                           ("complete",)]  # the last read ended the response: its sink is gone, no end_of_read
    assert upstream.conn.received_any and upstream.conn.complete


def test_each_read_is_stamped_with_the_time_it_was_read(loop, monkeypatch):
    clock = HandClock()
    monkeypatch.setattr(connection_module, "perf_counter", clock)
    upstream, _ = begun(loop)
    upstream.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert upstream.conn.read_at == clock.now
    clock.advance(2.5)
    upstream.send(chunk(b"x"))
    assert upstream.conn.read_at == clock.now


def test_a_second_exchange_on_the_same_connection_starts_afresh(loop):
    upstream, first = begun(loop)
    upstream.send(LENGTH)
    second = RecordingSink(upstream.conn.body)
    upstream.conn.begin(second, REQUEST, False)
    assert not upstream.conn.complete and not upstream.conn.received_any
    upstream.send(CHUNKED)
    assert first.events == [("head", 200), ("body", b"hello"), ("complete",)]
    assert second.events == [("head", 200), ("body", b"hello"), ("complete",)]
    assert upstream.received == REQUEST * 2


def test_after_detach_the_rest_of_a_response_reaches_no_sink_and_kills_the_connection(loop):
    upstream, sink = begun(loop)
    upstream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
    upstream.conn.detach()
    upstream.send(b"world")
    assert sink.of("body") == [("body", b"hello")] and sink.of("complete") == []
    assert upstream.conn.closed and upstream.transport.aborted
    upstream.close()  # the transport reports the abort: the sink that left is not told
    assert sink.of("lost") == []


class _RefusingSink(RecordingSink):
    """Detaches at the head, as the relay does with a status it refuses."""

    def __init__(self, conn) -> None:
        super().__init__(conn.body)
        self._conn = conn

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        super().on_response_head(status, headers, framing)
        self._conn.detach()


def refused_at_the_head(loop, response: bytes) -> tuple[FakeUpstream, _RefusingSink]:
    """`response` arrives in one read on a connection whose sink detaches at the head."""
    upstream = upstream_connection(loop)
    sink = _RefusingSink(upstream.conn)
    upstream.conn.begin(sink, REQUEST, False)
    upstream.send(response)
    return upstream, sink


def test_the_body_that_follows_a_detach_in_the_same_read_is_dropped_at_the_end_of_that_read(loop):
    upstream, sink = refused_at_the_head(
        loop, b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nbusy, busy")
    assert sink.events == [("head", 503)]
    assert upstream.conn.body == []


def test_a_body_that_breaks_after_a_detach_in_the_same_read_is_dropped_with_the_connection(loop):
    upstream, sink = refused_at_the_head(
        loop, b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n5\r\nbusy!\r\nzz\r\n")
    assert sink.events == [("head", 503)]
    assert upstream.conn.body == [] and upstream.conn.closed


def test_a_head_request_completes_with_its_head(loop):
    upstream, sink = begun(loop, is_head=True)
    upstream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # the length of the body a GET would get
    assert sink.events == [("head", 200), ("complete",)]
    assert upstream.conn.complete


@pytest.mark.parametrize("informational", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                           b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"])
def test_an_informational_response_is_no_head_of_its_own(loop, informational):
    upstream, sink = begun(loop)
    upstream.send(informational)
    upstream.send(LENGTH)
    assert sink.of("head") == [("head", 200)] and sink.of("complete") == [("complete",)]


# --- idle: any byte or EOF makes it dead ---------------------------------------------------------------------


@pytest.mark.parametrize("history", ["never used", "after a response"])
def test_bytes_on_an_idle_connection_make_it_dead(loop, history):
    upstream = upstream_connection(loop)
    sink = RecordingSink(upstream.conn.body)
    if history == "after a response":
        upstream.conn.begin(sink, REQUEST, False)
        upstream.send(LENGTH)
        sink.events.clear()
    upstream.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert upstream.conn.closed and upstream.transport.aborted and not upstream.conn.reusable()
    assert sink.events == []


def test_an_eof_on_an_idle_connection_makes_it_dead(loop):
    upstream, sink = begun(loop)
    upstream.send(LENGTH)
    assert upstream.conn.reusable()
    upstream.eof()  # the backend's keep-alive timeout closed it while it sat in the pool
    assert upstream.conn.closed and not upstream.conn.reusable()
    assert sink.of("lost") == []


def test_bytes_after_the_end_of_a_response_in_the_same_read_make_the_connection_not_reusable(loop):
    upstream, first = begun(loop)
    upstream.send(LENGTH + b"HTTP/1.1 200 OK\r\n")  # e.g. a Content-Length that undercounts the body
    assert first.of("complete") == [("complete",)]
    assert not upstream.conn.reusable()


# --- reusable() ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("response", "is_head", "unsent", "reusable"), [
    (LENGTH, False, 0, True),
    (CHUNKED, False, 0, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, 0, True),
    (LENGTH.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1), False, 0, False),  # the backend closes it
    (b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello", False, 0, False),  # 1.0 without keep-alive
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\nhello", False, 0, True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", True, 0, False),  # a HEAD: the parser expects a body
    (LENGTH, False, 100, False),  # answered before the whole request was sent: the rest would go first
    (LENGTH[:-2], False, 0, False),  # not ended
], ids=["length", "chunked", "204", "connection-close", "http10", "http10-keep-alive", "head", "unsent",
        "unfinished"])
def test_a_connection_is_reusable_only_after_a_clean_keep_alive_end_with_nothing_left_unsent(
        loop, response, is_head, unsent, reusable):
    upstream, _ = begun(loop, is_head=is_head)
    upstream.transport.buffered = unsent
    upstream.send(response)
    assert upstream.conn.reusable() is reusable


def test_a_close_delimited_body_ends_cleanly_at_eof_and_its_connection_is_not_reused(loop):
    upstream, sink = begun(loop)
    upstream.send(CLOSE_HEAD + b"hel")
    upstream.send(b"lo")
    assert sink.of("complete") == [] and not upstream.conn.complete
    assert not upstream.conn.eof_received()  # the transport is to close itself...
    assert upstream.conn.complete and not upstream.conn.reusable()  # ...and the pipeline may ask before it has
    upstream.close()
    assert sink.events == [("head", 200), ("body", b"hel"), ("end_of_read",), ("body", b"lo"), ("end_of_read",),
                           ("complete",)]  # and no "lost" when the transport reports its close


def test_an_aborted_connection_is_not_reusable(loop):
    upstream, _ = begun(loop)
    upstream.send(LENGTH)
    upstream.conn.abort()
    assert upstream.transport.aborted and not upstream.conn.reusable()


# --- lost before the end -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "ending", "reason"), [
    (b"", "close", "backend closed the connection"),
    (b"HTTP/1.1 200 OK\r\ncontent-", "close", "backend closed the connection"),
    (LENGTH[:-2], "close", "backend closed the connection"),
    (LENGTH[:-2], "reset", "backend connection lost: [Errno 104] Connection reset by peer"),
    (LENGTH[:-2], "eof", "backend closed the connection"),  # an EOF ends only a close-delimited body
    (CLOSE_HEAD[:-2], "eof", "backend closed the connection"),  # ...after its head
    (CHUNKED[:-5], "eof", "backend closed the connection"),
], ids=["nothing", "mid-head", "mid-length", "reset-mid-length", "eof-mid-length", "eof-mid-close-head",
        "eof-before-last-chunk"])
def test_a_connection_lost_before_the_end_is_reported_once(loop, sent, ending, reason):
    upstream, sink = begun(loop)
    if sent:
        upstream.send(sent)
    if ending == "eof":
        upstream.eof()
    else:
        upstream.close(ConnectionResetError(104, "Connection reset by peer") if ending == "reset" else None)
    upstream.close()  # a second report of the close, as an abort's own connection_lost would be
    assert sink.of("lost") == [("lost", UPSTREAM_FAILED, reason)]
    assert sink.of("complete") == [] and upstream.conn.closed


def test_a_connection_lost_after_the_end_is_not_reported(loop):
    upstream, sink = begun(loop)
    upstream.send(CHUNKED)
    upstream.close()
    assert sink.of("lost") == [] and sink.of("complete") == [("complete",)]


# --- protocol errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reads", "reason"), [
    ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"zz\r\nhello\r\n"], "malformed response body:"),
    ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n"], "malformed response:"),
    ([b"NOT HTTP AT ALL\r\n\r\n"], "malformed response:"),
    ([b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n"], "response head of"),
    ([b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * 3000], "response head over 1024 bytes"),
    ([b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"], "backend switched protocols"),
], ids=["bad-chunk-size-after-head", "bad-chunk-size-with-head", "not-http", "head-over-limit",
        "header-line-without-end", "switching-protocols"])
def test_a_malformed_response_is_a_protocol_error_reported_once_and_the_connection_dropped(loop, reads, reason):
    upstream, sink = begun(loop, max_header_size=1024)
    for data in reads:
        upstream.send(data)
    upstream.close()  # the abort's own connection_lost
    [(_, kind, message)] = sink.of("lost")
    assert kind == PROTOCOL_ERROR and message.startswith(reason)
    assert upstream.conn.closed and upstream.transport.aborted and not upstream.conn.reusable()
    assert sink.of("complete") == []
