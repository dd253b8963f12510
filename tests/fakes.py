"""Fakes for driving the proxy's core in-process: no sockets, no real clock, no whole server.

- `FakeTransport`: what a protocol writes to (client or upstream side); it records writes, pause/resume of
  reading, close/abort and socket options, and reports the write-buffer size a test sets.
- `FakeLoop`: a minimal event loop whose clock only moves when a test says so (`advance`). `call_later`
  records its timers, so a 75 s keep-alive timeout is tested in microseconds. It runs real asyncio Futures
  and Tasks. Its `create_connection` is the upstream network: pool connections get a FakeTransport (kept in
  `upstreams`), health probes are refused, and a test may refuse a host, make its connects hang, or reset them.
- `make_config`, `make_services`, `make_clients`: the real Config (through `parse_config`), the real
  `build_services` and `Clients`, with fakes only at the I/O edges (the access log and the usage outbox
  record in memory; probes are refused by the fake network and never repeated).
- `Client`, `FakeClientSide`, `request_context`, `start_request`, `parse_responses`: the client side, as a
  connection and as a request sees it, a request started as the connection starts it, and what the client
  received.
- `upstream_connection`, `RecordingSink`, `FakeBackend`, `relay_settings`, `HandClock`: the relay's parts on
  their own, for an Exchange driven without a pipeline or a pool: a connected upstream connection, a sink
  that records its events, a backend as the relay sees it, the settings every exchange shares, and a
  `perf_counter` that moves only by hand.

Every helper that stands for an I/O event (bytes arriving, a connection lost) runs the loop's ready
callbacks afterwards, as a real loop would before the next event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson

from llmproxy.config import parse_config
from llmproxy.config.model import Config
from llmproxy.connection import ClientConnection, Clients, ClientSettings
from llmproxy.context import RequestContext, new_context
from llmproxy.deadlines import DeadlineSweeper
from llmproxy.eager import EagerRun
from llmproxy.http11.request import CodecLimits, RequestCodec, RequestHead
from llmproxy.overhead import ProxyOverhead
from llmproxy.pipeline import handle_request
from llmproxy.services import Lasting, RelaySettings, Services, build_lasting, build_services
from llmproxy.traffic import Traffic
from llmproxy.upstream.connection import UPSTREAM_FAILED, UpstreamConnection

CLIENT_PEER = ("203.0.113.7", 50123)
MAX_READY_ROUNDS = 10_000  # a test whose callbacks keep rescheduling themselves fails instead of hanging

# --- transports ------------------------------------------------------------------------------------------


class FakeSocket:
    """What `transport.get_extra_info("socket")` returns: it records the options set on it."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options.append((level, option, value))

    @property
    def linger_zero(self) -> bool:
        """SO_LINGER {on, 0 s} was set: closing sends a TCP reset."""
        return any(opt[:2] == (socket.SOL_SOCKET, socket.SO_LINGER) and opt[2][:4] == b"\x01\x00\x00\x00"
                   for opt in self.options)


class FakeTransport(asyncio.Transport):
    """Records what a protocol does to its transport; delivers nothing by itself."""

    def __init__(self, peer: tuple[str, int] | None = CLIENT_PEER) -> None:
        super().__init__()
        self.peer = peer
        self.writes: list[bytes] = []
        self.writes_after_close: list[bytes] = []  # a real transport drops them: a test says none are made
        self.reading = True
        self.reading_calls: list[str] = []  # "pause" / "resume", in order
        self.closed = False  # close(): after what is buffered is sent
        self.aborted = False  # abort(): at once
        self.buffered = 0  # what get_write_buffer_size() reports; a test sets it
        self.write_limits: tuple[int | None, int | None] | None = None
        self.sock = FakeSocket()

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        (self.writes_after_close if self.is_closing() else self.writes).append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False
        self.reading_calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.reading_calls.append("resume")

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_limits = (high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "socket":
            return self.sock
        return default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


# --- the loop and its network ----------------------------------------------------------------------------


@dataclass(eq=False)
class FakeUpstream:
    """One connection the pool opened through the fake network: the backend's end of it."""

    host: str
    port: int
    conn: UpstreamConnection
    transport: FakeTransport
    loop: FakeLoop

    @property
    def received(self) -> bytes:
        """What the proxy wrote to the backend on this connection."""
        return self.transport.data

    def send(self, data: bytes) -> None:
        """The backend sends `data` (one read on the proxy's side)."""
        self.conn.data_received(data)
        self.loop.run_ready()

    def close(self, exc: Exception | None = None) -> None:
        """The backend closes the connection (or it breaks, with `exc`)."""
        self.conn.connection_lost(exc)
        self.loop.run_ready()

    def eof(self) -> None:
        """The backend shuts its side down (a FIN): eof_received, then, unless the protocol asked to keep its
        half open, the transport closes and reports it, as a real one does."""
        keep_open = self.conn.eof_received()
        self.loop.run_ready()
        if not keep_open:
            self.close()


class FakeLoop(asyncio.AbstractEventLoop):
    """An event loop whose time moves only by `advance`; what it runs is what a test made ready."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._ready: deque[asyncio.Handle] = deque()
        self._scheduled: list[asyncio.TimerHandle] = []  # a heap by due time
        self.calls_later: list[tuple[str, float]] = []  # every call_later ever made: (callback name, delay)
        self.errors: list[dict[str, Any]] = []  # what call_exception_handler got: a callback raised
        self.upstreams: list[FakeUpstream] = []  # every pool connection opened, in order
        self.connects: list[str] = []  # the host of every pool connect tried, in order (refused ones too)
        self._refused: dict[str, OSError] = {}
        self._hanging: set[str] = set()
        self._resetting: set[str] = set()
        self.held_connects: list[asyncio.Future[None]] = []  # connects to hanging hosts; set one to let it finish

    # what the code under test calls -------------------------------------------------------------------

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        handle = self.call_at(self.now + delay, callback, *args, context=context)
        self.calls_later.append((_name(callback), delay))
        return handle

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._scheduled, handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # dropped from the heap when it comes up

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None, context: Any = None) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    async def create_connection(self, protocol_factory: Any, host: str | None = None, port: int | None = None,
                                **_options: Any) -> tuple[FakeTransport, asyncio.BaseProtocol]:
        protocol = protocol_factory()
        if not isinstance(protocol, UpstreamConnection):  # a health probe: not what these tests are about
            raise ConnectionRefusedError(errno.ECONNREFUSED, "fake network: probes are refused")
        self.connects.append(host)
        if host in self._refused:
            raise self._refused[host]
        if host in self._hanging:
            held = self.create_future()
            self.held_connects.append(held)
            await held  # until the pool's connect timeout cancels it, or a test lets it finish
        transport = FakeTransport(peer=(host, port))
        protocol.connection_made(transport)
        self.upstreams.append(FakeUpstream(host, port, protocol, transport, self))
        if host in self._resetting:
            protocol.connection_lost(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
        return transport, protocol

    # what a test calls --------------------------------------------------------------------------------

    def refuse(self, host: str, error: OSError | None = None) -> None:
        """Connects to `host` fail with `error` (default: connection refused)."""
        self._refused[host] = error or ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    def hang(self, host: str) -> None:
        """Connects to `host` do not complete by themselves (see `held_connects`)."""
        self._hanging.add(host)

    def reset_on_connect(self, host: str) -> None:
        """Connects to `host` complete, and the connection is reset before the connecting code resumes (a
        backend killed with connections waiting in its accept queue)."""
        self._resetting.add(host)

    def run_ready(self) -> None:
        """Run the callbacks that are ready, and those they make ready, until none is (the clock stands)."""
        for _ in range(MAX_READY_ROUNDS):
            if not self._ready:
                return
            handle = self._ready.popleft()
            if not handle.cancelled():
                handle._run()
        raise AssertionError("the loop never went idle: something reschedules itself forever")

    def run_one(self) -> None:
        """Run the first ready callback only: to put an event between two steps the loop would run in a row."""
        handle = self._ready.popleft()
        if not handle.cancelled():
            handle._run()

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` forward, firing every timer that comes due on the way, in order."""
        end = self.now + seconds
        while True:
            self.run_ready()
            self._drop_cancelled()
            if not self._scheduled or self._scheduled[0].when() > end:
                break
            handle = heapq.heappop(self._scheduled)
            self.now = max(self.now, handle.when())
            handle._run()
        self.now = end
        self.run_ready()

    def timers(self) -> list[tuple[float, asyncio.TimerHandle]]:
        """The timers pending now, soonest first, as (seconds from now, handle)."""
        self._drop_cancelled()
        return [(h.when() - self.now, h) for h in sorted(h for h in self._scheduled if not h.cancelled())]

    def timers_for(self, callback_name: str) -> list[float]:
        """Seconds from now of the pending timers whose callback is named `callback_name`."""
        return [delay for delay, handle in self.timers() if _name(handle._callback) == callback_name]

    def armed(self, callback_name: str) -> list[float]:
        """The delays of every call_later ever made for a callback named `callback_name`, in order."""
        return [delay for name, delay in self.calls_later if name == callback_name]

    def run_until_complete(self, awaitable: Any) -> Any:
        """Run `awaitable` to its end, moving the clock to each next timer while it waits (bounded)."""
        future = asyncio.ensure_future(awaitable, loop=self)
        for _ in range(MAX_READY_ROUNDS):
            self.run_ready()
            if future.done():
                return future.result()
            pending = self.timers()
            if not pending:
                break
            self.advance(pending[0][0])
        raise AssertionError("the awaitable can never finish: nothing left to wake it")

    def _drop_cancelled(self) -> None:
        while self._scheduled and self._scheduled[0].cancelled():
            heapq.heappop(self._scheduled)


def _name(callback: Any) -> str:
    return getattr(callback, "__name__", type(callback).__name__)


@contextlib.contextmanager
def running(loop: FakeLoop | None = None) -> Iterator[FakeLoop]:
    """Make a FakeLoop the running loop of this thread (what `asyncio.get_running_loop()` returns) for the
    block; on leaving it, fail if a callback raised."""
    loop = loop or FakeLoop()
    asyncio.events._set_running_loop(loop)  # what every event loop does while it runs (public for loop authors)
    try:
        yield loop
        loop.run_ready()
    finally:
        asyncio.events._set_running_loop(None)
    if loop.errors:
        raise AssertionError(f"a callback raised on the fake loop: {loop.errors}")


# --- configuration and services --------------------------------------------------------------------------


def backend(name: str, models: list[str] | None = None, kind: str = "vllm", **options: Any) -> dict[str, Any]:
    """A backend section served at http://<name>:8000 (the fake network answers it)."""
    return {"url": f"http://{name}:8000", "name": name, "type": kind, "models": models or ["m"], **options}


def make_config(**sections: Any) -> Config:
    """A Config through the real parser. Defaults fit tests: one backend "a" serving "m", no active health
    checks (the fake network refuses probes), no retry backoff; a section given is merged over its default."""
    data: dict[str, Any] = {
        "backends": [backend("a")],
        "health_check": {"enabled": False},
        "routing": {"retry_backoff": 0},
    }
    for name, section in sections.items():
        default = data.get(name)
        data[name] = {**default, **section} if isinstance(default, dict) and isinstance(section, dict) else section
    return parse_config(data)


class RecordingAccessLog:
    """The access log's I/O edge: the lines are kept as the contexts they would be written from."""

    enabled = True

    def __init__(self) -> None:
        self.requests: list[RequestContext] = []
        self.rejected: list[tuple[str, int, str, str]] = []  # (peer, status, termination, message)

    def write(self, ctx: RequestContext, duration: float, ttft: float | None) -> None:
        self.requests.append(ctx)

    def write_rejected(self, peer: str, status: int, termination: str, message: str) -> None:
        self.rejected.append((peer, status, termination, message))

    def close(self) -> None:
        pass


class RecordingOutbox:
    """The usage delivery's I/O edge: records are kept in a list."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def make_lasting(config: Config, loop: FakeLoop) -> Lasting:
    """What ProxyServer builds, with the access log and the outbox recording in memory."""
    return build_lasting(config, loop, _no_live_state, access_log=RecordingAccessLog(),  # type: ignore[arg-type]
                         outbox=RecordingOutbox())  # type: ignore[arg-type]


def _no_live_state() -> dict[str, Any]:
    return {"inflight": 0, "streams": 0, "connections": 0, "ratelimit_held": 0, "backends": {}}


def make_services(config: Config, loop: FakeLoop, *, lasting: Lasting | None = None,
                  previous: Services | None = None) -> Services:
    """The real `build_services` on the fake loop (the first probe round is refused by the fake network;
    the periodic health watchers are stopped at once, so the fake clock never runs probes)."""
    if lasting is None:
        lasting = previous.lasting if previous is not None else make_lasting(config, loop)
    services = loop.run_until_complete(build_services(config, lasting, previous))
    services.fleet.stop()
    loop.run_ready()
    return services


def make_clients(services: Services, loop: FakeLoop) -> Clients:
    """The connections' shared state and protocol factory, with the settings ProxyServer derives."""
    return Clients(ClientSettings.from_config(services.config.server), services, loop)


def sample(services: Services, name: str, **labels: str) -> float:
    """A metric's current value (0 when it has no sample yet)."""
    assert services.metrics is not None
    return services.metrics.registry.get_sample_value(name, labels) or 0.0


def requests_counted(services: Services) -> float:
    """llmproxy_requests_total summed over every backend and status."""
    assert services.metrics is not None
    return sum(s.value for m in services.metrics.registry.collect() if m.name == "llmproxy_requests"
               for s in m.samples if s.name == "llmproxy_requests_total")


# --- the relay's parts on their own ----------------------------------------------------------------------


def upstream_connection(loop: FakeLoop, host: str = "a", port: int = 8000,
                        max_header_size: int = 32 * 1024) -> FakeUpstream:
    """A connected UpstreamConnection on a FakeTransport, outside any pool, with the backend's end of it
    (not added to `loop.upstreams`: that list is what the pools opened)."""
    conn = UpstreamConnection(max_header_size)
    transport = FakeTransport(peer=(host, port))
    conn.connection_made(transport)
    return FakeUpstream(host, port, conn, transport, loop)


class RecordingSink:
    """An upstream connection's ResponseSink that records every event, in order; the body pieces it takes from
    the connection's `body` list (as the relay does) are recorded as ("body", piece) where it takes them."""

    def __init__(self, body: list[bytes]) -> None:
        self.events: list[tuple] = []
        self._body = body

    def _take_body(self) -> None:
        self.events.extend(("body", piece) for piece in self._body)
        self._body.clear()

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.events.append(("head", status))

    def on_response_complete(self) -> None:
        self._take_body()
        self.events.append(("complete",))

    def on_upstream_lost(self, reason: str, kind: str = UPSTREAM_FAILED) -> None:
        self._take_body()
        self.events.append(("lost", kind, reason))

    def end_of_read(self) -> None:
        self._take_body()
        self.events.append(("end_of_read",))

    def of(self, name: str) -> list[tuple]:
        return [event for event in self.events if event[0] == name]


class FakeBackend:
    """A backend as the relay sees it (fleet/backend.Backend): its two deadlines, and every time to first
    token it is told, as (seconds, now)."""

    def __init__(self, first_byte_timeout: float = 30.0, stream_idle_timeout: float = 60.0) -> None:
        self.first_byte_timeout = first_byte_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.ttfts: list[tuple[float, float]] = []

    def observe_ttft(self, seconds: float, now: float) -> None:
        self.ttfts.append((seconds, now))


def relay_settings(loop: FakeLoop, *, tick: float = 0.5, write_timeout: float = 30.0) -> RelaySettings:
    """What every exchange shares, as build_lasting makes it: a sweeper ticking every `tick` s on the fake
    clock, fresh overhead histograms, the client write timeout, and traffic not draining."""
    return RelaySettings(loop=loop, sweeper=DeadlineSweeper(loop, tick), overhead=ProxyOverhead(),
                         write_timeout=write_timeout, traffic=Traffic())


class HandClock:
    """A stand-in for time.perf_counter that moves only when a test says so (`now`, or `advance`)."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the client side -------------------------------------------------------------------------------------


class Client:
    """A client connected to the proxy: the protocol under test and the transport it writes to."""

    def __init__(self, clients: Clients, loop: FakeLoop, peer: tuple[str, int] = CLIENT_PEER) -> None:
        self.loop = loop
        self.transport = FakeTransport(peer)
        self.conn: ClientConnection = clients()
        self.conn.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        """The client's bytes arrive (one read). A transport that is closed or paused reads nothing."""
        assert self.transport.reading and not self.transport.is_closing(), "a real transport would not read now"
        self.conn.data_received(data)
        self.loop.run_ready()

    def lose(self, exc: Exception | None = None) -> None:
        """The connection is gone (the client left, or the transport reports its close)."""
        self.conn.connection_lost(exc)
        self.loop.run_ready()

    def responses(self) -> list[Reply]:
        return parse_responses(self.transport.data)


class FakeClientSide:
    """The client connection as a request sees it (context.ClientSide), recording what is asked of it."""

    def __init__(self, peer: str = CLIENT_PEER[0]) -> None:
        self.transport = FakeTransport((peer, CLIENT_PEER[1]))
        self.peer = peer
        self.judged_by = None  # no address rules when it was accepted
        self.closed = False
        self.writing_paused = False
        self.body_timer_armed = 0
        self.finished: list[RequestContext] = []
        self.aborts = 0
        self.resets = 0

    def arm_body_timer(self) -> None:
        self.body_timer_armed += 1

    def request_finished(self, ctx: RequestContext) -> None:
        self.finished.append(ctx)

    def abort(self) -> None:
        self.aborts += 1
        self.closed = True
        self.transport.abort()

    def reset(self) -> None:
        self.resets += 1
        self.abort()

    def responses(self) -> list[Reply]:
        return parse_responses(self.transport.data)


class _ContextSink:
    """A RequestSink that makes the context of one request, as the client connection does."""

    def __init__(self, conn: FakeClientSide, request_id: str) -> None:
        self.conn, self.request_id = conn, request_id
        self.ctx: RequestContext | None = None

    def on_request_head(self, head: RequestHead) -> None:
        self.ctx = new_context(self.conn, head, self.request_id, head.keep_alive)  # type: ignore[arg-type]
        self.ctx.body_done = not head.has_body

    def on_request_body(self, data: bytes) -> None:
        self.ctx.body_received(data)

    def on_request_complete(self) -> None:
        self.ctx.body_finished()


def start_request(services: Services, raw: bytes, loop: FakeLoop,
                  conn: FakeClientSide | None = None) -> RequestContext:
    """Start the request in `raw` as the client connection does (EagerRun) and run it as far as it goes."""
    ctx = request_context(raw, conn)
    ctx.run = EagerRun(handle_request(services, ctx), loop)
    loop.run_ready()
    return ctx


def request_context(raw: bytes, conn: FakeClientSide | None = None, request_id: str = "req-1") -> RequestContext:
    """The context of the request in `raw` (parsed by the real codec); its body is done if `raw` holds it all."""
    sink = _ContextSink(conn or FakeClientSide(), request_id)
    RequestCodec(sink, CodecLimits()).feed(raw)
    assert sink.ctx is not None, "no complete request head in raw"
    return sink.ctx


def http_request(method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 version: str = "1.1") -> bytes:
    """One request's bytes; Host is added, and Content-Length when there is a body."""
    lines = [f"{method} {target} HTTP/{version}", "Host: proxy"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chat(model: str = "m", stream: bool = False, **fields: Any) -> bytes:
    """A POST /v1/chat/completions request for `model`."""
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                         **fields})
    return http_request("POST", "/v1/chat/completions", body)


def json_response(body: Any, status: int = 200, reason: str = "OK", headers: str = "") -> bytes:
    """A backend's complete JSON response."""
    data = orjson.dumps(body)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"{headers}\r\n").encode() + data


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
COMPLETION = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
OK = json_response(COMPLETION)


# --- what the client received ----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeats joined with ", "
    body: bytes = b""
    complete: bool = False  # the whole body arrived (False: cut short, as an aborted stream is)

    def json(self) -> Any:
        return orjson.loads(self.body)


class _ReplyParser:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self._name = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.replies.append(Reply())

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode().lower(), value.decode()
        headers = self.replies[-1].headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self.replies[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.replies[-1].body += body

    def on_message_complete(self) -> None:
        self.replies[-1].complete = True


def parse_responses(data: bytes) -> list[Reply]:
    """The responses in what the proxy wrote to a client, in order (not for answers to HEAD: no body)."""
    reader = _ReplyParser()
    reader.parser.feed_data(data)
    return reader.replies
