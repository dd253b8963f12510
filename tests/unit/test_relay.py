"""The relay (relay.py): one upstream exchange streamed to the client, driven on fakes.

An Exchange is built as the pipeline builds it, on a request context whose connection is a FakeClientSide and
an upstream connection on a FakeTransport (tests/fakes.py); the backend's part is played by hand (send, eof,
close), the deadlines run on the FakeLoop's clock and `perf_counter` on a HandClock where a time is checked.
The last tests go through the whole proxy (Client, pipeline, pool) for what only shows there.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llmproxy import relay as relay_module
from llmproxy.context import RequestContext
from llmproxy.errors import ProxyError
from llmproxy.http11.wire import LAST_CHUNK
from llmproxy.metering.dialects import OPENAI_CHAT_SSE
from llmproxy.metering.session import REPORTED, MeteringSession
from llmproxy.relay import Exchange
from llmproxy.services import RelaySettings
from llmproxy.upstream import connection as connection_module
from tests.fakes import (
    OK,
    STREAM_HEAD,
    Client,
    FakeBackend,
    FakeClientSide,
    FakeUpstream,
    HandClock,
    chat,
    chunk,
    http_request,
    make_clients,
    make_config,
    make_services,
    parse_responses,
    relay_settings,
    request_context,
    running,
    upstream_connection,
)

UPSTREAM_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: a:8000\r\ncontent-length: 2\r\n\r\n{}"
EVENT = chunk(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
END = LAST_CHUNK  # the backend's last chunk, and the client's


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


@pytest.fixture
def perf(monkeypatch) -> HandClock:
    """perf_counter, for the relay and the upstream connection, moved by hand."""
    clock = HandClock()
    monkeypatch.setattr(relay_module, "perf_counter", clock)
    monkeypatch.setattr(connection_module, "perf_counter", clock)
    return clock


@dataclass
class Relayed:
    """One started exchange, and the parts it was given."""

    exchange: Exchange
    ctx: RequestContext
    upstream: FakeUpstream
    backend: FakeBackend
    settings: RelaySettings

    @property
    def client(self) -> FakeClientSide:
        return self.ctx.conn  # type: ignore[return-value]

    @property
    def writes(self) -> list[bytes]:
        return self.client.transport.writes

    @property
    def watched(self) -> bool:
        return self.exchange in self.settings.sweeper.active

    def error(self) -> ProxyError:
        """The ProxyError the exchange ended with (what the pipeline would get from `await done`)."""
        assert self.exchange.done.done(), "the exchange has not ended"
        error = self.exchange.done.exception()
        assert isinstance(error, ProxyError), f"ended with {error!r}, not a ProxyError"
        return error

    def ended_cleanly(self) -> bool:
        done = self.exchange.done
        return done.done() and done.exception() is None

    def pause_client(self) -> None:
        """The client's transport goes over its high-water mark (ClientConnection.pause_writing)."""
        self.client.writing_paused = True
        self.exchange.client_paused()
        self.upstream.loop.run_ready()

    def resume_client(self) -> None:
        self.client.writing_paused = False
        self.exchange.client_resumed()
        self.upstream.loop.run_ready()

    def lose_client(self) -> None:
        """The client's connection is lost (ClientConnection.connection_lost)."""
        self.client.closed = True
        self.exchange.client_lost()


def relay(loop, raw: bytes | None = None, *, refuse: tuple[int, ...] = (), meter=None, backend=None,
          settings: RelaySettings | None = None, max_header_size: int = 32 * 1024, ready_for: float = 0.0,
          retries: int = 0, upstream_sent: bool = False) -> Relayed:
    """An exchange for the request in `raw` (a streamed chat by default), started as the pipeline starts it.

    `ready_for`: how long the request has been ready (read whole) when it is written upstream;
    `retries`/`upstream_sent`: an attempt after others."""
    ctx = request_context(raw or chat(stream=True))
    ctx.meter = meter
    ctx.retries = retries
    ctx.upstream_sent = upstream_sent
    ctx.t_ready = relay_module.perf_counter() - ready_for
    upstream = upstream_connection(loop, max_header_size=max_header_size)
    backend = backend or FakeBackend()
    settings = settings or relay_settings(loop)
    exchange = Exchange(ctx, upstream.conn, backend, settings, frozenset(refuse))  # type: ignore[arg-type]
    exchange.start(UPSTREAM_REQUEST)
    loop.run_ready()
    return Relayed(exchange, ctx, upstream, backend, settings)


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, the header fields (lower-case names; repeats joined with ", ") and the raw body bytes."""
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, value = line.split(": ", 1)
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(status_line.split()[1]), headers, body


def sse_head(content_type: str = "text/event-stream", extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n{extra}\r\n"
            .encode())


# --- one client write per upstream read ----------------------------------------------------------------------


@pytest.mark.parametrize(("reads", "bodies"), [
    # The chunks of one read go on as one: a chunk's bounds mean nothing in HTTP, and per-chunk work did cost.
    ([STREAM_HEAD + chunk(b"a") + chunk(b"b") + chunk(b"c"), chunk(b"d"), chunk(b"e") + END],
     [chunk(b"abc"), chunk(b"d"), chunk(b"e") + END]),
    ([STREAM_HEAD, chunk(b"a"), END], [b"", chunk(b"a"), END]),
    ([STREAM_HEAD + chunk(b"a"), b"5\r\n", b"hello\r\n" + END], [chunk(b"a"), chunk(b"hello") + END]),
    ([STREAM_HEAD + b"a\r\n01234", b"56789\r\n" + END], [chunk(b"01234"), chunk(b"56789") + END]),
    ([STREAM_HEAD + chunk(b"a") + END], [chunk(b"a") + END]),
], ids=["a-burst-then-one-per-read", "the-head-alone", "a-read-of-framing-only-writes-nothing",
        "a-chunk-split-over-reads-goes-as-it-comes", "all-in-one-read"])
def test_each_upstream_read_is_one_client_write_with_the_head_in_the_first(loop, reads, bodies):
    r = relay(loop)
    for data in reads:
        r.upstream.send(data)
    assert len(r.writes) == len(bodies)
    status, headers, first_body = split_response(r.writes[0])
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert [first_body, *r.writes[1:]] == bodies
    assert r.ended_cleanly() and r.ctx.response_started


def test_what_the_client_receives_parses_as_the_backend_sent_it(loop):
    r = relay(loop)
    events = [b'data: {"n":%d}\n\n' % n for n in range(5)]
    r.upstream.send(sse_head() + chunk(events[0]))
    for event in events[1:]:
        r.upstream.send(chunk(event))
    r.upstream.send(END)
    [reply] = parse_responses(r.client.transport.data)
    assert reply.complete and reply.body == b"".join(events)


# --- framing -------------------------------------------------------------------------------------------------


BACKEND_FRAMINGS = {  # the backend's response carrying b"hello", as its reads; True: it ends at EOF
    "length": ([b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello"], False),
    "chunked": ([b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                 + chunk(b"hel"), chunk(b"lo") + END], False),
    "close": ([b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\nhel", b"lo"], True),
    "none": ([b"HTTP/1.1 204 No Content\r\n\r\n"], False),
}
KEEP_ALIVE = {"Connection": "keep-alive"}


@pytest.mark.parametrize(("framing", "version", "asked", "length", "chunked", "connection", "keep_alive"), [
    ("length", "1.1", {}, "5", False, None, True),
    ("chunked", "1.1", {}, None, True, None, True),
    ("close", "1.1", {}, None, True, None, True),  # re-framed: the client's connection may go on
    ("none", "1.1", {}, None, False, None, True),
    ("length", "1.1", {"Connection": "close"}, "5", False, "close", False),
    ("length", "1.0", KEEP_ALIVE, "5", False, "keep-alive", True),
    ("chunked", "1.0", KEEP_ALIVE, None, False, "close", False),  # 1.0 has no chunks: the end is the close
    ("close", "1.0", KEEP_ALIVE, None, False, "close", False),
    ("none", "1.0", KEEP_ALIVE, None, False, "keep-alive", True),
    ("length", "1.0", {}, "5", False, "close", False),
], ids=["length-1.1", "chunked-1.1", "close-1.1", "none-1.1", "length-1.1-closing", "length-1.0-keep-alive",
        "chunked-1.0-keep-alive", "close-1.0-keep-alive", "none-1.0-keep-alive", "length-1.0"])
def test_the_clients_framing_follows_the_backends_and_the_clients_http_version(
        loop, framing, version, asked, length, chunked, connection, keep_alive):
    r = relay(loop, http_request("GET", "/v1/models", headers=asked, version=version))
    reads, ends_at_eof = BACKEND_FRAMINGS[framing]
    for data in reads:
        r.upstream.send(data)
    if ends_at_eof:
        r.upstream.eof()
    status, headers, body = split_response(r.client.transport.data)
    assert status == (204 if framing == "none" else 200)
    assert headers.get("content-length") == length
    assert headers.get("transfer-encoding") == ("chunked" if chunked else None)
    assert headers.get("connection") == connection
    if framing == "none":
        assert body == b""
    else:
        assert body == (chunk(b"hel") + chunk(b"lo") + END if chunked else b"hello")
    assert r.ctx.keep_alive is keep_alive and r.ctx.bytes_out == len(b"hello") * (framing != "none")
    assert r.ended_cleanly() and r.ctx.status == status


def test_while_draining_a_response_tells_the_client_its_connection_closes(loop):
    settings = relay_settings(loop)
    settings.traffic.draining = True
    r = relay(loop, settings=settings)
    r.upstream.send(STREAM_HEAD + EVENT + END)
    _, headers, _ = split_response(r.writes[0])
    assert headers["connection"] == "close" and not r.ctx.keep_alive


def test_a_head_request_ends_with_its_head(loop):
    r = relay(loop, http_request("HEAD", "/v1/models"))
    assert r.upstream.received == UPSTREAM_REQUEST
    r.upstream.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n")
    [write] = r.writes
    status, headers, body = split_response(write)
    assert (status, body, headers.get("transfer-encoding")) == (200, b"", None)
    assert headers["content-length"] == "5"  # what a GET would get: it holds for HEAD too
    assert r.ended_cleanly() and not r.upstream.conn.reusable()


# --- a metered stream ----------------------------------------------------------------------------------------


CONTENT = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(("version", "client_asked_usage", "relayed"), [
    ("1.1", False, CONTENT + DONE),  # the usage event the proxy asked for is taken out
    ("1.1", True, CONTENT + USAGE + DONE),  # the client asked for it: relayed, yet still re-framed
    ("1.0", False, CONTENT + DONE),
], ids=["usage-event-taken-out", "usage-event-the-client-asked-for", "http10"])
def test_a_metered_stream_sent_with_a_length_is_reframed_and_its_usage_read(loop, version, client_asked_usage,
                                                                            relayed):
    body = {"model": "m", "stream": True, "messages": []}
    if client_asked_usage:
        body["stream_options"] = {"include_usage": True}
    session = MeteringSession.plan(OPENAI_CHAT_SSE, inject_allowed=True, is_stream=True, body=body)
    asked = KEEP_ALIVE if version == "1.0" else {}
    r = relay(loop, http_request("POST", "/v1/chat/completions", b"{}", asked, version), meter=session)
    sent = CONTENT + USAGE + DONE
    r.upstream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%b"
                    % (len(sent), sent[:30]))
    r.upstream.send(sent[30:])
    _, headers, _ = split_response(r.client.transport.data)
    assert "content-length" not in headers
    if version == "1.1":
        assert headers["transfer-encoding"] == "chunked"
        [reply] = r.client.responses()
        assert reply.complete and reply.body == relayed
    else:
        assert "transfer-encoding" not in headers and headers["connection"] == "close" and not r.ctx.keep_alive
        assert split_response(r.client.transport.data)[2] == relayed
    assert session.final_usage(200) == (3, 1, None, None, REPORTED)
    assert r.ctx.is_stream and r.ctx.bytes_out == len(relayed)


def test_a_metered_json_response_keeps_its_length(loop):
    session = MeteringSession.plan(OPENAI_CHAT_SSE, inject_allowed=True, is_stream=False, body={"model": "m"})
    r = relay(loop, chat(), meter=session)
    r.upstream.send(OK)
    _, headers, body = split_response(r.client.transport.data)
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert session.final_usage(200) == (5, 2, None, None, REPORTED)
    assert not r.ctx.is_stream


class FakeSession:
    """A metering session as the relay uses it: what it is fed and what it hands back, on demand."""

    def __init__(self, transform=None, tail: bytes = b"", fail_feed_at: int = 0, fail_end: bool = False):
        self.transform = transform or (lambda data: data)
        self.tail = tail
        self.fail_feed_at = fail_feed_at  # the feed call (1-based) that raises
        self.fail_end = fail_end
        self.started: list[tuple[int, bool]] = []
        self.fed: list[bytes] = []
        self.ended = 0
        self.streamed = True
        self.rewrites = True
        self.translation = None  # pass-through: the translated path has tests of its own

    def response_started(self, status: int, streaming: bool, headers: list[tuple[bytes, bytes]]):
        self.started.append((status, streaming))
        return self.feed

    def feed(self, data: bytes) -> bytes:
        self.fed.append(data)
        if len(self.fed) == self.fail_feed_at:
            raise RuntimeError("a metering bug")
        return self.transform(data)

    def response_ended(self) -> bytes:
        self.ended += 1
        if self.fail_end:
            raise RuntimeError("a metering bug at the end")
        return self.tail


def test_the_meter_is_fed_each_read_once_its_bytes_are_relayed_and_its_tail_goes_before_the_end(loop):
    session = FakeSession(transform=bytes.upper, tail=b"[tail]")
    r = relay(loop, meter=session)
    r.upstream.send(STREAM_HEAD + chunk(b"ab") + chunk(b"cd"))
    r.upstream.send(chunk(b"ef") + END)
    assert session.started == [(200, True)] and session.fed == [b"abcd", b"ef"] and session.ended == 1
    assert r.writes[1] == chunk(b"EF") + chunk(b"[tail]") + END
    [reply] = r.client.responses()
    assert reply.complete and reply.body == b"ABCDEF[tail]"
    assert r.ctx.bytes_out == len(b"ABCDEF[tail]")


def test_what_the_meter_holds_back_is_not_written_and_a_read_of_nothing_but_that_writes_nothing(loop):
    session = FakeSession(transform=lambda data: b"" if data == b"held" else data)
    r = relay(loop, meter=session)
    r.upstream.send(STREAM_HEAD + chunk(b"a"))
    r.upstream.send(chunk(b"held"))
    r.upstream.send(chunk(b"b") + END)
    assert len(r.writes) == 2 and r.writes[1] == chunk(b"b") + END


@pytest.mark.parametrize(("session", "fed", "ended", "logged"), [
    (FakeSession(fail_feed_at=2), [b"a", b"b"], 0, "meter failed; relaying the rest of request req-1 unmetered"),
    (FakeSession(fail_end=True), [b"a", b"b", b"c"], 1, "metering the end of request req-1 failed"),
], ids=["in-a-chunk", "at-the-end"])
def test_a_metering_bug_never_costs_the_client_its_stream(loop, caplog, session, fed, ended, logged):
    r = relay(loop, meter=session)
    r.upstream.send(STREAM_HEAD + chunk(b"a"))
    r.upstream.send(chunk(b"b"))
    r.upstream.send(chunk(b"c") + END)
    [reply] = r.client.responses()
    assert reply.complete and reply.body == b"abc"  # the chunk the meter failed on is relayed as it came
    assert (session.fed, session.ended) == (fed, ended)
    assert r.ended_cleanly() and r.client.aborts == 0
    assert logged in caplog.messages


# --- headers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "backend_headers", "present", "absent"), [
    ("application/json", "connection: keep-alive, x-private\r\nkeep-alive: timeout=5\r\nx-private: 1\r\n"
     "proxy-authenticate: Basic\r\nupgrade: h2c\r\ntrailer: x-t\r\nx-kept: yes\r\n",
     {"x-kept": "yes"}, {"connection", "keep-alive", "x-private", "proxy-authenticate", "upgrade", "trailer"}),
    ("application/json", "", {"x-request-id": "req-1"}, set()),
    ("application/json", "x-request-id: from-backend\r\n", {"x-request-id": "from-backend"}, set()),
    ("text/event-stream", "", {"cache-control": "no-cache", "x-accel-buffering": "no"}, {"server-timing"}),
    ("application/x-ndjson", "", {"cache-control": "no-cache", "x-accel-buffering": "no"}, {"server-timing"}),
    ("text/event-stream", "cache-control: no-store\r\nx-accel-buffering: yes\r\n",
     {"cache-control": "no-store", "x-accel-buffering": "yes"}, {"server-timing"}),
    ("application/json", "", {"server-timing": "proxy;dur=2.000"}, {"cache-control", "x-accel-buffering"}),
], ids=["hop-by-hop", "request-id-added", "backends-request-id-kept", "sse-hints", "ndjson-hints",
        "backends-own-hints-kept", "proxy-time-on-a-non-streamed-response"])
def test_the_relayed_head_drops_hop_by_hop_headers_and_adds_the_proxys(loop, perf, content_type,
                                                                      backend_headers, present, absent):
    r = relay(loop, ready_for=0.002)
    r.upstream.send(sse_head(content_type, backend_headers) + chunk(b"x") + END)
    _, headers, _ = split_response(r.writes[0])
    assert {name: headers.get(name) for name in present} == present
    assert absent.isdisjoint(headers)
    assert headers["transfer-encoding"] == "chunked"  # the proxy's own framing, once


def test_the_rate_limit_lines_go_out_with_the_head(loop):
    r = relay(loop)
    r.ctx.response_headers = b"x-ratelimit-remaining-requests: 9\r\n"
    r.upstream.send(STREAM_HEAD + EVENT)
    _, headers, _ = split_response(r.writes[0])
    assert headers["x-ratelimit-remaining-requests"] == "9"


# --- backpressure --------------------------------------------------------------------------------------------


def test_a_client_over_its_high_water_mark_pauses_reading_the_upstream_until_it_drains(loop):
    r = relay(loop)
    r.upstream.send(STREAM_HEAD + EVENT)
    r.pause_client()
    assert r.upstream.transport.reading_calls == ["pause"]
    r.resume_client()
    assert r.upstream.transport.reading_calls == ["pause", "resume"]
    assert loop.timers_for("_write_timeout") == []


def test_a_head_that_arrives_while_the_client_is_paused_pauses_the_upstream(loop):
    r = relay(loop)
    r.client.writing_paused = True  # paused before this exchange began (the previous response filled it)
    r.upstream.send(STREAM_HEAD + EVENT)
    assert r.upstream.transport.reading_calls == ["pause"]
    assert loop.timers_for("_write_timeout") == [r.settings.write_timeout]


def test_an_upstream_paused_for_the_client_reads_again_when_its_response_ends(loop):
    r = relay(loop)
    r.upstream.send(STREAM_HEAD + EVENT)
    r.pause_client()
    r.upstream.send(EVENT + END)  # what the backend had sent before reading stopped
    assert r.upstream.transport.is_reading() and r.upstream.transport.reading_calls == ["pause", "resume"]
    assert r.upstream.conn.reusable()
    assert loop.timers_for("_write_timeout") == []


@pytest.mark.parametrize("drains_after", [None, 29.9], ids=["never-reads", "reads-in-time"])
def test_a_client_that_reads_nothing_for_the_write_timeout_is_cut_with_a_reset(loop, drains_after):
    r = relay(loop, settings=relay_settings(loop, write_timeout=30.0), backend=FakeBackend(stream_idle_timeout=5))
    r.upstream.send(STREAM_HEAD + EVENT)
    r.pause_client()
    r.pause_client()  # told again: still one timer
    assert loop.armed("_write_timeout") == [30.0]
    loop.advance(29.9)
    assert r.client.resets == 0 and not r.exchange.done.done()
    if drains_after is not None:
        r.resume_client()
        loop.advance(0.2)
        assert r.client.resets == r.client.aborts == 0 and not r.upstream.transport.aborted
        return
    loop.advance(0.2)
    assert r.client.resets == 1  # what the kernel still holds for it is discarded
    assert (r.ctx.termination, r.ctx.error_message) == ("cD", "client did not read the response in time")
    assert not r.ctx.keep_alive and r.upstream.transport.aborted
    assert r.ended_cleanly() and not r.watched


# --- the client lost -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("received", "termination"), [
    (b"", "CH"),
    (b"HTTP/1.1 200 OK\r\ncontent-", "CH"),
    (STREAM_HEAD, "CD"),
    (STREAM_HEAD + EVENT, "CD"),
], ids=["nothing", "part-of-the-head", "the-head", "mid-stream"])
def test_a_lost_client_aborts_the_upstream_at_once_with_its_termination_code(loop, received, termination):
    r = relay(loop)
    if received:
        r.upstream.send(received)
    writes = list(r.writes)
    r.lose_client()
    assert r.upstream.transport.aborted and r.upstream.conn.closed  # the backend stops generating now
    assert r.ctx.termination == termination
    assert r.ended_cleanly() and not r.watched and r.ctx.exchange is None
    r.upstream.send(EVENT)  # already in flight: goes nowhere
    assert r.writes == writes


# --- the upstream lost, or not a response --------------------------------------------------------------------


@pytest.mark.parametrize(("received", "exc", "message"), [
    (b"", None, "backend closed the connection"),
    (b"HTTP/1.1 200 OK\r\ncontent-", None, "backend closed the connection"),
    (b"", ConnectionResetError(104, "Connection reset by peer"),
     "backend connection lost: [Errno 104] Connection reset by peer"),
], ids=["nothing", "part-of-the-head", "reset"])
def test_an_upstream_lost_before_the_head_is_an_error_the_pipeline_may_retry(loop, received, exc, message):
    r = relay(loop)
    if received:
        r.upstream.send(received)
    r.upstream.close(exc)
    error = r.error()
    assert (error.kind, error.message, error.retry_condition) == ("upstream_failed", message, "reset")
    assert r.writes == [] and r.client.aborts == 0 and not r.ctx.response_started and not r.watched


@pytest.mark.parametrize("received", [STREAM_HEAD, STREAM_HEAD + EVENT, STREAM_HEAD + EVENT + b"40\r\ndata: {"],
                         ids=["the-head", "an-event", "part-of-an-event"])
def test_an_upstream_lost_after_the_head_aborts_the_client_without_the_last_chunk(loop, received):
    r = relay(loop)
    r.upstream.send(received)
    r.upstream.close()
    assert r.client.aborts == 1 and not r.client.transport.data.endswith(END)
    [reply] = r.client.responses()
    assert reply.status == 200 and not reply.complete
    assert (r.ctx.termination, r.ctx.error_message) == ("SD", "backend closed the connection")
    assert r.ended_cleanly() and not r.ctx.keep_alive and not r.watched


@pytest.mark.parametrize("reads", [
    [b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * 1000, b"a" * 1000],
    [STREAM_HEAD + EVENT + b"zz\r\n"],  # the head never left: the whole read is dropped
    [b"HTTP/1.1 2x0 OK\r\n\r\n"],
    [b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"],
], ids=["head-over-the-limit", "header-line-without-end", "bad-chunk-in-the-heads-read", "bad-status",
        "bad-header-line"])
def test_a_response_that_is_not_one_is_an_upstream_protocol_error(loop, reads):
    r = relay(loop, max_header_size=1024)
    for data in reads:
        r.upstream.send(data)
    assert r.error().kind == "upstream_protocol_error" and r.error().retry_condition is None
    assert r.writes == [] and r.upstream.transport.aborted and not r.watched


def test_a_malformed_body_after_the_head_aborts_the_client(loop):
    r = relay(loop)
    r.upstream.send(STREAM_HEAD + EVENT)
    r.upstream.send(EVENT + b"zz\r\n")
    assert len(r.writes) == 1 and r.client.aborts == 1  # the good event of that read goes nowhere either
    assert r.ctx.termination == "SD" and r.ctx.error_message.startswith("malformed response body")
    assert r.upstream.transport.aborted and r.ended_cleanly()


# --- refused statuses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "refused", "relayed"), [
    (503, (502, 503), False),
    (502, (502, 503), False),
    (500, (502, 503), True),
    (503, (), True),  # the last attempt relays the backend's own answer
], ids=["503-refused", "502-refused", "500-relayed", "503-on-the-last-attempt"])
def test_a_refused_status_is_not_relayed_and_its_upstream_dropped(loop, status, refused, relayed):
    r = relay(loop, chat(), refuse=refused)
    body = b'{"error":"busy"}'
    r.upstream.send(b"HTTP/1.1 %d Failed\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                    % (status, len(body), body[:5]))
    r.upstream.send(body[5:])
    if relayed:
        [reply] = r.client.responses()
        assert (reply.status, reply.body, r.ctx.status) == (status, body, status)
        assert r.ended_cleanly() and not r.upstream.transport.aborted
        return
    error = r.error()
    assert (error.kind, error.status, error.retry_condition) == ("upstream_status", status, str(status))
    assert r.writes == [] and r.upstream.transport.aborted and not r.upstream.conn.reusable()
    assert r.ctx.status == 0 and not r.ctx.response_started and not r.watched


# --- deadlines from the sweeper ------------------------------------------------------------------------------


def test_no_head_by_the_first_byte_deadline_is_a_timeout_the_pipeline_may_retry(loop):
    r = relay(loop, backend=FakeBackend(first_byte_timeout=2.0), settings=relay_settings(loop, tick=0.5))
    loop.advance(1.99)
    assert not r.exchange.done.done() and r.watched
    loop.advance(0.52)  # the first tick at or after the deadline
    error = r.error()
    assert (error.kind, error.retry_condition) == ("first_byte_timeout", "timeout")
    assert r.upstream.transport.aborted and not r.watched and r.writes == []


@pytest.mark.parametrize(("gaps", "cut_after"), [
    ([1.5] * 8, None),  # every pause shorter than stream_idle
    ([1.5, 1.5, 3.1], 2),  # the third pause is too long
    ([3.1], 0),
], ids=["steady", "stops-after-two", "stops-at-once"])
def test_a_stream_is_cut_after_stream_idle_without_a_chunk(loop, gaps, cut_after):
    r = relay(loop, backend=FakeBackend(first_byte_timeout=1.0, stream_idle_timeout=2.0),
              settings=relay_settings(loop, tick=0.5))
    r.upstream.send(STREAM_HEAD + EVENT)
    sent = 0  # events after the first
    for gap in gaps:
        loop.advance(gap)
        if r.exchange.done.done():
            break
        r.upstream.send(EVENT)
        sent += 1
    if cut_after is None:
        assert not r.exchange.done.done() and r.client.aborts == 0
        return
    assert sent == cut_after
    assert r.client.aborts == 1 and r.upstream.transport.aborted
    assert (r.ctx.termination, r.ctx.error_message) == ("sD", "backend stream idle timeout")
    assert r.ended_cleanly() and not r.watched


def test_a_paused_client_does_not_make_the_backend_idle(loop):
    r = relay(loop, backend=FakeBackend(stream_idle_timeout=2.0), settings=relay_settings(loop, write_timeout=30))
    r.upstream.send(STREAM_HEAD + EVENT)
    r.pause_client()
    loop.advance(20)
    assert r.client.aborts == 0 and not r.upstream.transport.aborted
    r.resume_client()
    loop.advance(1.9)
    assert r.client.aborts == 0
    loop.advance(1.1)
    assert r.client.aborts == 1 and r.ctx.termination == "sD"


# --- the proxy's own time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reads", "chunk_reads"), [
    ([STREAM_HEAD + EVENT, EVENT, EVENT + END], 2),
    ([STREAM_HEAD, EVENT, b"5\r\n", b"hello\r\n" + END], 2),  # a read that writes nothing counts nothing
    ([STREAM_HEAD + EVENT + END], 0),
    ([STREAM_HEAD + EVENT, EVENT + EVENT + EVENT + END], 1),  # a read, not an event
], ids=["a-read-each", "a-framing-only-read", "one-read", "a-burst"])
def test_the_overhead_histograms_count_once_per_read_that_writes(loop, perf, reads, chunk_reads):
    r = relay(loop)
    for data in reads:
        perf.advance(1.0)
        r.upstream.send(data)
    overhead = r.settings.overhead
    assert (sum(overhead.first_byte.counts), sum(overhead.chunk.counts)) == (1, chunk_reads)
    assert len(r.writes) == 1 + chunk_reads
    assert overhead.first_byte.sum == overhead.chunk.sum == 0.0  # measured from the read, not from the last one


@pytest.mark.parametrize(("retries", "upstream_sent", "counted"), [
    (0, False, True),
    (1, True, False),  # a retry's time includes the failed attempt
    (0, True, False),  # resent on a fresh connection after a pooled one died
], ids=["first-attempt", "retry", "resent"])
def test_the_request_overhead_is_counted_on_the_first_attempt_only(loop, perf, retries, upstream_sent, counted):
    r = relay(loop, ready_for=0.25, retries=retries, upstream_sent=upstream_sent)
    request = r.settings.overhead.request
    assert sum(request.counts) == int(counted)
    assert (request.sum, r.ctx.proxy_s) == ((0.25, 0.25) if counted else (0.0, 0.0))
    assert r.ctx.upstream_sent and r.ctx.exchange is r.exchange and r.watched


# --- time to first token -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reads", "first_token_read"), [
    ([STREAM_HEAD + EVENT, EVENT, EVENT], 0),
    ([STREAM_HEAD, EVENT, EVENT], 1),  # the head alone is no token
], ids=["with-the-head", "after-the-head"])
def test_the_time_to_first_token_is_told_to_the_backend_once(loop, perf, reads, first_token_read):
    r = relay(loop)
    sent_at = perf.now
    for index, data in enumerate(reads):
        perf.advance(0.5)
        r.upstream.send(data)
        if index == first_token_read:
            first_at = perf.now
    assert r.backend.ttfts == [(first_at - sent_at, first_at)]
    assert r.ctx.t_first_byte == first_at


# --- through the whole proxy ---------------------------------------------------------------------------------


def test_a_connection_paused_for_a_slow_client_goes_back_to_the_pool_reading(loop):
    services = make_services(make_config(), loop)
    client = Client(make_clients(services, loop), loop)
    client.send(chat())
    [upstream] = loop.upstreams
    client.conn.pause_writing()  # the client stops reading: the relay pauses the backend
    assert not upstream.transport.is_reading()
    upstream.send(OK)  # ...but the whole response was already in that read
    [b] = services.fleet.backends
    assert b.pool.idle_count == 1
    assert upstream.transport.is_reading(), "a paused connection in the pool would hang the next request"
    client.send(chat())
    assert loop.upstreams == [upstream] and upstream.received.count(b"POST ") == 2
