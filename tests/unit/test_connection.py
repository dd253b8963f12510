"""The client connection (connection.py) driven through a fake transport and a fake clock.

Requests go through the real pipeline to fake upstream connections (tests/fakes.py), so what is checked is
what a client and a backend would see: bytes written, reads paused, connections closed, and the time at which
each timer acts, moved by hand.
"""

from __future__ import annotations

import pytest

from llmproxy.connection import WRITE_HIGH_WATER, Clients
from tests.fakes import (
    OK,
    STREAM_HEAD,
    Client,
    FakeLoop,
    backend,
    chat,
    chunk,
    http_request,
    json_response,
    make_clients,
    make_config,
    make_services,
    running,
    sample,
)

HEALTH = http_request("GET", "/health")


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def proxy(loop: FakeLoop, **sections) -> Clients:
    return make_clients(make_services(make_config(**sections), loop), loop)


def chat_with_id(request_id: str, **fields) -> bytes:
    raw = chat(**fields)
    return raw.replace(b"\r\n", f"\r\nX-Request-Id: {request_id}\r\n".encode(), 1)


# --- framing ------------------------------------------------------------------------------------------------


def test_a_request_split_over_many_reads_is_one_request_with_its_whole_body(loop):
    clients = proxy(loop)
    client = Client(clients, loop)
    raw = chat()
    for start in range(0, len(raw), 7):
        client.send(raw[start:start + 7])
    [upstream] = loop.upstreams
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert upstream.received.endswith(b"\r\n\r\n" + body)
    assert b"\r\nx-forwarded-for: 203.0.113.7\r\n" in upstream.received  # the peer, as the transport gave it
    assert client.transport.write_limits == (WRITE_HIGH_WATER, None)
    upstream.send(OK)
    [reply] = client.responses()
    assert reply.status == 200 and reply.json()["id"] == "c1"
    [ctx] = clients.services.access_log.requests
    assert ctx.body_done and ctx.termination == "--"


@pytest.mark.parametrize(("version", "headers", "kept", "connection_header"), [
    ("1.1", {}, True, None),
    ("1.1", {"Connection": "close"}, False, "close"),
    ("1.0", {}, False, "close"),
    ("1.0", {"Connection": "keep-alive"}, True, "keep-alive"),
])
def test_a_connection_is_kept_or_closed_after_a_response_as_its_request_asked(loop, version, headers, kept,
                                                                               connection_header):
    client = Client(proxy(loop), loop)
    client.send(http_request("GET", "/health", headers=headers, version=version))
    [reply] = client.responses()
    assert reply.status == 200
    assert reply.headers.get("connection") == connection_header
    assert client.transport.closed is not kept


# --- pipelining ---------------------------------------------------------------------------------------------


def test_a_pipelined_request_waits_for_the_one_before_and_reading_pauses(loop):
    client = Client(proxy(loop), loop)
    client.send(chat_with_id("first") + chat_with_id("second"))
    [upstream] = loop.upstreams
    assert b"x-request-id: first" in upstream.received and b"second" not in upstream.received
    assert client.transport.reading_calls == ["pause"]  # nothing more is read while a request waits
    upstream.send(OK)
    # The second starts once the first has ended, on the same (pooled) upstream connection.
    assert len(loop.upstreams) == 1 and b"x-request-id: second" in upstream.received
    assert client.transport.reading_calls == ["pause", "resume"]
    upstream.send(OK)
    assert [r.headers["x-request-id"] for r in client.responses()] == ["first", "second"]


def test_a_local_answer_behind_a_forwarded_request_is_not_written_before_it(loop):
    client = Client(proxy(loop), loop)
    client.send(chat_with_id("first") + HEALTH)
    assert client.transport.data == b""  # /health is instant, but its turn has not come
    loop.upstreams[0].send(OK)
    first, second = client.responses()
    assert first.headers["x-request-id"] == "first" and "choices" in first.json()
    assert second.json()["status"] == "ok"


def test_a_malformed_request_behind_a_good_one_is_answered_after_it_and_the_connection_closed(loop):
    clients = proxy(loop)
    client = Client(clients, loop)
    client.send(chat() + b"NOT HTTP\r\n\r\n")
    assert client.transport.data == b"" and not client.transport.is_closing()
    loop.upstreams[0].send(OK)
    assert [r.status for r in client.responses()] == [200, 400]
    assert client.responses()[1].headers["connection"] == "close" and client.transport.closed
    assert [r[1] for r in clients.services.access_log.rejected] == [400]


def test_each_request_takes_the_services_current_when_it_starts(loop):
    """A reload swaps Clients.services: a request already running keeps its snapshot, the next one (even one
    whose head arrived before the swap) gets the new one."""
    old = make_services(make_config(backends=[backend("a")]), loop)
    new = make_services(make_config(backends=[backend("b")]), loop, previous=old)
    clients = make_clients(old, loop)
    client = Client(clients, loop)
    client.send(chat_with_id("first") + chat_with_id("second"))
    clients.services = new  # the reload, while "first" is in flight and "second" waits
    [on_a] = loop.upstreams
    assert on_a.host == "a"
    on_a.send(OK)
    on_b = loop.upstreams[1]
    assert on_b.host == "b" and b"x-request-id: second" in on_b.received
    on_b.send(OK)
    assert [r.status for r in client.responses()] == [200, 200]
    assert new.generation == old.generation + 1


# --- keep-alive timer ---------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout_from_accept(loop):
    clients = proxy(loop, server={"timeouts": {"request_head": 10, "keepalive": 75}})
    client = Client(clients, loop)
    loop.advance(9.9)
    assert not client.transport.is_closing()
    loop.advance(0.2)
    assert client.transport.closed and client.transport.data == b""  # not a byte of a request: no answer
    assert clients.services.access_log.rejected == []


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(loop):
    client = Client(proxy(loop, server={"timeouts": {"keepalive": 75}}), loop)
    client.send(HEALTH)
    client.transport.writes.clear()
    loop.advance(74.9)
    assert not client.transport.is_closing()
    loop.advance(0.2)
    assert client.transport.closed and not client.transport.aborted
    assert client.transport.data == b""  # closed without a word, as between requests


def test_the_keepalive_timeout_counts_from_the_last_response_with_one_lazy_timer(loop):
    client = Client(proxy(loop, server={"timeouts": {"keepalive": 75}}), loop)
    for _ in range(100):
        loop.advance(0.5)
        client.send(HEALTH)
    last_response = loop.now
    assert loop.armed("_idle_timeout") == [75.0], "traffic must not cancel and re-arm the idle timer"
    loop.advance(last_response + 75 - loop.now - 0.1)
    assert not client.transport.is_closing()
    loop.advance(0.2)
    assert client.transport.closed
    assert len(client.responses()) == 100


# --- request-head timer -------------------------------------------------------------------------------------


def test_a_later_heads_deadline_runs_from_its_first_byte_and_trickling_does_not_extend_it(loop):
    clients = proxy(loop, server={"timeouts": {"request_head": 10, "keepalive": 75}})
    client = Client(clients, loop)
    client.send(HEALTH)
    client.transport.writes.clear()
    loop.advance(70)  # idle between requests is the keep-alive timer's business
    client.send(b"GET /health HTTP/1.1\r\nHost: p\r\nX-Slow: ")
    for _ in range(9):
        loop.advance(1)
        client.send(b"a")  # a byte a second: progress, but not a head
    loop.advance(0.9)  # 9.9 s after the first byte (and past the keep-alive time: a head in progress is not idle)
    assert client.transport.data == b"" and not client.transport.is_closing()
    loop.advance(0.2)
    [reply] = client.responses()
    assert reply.status == 408 and reply.json()["error"]["code"] == "request_timeout"
    assert client.transport.closed
    assert [r[1:3] for r in clients.services.access_log.rejected] == [(408, "cR")]


def test_a_pipelined_heads_deadline_starts_when_its_turn_comes(loop):
    client = Client(proxy(loop, server={"timeouts": {"request_head": 10}}), loop)
    client.send(chat() + b"GET /health HTTP/1.1\r\nHo")  # the second head is incomplete
    loop.advance(30)  # the first request runs for longer than a head may take
    assert client.transport.data == b""
    loop.upstreams[0].send(OK)
    loop.advance(9.9)
    assert [r.status for r in client.responses()] == [200]
    loop.advance(0.2)
    assert [r.status for r in client.responses()] == [200, 408]
    assert client.transport.closed


# --- body timer ---------------------------------------------------------------------------------------------


def test_a_stalled_body_is_answered_408_after_the_body_timeout_and_the_connection_closed(loop):
    clients = proxy(loop, server={"timeouts": {"body": 30}})
    client = Client(clients, loop)
    client.send(chat()[:-10])  # the last ten body bytes never come
    loop.advance(29.9)
    assert client.transport.data == b"" and loop.upstreams == []
    loop.advance(0.2)
    [reply] = client.responses()
    assert reply.status == 408 and reply.headers["connection"] == "close"
    assert client.transport.closed
    [ctx] = clients.services.access_log.requests
    assert ctx.termination == "cR"


def test_body_progress_keeps_a_slow_body_alive(loop):
    client = Client(proxy(loop, server={"timeouts": {"body": 30}}), loop)
    raw = chat()
    client.send(raw[:-5])
    for byte in range(len(raw) - 5, len(raw)):
        loop.advance(25)  # each pause is shorter than the body timeout; all of them together are not
        client.send(raw[byte:byte + 1])
    [upstream] = loop.upstreams
    assert upstream.received.endswith(raw[-20:])
    upstream.send(OK)
    assert [r.status for r in client.responses()] == [200]


def test_a_pipelined_bodys_timer_starts_when_its_turn_comes(loop):
    client = Client(proxy(loop, server={"timeouts": {"body": 30}}), loop)
    second = chat_with_id("second")
    client.send(chat_with_id("first") + second[:-10])
    loop.advance(60)  # reading is paused: the second body cannot progress, and must not be timed yet
    loop.upstreams[0].send(OK)
    loop.advance(29.9)
    assert [r.status for r in client.responses()] == [200]
    client.send(second[-10:])
    loop.upstreams[-1].send(OK)  # on a new connection: the pool closed the idle one after its idle_timeout
    assert [r.headers["x-request-id"] for r in client.responses()] == ["first", "second"]


# --- protocol errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"NOT HTTP\r\n\r\n", 400, "bad_request"),
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 4097\r\n\r\n", 413, "request_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "request_header_too_large"),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: p\r\n\r\n", 414, "uri_too_long"),
    (b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
    (b"GET / HTTP/2.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported"),
], ids=["garbage", "no-host", "content-length-over-limit", "head-over-limit", "target-over-limit", "gzip-te",
        "http2"])
def test_a_malformed_or_over_limit_request_is_answered_and_the_connection_closed(loop, raw, status, code):
    clients = proxy(loop, server={"max_body_size": 4096, "max_header_size": 8192, "max_request_line": 2048})
    client = Client(clients, loop)
    client.send(raw)
    [reply] = client.responses()
    assert (reply.status, reply.json()["error"]["code"]) == (status, code)
    assert reply.headers["connection"] == "close"
    assert client.transport.closed and loop.upstreams == []
    assert [r[1] for r in clients.services.access_log.rejected] == [status]
    assert sample(clients.services, "llmproxy_requests_total", backend="", status=str(status)) == 1


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: p\r\nContent-Length: 4097\r\n\r\n", 413),
    (b"POST /v1/messages HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
], ids=["content-length-over-limit", "upgrade"])
def test_a_request_refused_from_its_head_on_a_messages_path_is_answered_in_anthropics_shape(loop, raw, status):
    # The anthropic SDK (Claude Code) reads {"type": "error", "error": {"type", "message"}} on these paths.
    client = Client(proxy(loop, server={"max_body_size": 4096}), loop)
    client.send(raw)
    [reply] = client.responses()
    error = reply.json()
    assert reply.status == status and error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert client.transport.closed and loop.upstreams == []


def test_a_body_over_the_limit_is_answered_413_by_its_request(loop):
    clients = proxy(loop, server={"max_body_size": 100})
    client = Client(clients, loop)
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"50\r\n" + b"x" * 80 + b"\r\n")
    assert client.transport.data == b""  # within the limit so far: the request waits for the rest
    client.send(b"50\r\n" + b"x" * 80 + b"\r\n")
    [reply] = client.responses()
    assert reply.status == 413 and reply.headers["connection"] == "close"
    assert client.transport.closed and loop.upstreams == []
    [ctx] = clients.services.access_log.requests  # the request answered it: it has a context and a log line
    assert ctx.termination == "CR"


# --- connection lost ----------------------------------------------------------------------------------------


def test_losing_the_client_while_the_pipeline_waits_for_the_body_ends_the_request(loop):
    clients = proxy(loop)
    client = Client(clients, loop)
    client.send(chat()[:-10])
    client.lose()
    [ctx] = clients.services.access_log.requests
    assert (ctx.status, ctx.termination) == (499, "CR")
    assert clients.services.traffic.inflight == 0 and loop.upstreams == []
    assert client.transport.data == b"" and clients.connections == set()
    assert loop.timers_for("_body_tick") == [] and loop.timers_for("_idle_timeout") == []


@pytest.mark.parametrize(("upstream_sent", "termination"), [
    (b"", "CH"),
    (STREAM_HEAD + chunk(b'data: {"choices":[{"index":0}]}\n\n'), "CD"),
], ids=["before-the-head", "mid-stream"])
def test_losing_the_client_tells_the_exchange_which_drops_the_upstream_at_once(loop, upstream_sent, termination):
    clients = proxy(loop)
    client = Client(clients, loop)
    client.send(chat(stream=True))
    [upstream] = loop.upstreams
    if upstream_sent:
        upstream.send(upstream_sent)
    client.lose()
    assert upstream.transport.aborted  # the backend stops generating now
    [ctx] = clients.services.access_log.requests
    assert ctx.termination == termination
    [b] = clients.services.fleet.backends
    assert (b.in_flight, b.pool.checked_out, b.pool.idle_count, b.pool.open_count) == (0, 0, 0, 0)


def test_losing_the_client_while_its_request_waits_for_a_connect_cancels_the_connect(loop):
    clients = proxy(loop)
    loop.hang("a")
    client = Client(clients, loop)
    client.send(chat())
    [b] = clients.services.fleet.backends
    assert b.pool.open_count == 1  # connecting
    client.lose()
    assert b.pool.open_count == 0 and b.in_flight == 0
    [ctx] = clients.services.access_log.requests
    assert (ctx.status, ctx.termination) == (499, "CH")


def test_losing_the_client_while_its_request_waits_for_a_pooled_connection_frees_its_place(loop):
    clients = proxy(loop, backends=[backend("a", max_connections=1, max_waiters=1)])
    holder, leaver, next_in_line = Client(clients, loop), Client(clients, loop), Client(clients, loop)
    holder.send(chat())  # takes the backend's only connection
    leaver.send(chat())  # waits for it
    leaver.lose()
    next_in_line.send(chat())  # the one place in line is free again
    assert next_in_line.transport.data == b""
    [upstream] = loop.upstreams
    upstream.send(OK)
    upstream.send(OK)  # the same connection, handed over
    assert [r.status for r in next_in_line.responses()] == [200]
    statuses = sorted((ctx.status, ctx.termination) for ctx in clients.services.access_log.requests)
    assert statuses == [(200, "--"), (200, "--"), (499, "CH")]


# --- refusals and draining ----------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["max_connections", "draining"])
def test_a_connection_over_the_limit_or_while_draining_is_refused_and_the_others_kept(loop, refusal):
    clients = proxy(loop, server={"max_connections": 1 if refusal == "max_connections" else 100})
    first = Client(clients, loop)
    if refusal == "draining":
        clients.traffic.draining = True
    second = Client(clients, loop)
    assert second.transport.aborted and second.conn.closed and second.transport.data == b""
    assert clients.connections == {first.conn} and not first.transport.is_closing()
    assert loop.timers_for("_head_timeout") == [10.0]  # the refused one has no timer


def test_while_draining_idle_connections_close_and_a_response_in_flight_closes_its_own(loop):
    clients = proxy(loop)
    idle, busy = Client(clients, loop), Client(clients, loop)
    busy.send(chat())
    clients.traffic.draining = True
    clients.close_idle()
    assert idle.transport.closed and not busy.transport.is_closing()
    loop.upstreams[0].send(OK)
    [reply] = busy.responses()
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert busy.transport.closed


@pytest.mark.parametrize(("buffered", "drained_in_time", "aborted", "reset"), [
    (10_000, False, True, True),  # the client never read: dropped with a TCP reset
    (10_000, True, True, False),  # it read everything: the abort finds nothing to discard
    (0, False, False, False),  # nothing left to send: no timer at all
])
def test_closing_is_bounded_by_the_write_timeout(loop, buffered, drained_in_time, aborted, reset):
    client = Client(proxy(loop, server={"timeouts": {"write": 20}}), loop)
    client.transport.buffered = buffered
    client.conn.close_if_idle()
    assert client.transport.closed and not client.transport.aborted
    loop.advance(19.9)
    assert not client.transport.aborted
    if drained_in_time:
        client.transport.buffered = 0
    loop.advance(0.2)
    assert client.transport.aborted is aborted
    assert client.transport.sock.linger_zero is reset


def test_close_if_idle_leaves_a_connection_with_a_request_in_flight(loop):
    client = Client(proxy(loop), loop)
    client.send(chat())
    client.conn.close_if_idle()
    assert not client.transport.is_closing()
    loop.upstreams[0].send(json_response({"ok": True}))
    assert [r.status for r in client.responses()] == [200] and not client.transport.is_closing()
