"""A minimal HTTP/1.1 streaming client on raw asyncio protocols, for latency benchmarks.

aiohttp/httpx spend tens to hundreds of microseconds of Python per request and per chunk; that noise
would swamp a 0.1 ms proxy overhead. This client does the least that still checks the response: it
parses the head, walks the chunked framing (so a truncated stream is caught, not timed), timestamps
the first bytes of the first SSE `data:` event, and stops at the terminating `0\\r\\n\\r\\n` chunk.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from time import perf_counter_ns

import orjson

# response parser states
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _UNTIL_CLOSE = range(7)

_MAX_HEAD = 64 * 1024
_PREFIX_CAP = 64 * 1024  # body bytes kept while looking for the first event (and for error messages)
_TAIL = 16  # body bytes kept from the end, enough to see the final `data: [DONE]` event
_DONE_EVENT = b"data: [DONE]\n\n"
_EVENT = b"data:"  # an SSE event start, counted in the de-chunked body
# what the body so far may end with when an event start straddles two body pieces (reads or chunks)
_EVENT_HEADS = tuple(_EVENT[:cut] for cut in range(1, len(_EVENT)))
CONNECT_RETRY_PAUSE = 0.05


@dataclass(slots=True)
class StreamResult:
    """One request's outcome. Times are nanoseconds from just before the request was written."""

    ok: bool
    status: int
    ttft_ns: int  # first bytes of the first SSE `data:` event; -1 if none arrived
    total_ns: int  # terminating chunk, or the failure
    error: str | None = None
    events: int = 0  # SSE `data:` events received, `data: [DONE]` included
    # arrival time of each event, as the client's `data_received` saw it (one timestamp per read, repeated
    # for each event that read held); None unless the client was asked to record them
    arrivals_ns: list[int] | None = None


class _BadFraming(Exception):
    pass


def build_request(host: str, port: int, path: str, body: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    """Serialise one keep-alive POST; built once and reused, so the hot path only writes bytes."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (extra_headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class StreamClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection running one streamed request at a time.

    With `record_arrivals` each result also carries the arrival time of every event (for inter-event gaps).
    """

    def __init__(self, record_arrivals: bool = False) -> None:
        self.record_arrivals = record_arrivals
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[StreamResult] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._t0 = 0
        self._status = 0
        self._keep_alive = True
        self._remaining = 0
        self._ttft = -1
        self._prefix = b""
        self._tail = b""
        self._event_count = 0
        self._arrivals: list[int] | None = [] if self.record_arrivals else None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # the request is one small write; Nagle would only add delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = perf_counter_ns()  # first thing: arrival time as seen by this event loop
        if self._waiter is None:
            self._abort()  # bytes nobody asked for: the connection is out of sync, never reuse it
            return
        self._buf += data
        try:
            self._parse(now)
        except (_BadFraming, ValueError) as exc:
            self._fail(f"bad response framing: {exc}", now)
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._finish(perf_counter_ns())  # a close-delimited body ends here
        else:
            where = "before the response head" if self._state == _HEAD else "mid-response"
            self._fail(f"connection closed {where}" + (f" ({exc})" if exc else ""), perf_counter_ns())

    # --- request ------------------------------------------------------------------------------------

    async def request(self, payload: bytes, timeout: float) -> StreamResult:
        """Send `payload` and wait for the whole response (or `timeout` seconds, then give up)."""
        if self.closed or self.transport is None:
            return StreamResult(False, 0, -1, 0, "connection already closed")
        loop = asyncio.get_running_loop()
        self._reset()
        waiter = self._waiter = loop.create_future()
        # a timer handle instead of asyncio.wait_for: no extra task per request on the hot path
        self._timer = loop.call_later(timeout, self._on_timeout, timeout)
        self._t0 = perf_counter_ns()
        self.transport.write(payload)
        try:
            return await waiter
        finally:
            self._timer.cancel()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    # --- response parsing ---------------------------------------------------------------------------

    def _parse(self, now: int) -> None:
        buf = self._buf
        pos = 0
        while self._waiter is not None:
            state = self._state
            if state in (_DATA, _LENGTH, _UNTIL_CLOSE):
                avail = len(buf) - pos
                if state != _UNTIL_CLOSE:
                    avail = min(avail, self._remaining)
                if avail <= 0:
                    if state == _LENGTH and self._remaining == 0:
                        self._finish(now)
                    break
                self._body(buf, pos, avail, now)
                pos += avail
                self._remaining -= avail
                if state == _DATA and self._remaining == 0:
                    self._state = _DATA_END
            elif state == _SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                self._remaining = size
                self._state = _DATA if size else _TRAILER
            elif state == _DATA_END:
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise _BadFraming("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                last = end == pos  # the empty line after `0\r\n` (or after trailer fields)
                pos = end + 2
                if last:
                    self._finish(now)
            else:  # _HEAD
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > _MAX_HEAD:
                        raise _BadFraming("response head too large")
                    break
                self._head(bytes(buf[pos:end]))
                pos = end + 4
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        self._status = int(rest[:3])
        self._keep_alive = version == b"HTTP/1.1"
        chunked = False
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding":
                chunked = value.endswith(b"chunked")
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                tokens = {t.strip() for t in value.split(b",")}
                if b"close" in tokens:
                    self._keep_alive = False
                elif b"keep-alive" in tokens:
                    self._keep_alive = True
        if chunked:
            self._state = _SIZE
        elif length >= 0:
            self._state = _LENGTH
            self._remaining = length
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False

    def _body(self, buf: bytearray, pos: int, n: int, now: int) -> None:
        # one C-level scan per body piece (one per event on a paced stream); `now` is shared by the read
        events = buf.count(_EVENT, pos, pos + n)
        if self._tail.endswith(_EVENT_HEADS):  # rare: an event start may be split across pieces
            events += self._split_event(buf, pos)
        if events:
            self._event_count += events
            arrivals = self._arrivals
            if arrivals is not None:
                for _ in range(events):
                    arrivals.append(now)
        if self._ttft < 0 and len(self._prefix) < _PREFIX_CAP:
            self._prefix += bytes(buf[pos:pos + n])
            prefix = self._prefix
            if prefix.startswith(b"data:") or b"\ndata:" in prefix:
                self._ttft = now - self._t0
        # only the last few bytes are needed to check the end; do not copy whole events
        if n >= _TAIL:
            self._tail = bytes(buf[pos + n - _TAIL:pos + n])
        else:
            self._tail = (self._tail + bytes(buf[pos:pos + n]))[-_TAIL:]

    def _split_event(self, buf: bytearray, pos: int) -> int:
        """1 if the body so far ends with the first part of an event start and this piece begins with the rest."""
        for cut in range(len(_EVENT) - 1, 0, -1):
            if self._tail.endswith(_EVENT[:cut]):
                return int(buf[pos:pos + len(_EVENT) - cut] == _EVENT[cut:])
        return 0

    # --- outcomes -----------------------------------------------------------------------------------

    def _finish(self, now: int) -> None:
        if self._status != 200:
            snippet = self._prefix[:300].decode("utf-8", "replace")
            error = f"HTTP {self._status}: {snippet}"
            self._settle(StreamResult(False, self._status, self._ttft, now - self._t0, error))
        elif self._ttft < 0:
            self._settle(StreamResult(False, 200, -1, now - self._t0, "200 but no SSE `data:` event in the body"))
        elif (problem := self._end_problem()) is not None:
            self._settle(StreamResult(False, 200, self._ttft, now - self._t0, problem))
        else:
            self._settle(StreamResult(True, 200, self._ttft, now - self._t0))
        self._state = _HEAD
        if not self._keep_alive:
            self._abort()

    def _end_problem(self) -> str | None:
        """What is wrong with how a 200 stream ended, or None. An OpenAI stream ends with `data: [DONE]`; a
        subclass for another API says how its streams end (what it needs of the end, it keeps in `_body`)."""
        if self._tail.endswith(_DONE_EVENT):
            return None
        return f"stream ended without `data: [DONE]` (last bytes {self._tail!r})"

    def _fail(self, error: str, now: int) -> None:
        self._settle(StreamResult(False, self._status, self._ttft, now - self._t0, error))

    def _settle(self, result: StreamResult) -> None:
        result.events = self._event_count
        result.arrivals_ns = self._arrivals
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _on_timeout(self, timeout: float) -> None:
        phase = "waiting for the response head" if self._state == _HEAD else "mid-response"
        self._fail(f"timed out after {timeout:g}s {phase}", perf_counter_ns())
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Lane:
    """A worker's keep-alive connection to one endpoint, reopened if the server or a failure closed it.

    Reopening is counted: a proxy that drops keep-alive connections would otherwise hide the cost of
    new connections, since the TTFT clock starts only at the request write.
    """

    def __init__(self, host: str, port: int, payload: bytes, timeout: float, record_arrivals: bool = False) -> None:
        self.host = host
        self.port = port
        self.payload = payload
        self.timeout = timeout
        self.record_arrivals = record_arrivals  # see StreamClient
        self.reconnects = 0
        self._client: StreamClient | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._client = await loop.create_connection(lambda: StreamClient(self.record_arrivals), self.host,
                                                       self.port)

    async def send(self) -> StreamResult:
        if self._client is None or self._client.closed:
            if self._client is not None:
                self.reconnects += 1
            try:
                await self.open()
            except OSError as exc:
                # a refused connect fails at once: pause so a dead server is not hammered in a tight loop
                await asyncio.sleep(CONNECT_RETRY_PAUSE)
                return StreamResult(False, 0, -1, 0, f"connect to {self.host}:{self.port} failed: {exc}")
        assert self._client is not None
        return await self._client.request(self.payload, self.timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


async def exchange(host: str, port: int, request: bytes, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Write one request on a throwaway connection and read until the server closes it: (head, body).

    For control endpoints and one-off probes, not the hot path: the request must ask for `Connection:
    close`, so that the end of the connection is the end of the response.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> bytes:
    """GET `path` over a throwaway connection and return the (de-chunked) body; anything but 200 raises."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    head, body = await exchange(host, port, request, timeout)
    if not head.startswith(b"HTTP/1.1 200"):
        status_line = head.split(b"\r\n", 1)[0]
        raise RuntimeError(f"GET {path}: {status_line!r}")
    return _dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body


def _dechunk(body: bytes) -> bytes:
    """The payload of a complete chunked body (a whole response read to EOF, so no framing checks)."""
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if not size:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


async def fetch_json(host: str, port: int, path: str, timeout: float = 5.0) -> object:
    """GET a small JSON document (control endpoints, not the hot path)."""
    return orjson.loads(await http_get(host, port, path, timeout))
