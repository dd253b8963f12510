"""End-to-end backend faults: a scripted backend misbehaves on the wire, the real proxy process sits between
it and a raw-socket client, and every test checks what the client saw, what must not have happened, and the
bookkeeping invariants.

One consolidated fault table (faults some other file also covers are kept short here):

| fault                                         | expected at the client                                   |
|-----------------------------------------------|----------------------------------------------------------|
| connection refused                            | 502 upstream_connect_failed, SC, no usage record         |
| pooled connection closed by the backend idle  | 200, retried on a fresh connection, invisibly            |
| reset right after the head / after events     | 200 then truncation (no last chunk), SD, estimated usage |
| accepts, never answers                        | 504 upstream_first_byte_timeout after first_byte, sH     |
| stalls mid-stream                             | 200 then truncation after stream_idle, sD                |
| 5xx burst                                     | 500s passed through, then the backend is ejected         |
| 429 with Retry-After                          | 429 passed through with Retry-After, not retried         |
| malformed SSE (several shapes)                | forwarded byte for byte; meter never raises              |
| a 200 MB SSE line without newline             | every byte forwarded, RSS bounded, usage estimated       |
| body shorter than its Content-Length          | truncation, not a clean end; SD                          |
| close-delimited body                          | re-chunked for HTTP/1.1, complete; close for HTTP/1.0    |
| 400 before the backend read the request body  | 400 relayed, nothing hangs, connection not reused        |
| 100 Continue / 103 Early Hints before status  | not forwarded; the real response is                      |

After every test: exactly one access-log line per request, exactly one usage record per POST that was sent
upstream, no traceback in the proxy's output, and `assert_idle` (in-flight 0, checkouts 0, rate-limit
slots 0, open fds back to the baseline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import (
    Proc,
    access_log,
    assert_idle,
    free_port,
    metric_value,
    open_fds,
    owned,
    post_request,
    raw_connect,
    rss_kib,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
)

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there, backend"}]
STREAM_CHAT = json.dumps({"model": "m", "stream": True, "messages": MESSAGES}).encode()
# Asking for usage ourselves means the proxy strips nothing: what the backend sends is what we must get.
STREAM_CHAT_WITH_USAGE = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                                     "messages": MESSAGES}).encode()
PLAIN_CHAT = json.dumps({"model": "m", "messages": MESSAGES}).encode()
IO_TIMEOUT = 20.0


# The scripted backend -----------------------------------------------------------------------------

@dataclass
class Seen:
    """One request the fault server read the head of."""

    conn: int  # index of the TCP connection it arrived on (0, 1, ...)
    method: str
    path: str
    rid: str
    served_before: int  # requests answered earlier on the same connection


class FaultConn:
    """One accepted connection, handed to the scripts: blocking socket I/O, every wait bounded."""

    def __init__(self, server: FaultServer, sock: socket.socket, index: int) -> None:
        self.server = server
        self.sock = sock
        self.index = index
        self.buf = b""
        self.served = 0
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_head(self) -> dict | None:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return {"method": method, "path": target, "headers": headers,
                "length": int(headers.get("content-length", "0")), "rid": headers.get("x-request-id", "")}

    def read_body(self, req: dict) -> int:
        """Read and discard the request body; return how many bytes of it arrived."""
        need = req["length"]
        got = min(len(self.buf), need)
        self.buf = self.buf[got:]
        while got < need:
            data = self.sock.recv(min(1 << 20, need - got))
            if not data:
                break
            got += len(data)
        return got

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def payload(self, req: dict, data: bytes, framing: str) -> None:
        """Send one piece of the response body, framed; record it as what the backend sent."""
        self.server.record_sent(req["rid"], data)
        self.send(b"%x\r\n%b\r\n" % (len(data), data) if framing == "chunked" else data)

    def wait_peer_close(self, rid: str, limit: float = 15.0) -> None:
        """Read until the proxy closes the connection (or `limit`); record when it did."""
        deadline = time.monotonic() + limit
        with contextlib.suppress(OSError):
            self.sock.settimeout(0.2)
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        break
                except TimeoutError:
                    continue
        self.server.peer_closed[rid] = time.monotonic()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def lingering_close(self, limit: float = 5.0) -> None:
        """Half-close, then drain what the peer still sends, so our unread bytes do not turn the FIN into RST."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(limit)
            while self.sock.recv(1 << 20):
                pass


Handler = Callable[[FaultConn, dict], bool]  # answers one POST; returns True to keep the connection


class FaultServer:
    """A 127.0.0.1 HTTP/1.1 server whose POST answers are scripts, picked by the `x-fault` request header
    (else "default"). GET /health and /v1/models are answered properly, should anything probe."""

    def __init__(self, handlers: dict[str, Handler] | Handler) -> None:
        self.handlers = handlers if isinstance(handlers, dict) else {"default": handlers}
        self.seen: list[Seen] = []
        self.sent: dict[str, bytearray] = {}  # rid -> body bytes sent (not kept when keep_sent is False)
        self.sent_sha: dict[str, hashlib._Hash] = {}
        self.sent_len: dict[str, int] = {}
        self.keep_sent = True
        self.peer_closed: dict[str, float] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.stopping = False
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def connections(self) -> int:
        return len(self._socks)

    def posts(self, rid: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == "POST" and (rid is None or s.rid == rid)]

    def record_sent(self, rid: str, data: bytes) -> None:
        with self._lock:
            if self.keep_sent:
                self.sent.setdefault(rid, bytearray()).extend(data)
            self.sent_sha.setdefault(rid, hashlib.sha256()).update(data)
            self.sent_len[rid] = self.sent_len.get(rid, 0) + len(data)

    def sent_bytes(self, rid: str) -> bytes:
        with self._lock:
            return bytes(self.sent.get(rid, b""))

    def close(self) -> None:
        self.stopping = True
        self._accepter.join(5)
        self.listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                index = len(self._socks)
                self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(FaultConn(self, sock, index),), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: FaultConn) -> None:
        try:
            while not self.stopping:
                req = conn.read_head()
                if req is None:
                    return
                with self._lock:
                    self.seen.append(Seen(conn.index, req["method"], req["path"], req["rid"], conn.served))
                if req["method"] != "POST":
                    conn.read_body(req)
                    _answer_get(conn, req)
                    conn.served += 1
                    continue
                handler = self.handlers.get(req["headers"].get("x-fault", "default"), self.handlers.get("default"))
                keep = handler(conn, req)
                conn.served += 1
                if not keep:
                    return
        except OSError:
            return  # the proxy aborted: expected in most faults
        except Exception as exc:  # a broken script must fail the test, not vanish in a thread
            self.errors.append(repr(exc))
        finally:
            with contextlib.suppress(OSError):
                conn.sock.close()


def _answer_get(conn: FaultConn, req: dict) -> None:
    if req["path"] == "/v1/models":
        body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        conn.send(_json_head(200, len(body)) + body)
    else:
        conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" if req["path"] == "/health"
                  else b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")


# Wire pieces -------------------------------------------------------------------------------------

def event(text: str) -> bytes:
    return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
            b'"delta":{"content":"%b"},"finish_reason":null}]}\n\n' % text.encode())


def usage_event(prompt: int, completion: int, end: bytes = b"\n\n") -> bytes:
    return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
            b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}%b'
            % (prompt, completion, prompt + completion, end))


DONE = b"data: [DONE]\n\n"
GOOD_STREAM = [event("a"), event("b"), event("c"), usage_event(7, 3), DONE]
JSON_REPLY = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


def _json_head(status: int, length: int | None, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 429: b"Too Many Requests", 500: b"Internal Server Error"}[status]
    framing = b"content-length: %d\r\n" % length if length is not None else b""
    return b"HTTP/%b %d %b\r\ncontent-type: application/json\r\n%b%b\r\n" % (version, status, reason, framing, extra)


def _sse_head(framing: str, length: int = 0) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    if framing == "chunked":
        head += b"transfer-encoding: chunked\r\n"
    elif framing == "length":
        head += b"content-length: %d\r\n" % length
    else:
        head += b"connection: close\r\n"
    return head + b"\r\n"


def stream(pieces: list[bytes], framing: str = "chunked", gap: float = 0.01, prefix: bytes = b"") -> Handler:
    """Answer 200 text/event-stream with `pieces`, each in its own write; `prefix` goes before the head."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        conn.send(prefix + _sse_head(framing, sum(map(len, pieces))))
        for piece in pieces:
            time.sleep(gap)
            conn.payload(req, piece, framing)
        if framing == "chunked":
            conn.send(b"0\r\n\r\n")
            return True
        if framing == "close":
            conn.lingering_close()
            return False
        return True

    return handler


def json_reply(status: int = 200, body: bytes = JSON_REPLY, extra: bytes = b"") -> Handler:
    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        conn.send(_json_head(status, len(body), extra))
        conn.payload(req, body, "length")
        return True

    return handler


def reset_after(pieces: list[bytes]) -> Handler:
    """Head (chunked SSE), the pieces, then RST."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        conn.send(_sse_head("chunked"))
        for piece in pieces:
            time.sleep(0.02)
            conn.payload(req, piece, "chunked")
        time.sleep(0.2)  # let the proxy relay it all before the reset arrives
        conn.reset()
        return False

    return handler


def stall_after(pieces: list[bytes] | None) -> Handler:
    """Read the request, send the pieces (None: not even a head), then say nothing until the proxy hangs up."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        if pieces is not None:
            conn.send(_sse_head("chunked"))
            for piece in pieces:
                conn.payload(req, piece, "chunked")
        conn.wait_peer_close(req["rid"])
        return False

    return handler


def short_body(content_type: bytes, declared: int, pieces: list[bytes]) -> Handler:
    """Declare `declared` bytes of body, send fewer, then close (FIN)."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n" % (content_type, declared))
        for piece in pieces:
            time.sleep(0.02)
            conn.payload(req, piece, "length")
        time.sleep(0.1)
        conn.lingering_close(limit=1.0)
        return False

    return handler


def close_delimited_json(version: bytes) -> Handler:
    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        conn.send(_json_head(200, None, b"" if version == b"1.0" else b"connection: close\r\n", version))
        half = len(JSON_REPLY) // 2
        conn.payload(req, JSON_REPLY[:half], "close")
        time.sleep(0.02)
        conn.payload(req, JSON_REPLY[half:], "close")
        conn.lingering_close()
        return False

    return handler


INFORMATIONAL = (b"HTTP/1.1 100 Continue\r\n\r\n",
                 b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\nx-hint: early\r\n\r\n")


def informational_then(handler_after: Handler, separate: bool) -> Handler:
    """100 Continue and 103 Early Hints, then whatever `handler_after` answers."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        req = {**req, "length": 0}  # read already
        if separate:
            for interim in INFORMATIONAL:
                conn.send(interim)
                time.sleep(0.1)
            return handler_after(conn, req)
        original = conn.send
        pending = [b"".join(INFORMATIONAL)]

        def send_with_interims(data: bytes) -> None:  # the 1xx go in the same write as the real head
            original(pending.pop() + data if pending else data)

        conn.send = send_with_interims  # type: ignore[method-assign]
        try:
            return handler_after(conn, req)
        finally:
            conn.send = original  # type: ignore[method-assign]

    return handler


# Malformed SSE payloads: (pieces, usage the meter must report or None, the usage-only event a stripping
# proxy removes or None). Each piece is sent in its own write, splitting lines and CRLFs across reads.

def _content(text: str) -> bytes:
    return b'{"choices":[{"index":0,"delta":{"content":"%b"}}]}' % text.encode()


MALFORMED: dict[str, tuple[list[bytes], tuple[int, int] | None, bytes | None]] = {
    "no_blank_lines": ([
        b"data: " + _content("a") + b"\ndata: " + _content("b")[:9],
        _content("b")[9:] + b"\n",
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}\n',
        b"data: [DONE]\n",
    ], None, None),
    "invalid_json": ([
        event("a"),
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}\n\n',
        b"data: {not json}\n\n",
        b'data: {"choices":[],"usage":{"prompt_tokens":5,\n\n',
        b"data: \xff\xfe\x00\x01 binary \x80\n\n",
        b'data:{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}garbage\n\n',
        b"event: weird\nid: 1\nretry: soon\n: comment\n\n",
        b"data\n\n",
        DONE,
    ], None, None),
    "crlf_mix": ([
        event("a").replace(b"\n", b"\r\n"),
        b"data: " + _content("b") + b"\r",
        b"\r",
        b"data: " + _content("c") + b"\n\r\n",
        b": keep-alive\r\n\r\n",
        usage_event(11, 3, b"\r"),
        b"\n\r",
        b"\n",
        b"data: [DONE]\r\n\r\n",
    ], (11, 3), usage_event(11, 3, b"\r\n\r\n")),
    "usage_garbage": ([
        b'data: {"choices":[],"usage":{"prompt_tokens":"abc","completion_tokens":null}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":-1,"completion_tokens":true}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":123456789012345678901234567890,"completion_tokens":1.5}}\n\n',
        b'data: {"choices":[],"usage":{}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":1e999,"completion_tokens":2}}\n\n',
        b'data: ["usage":{"prompt_tokens":1}]\n\n',
        b'data: {"usage": {"prompt_tokens": [1], "completion_tokens": {"a": 1}}}\n\n',
        b': "usage":{"prompt_tokens":9,"completion_tokens":9}\n\n',
        b'event: usage\nid: "usage":{\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\ndata: trailing\n\n',
        b'data: "usage":{"prompt_tokens":1,"completion_tokens":2}\n\n',
        DONE,
    ], None, None),
    "unterminated_usage": ([
        event("a"), event("b"),
        usage_event(4, 2, b""),  # the stream ends in the middle of the usage event's line
    ], (4, 2), usage_event(4, 2, b"")),
    "over_cap_line_then_usage": ([
        event("a"),
        b'data: {"junk":"',
        *[b"x" * 65536] * 24,  # 1.5 MiB in one line: over the meter's 1 MiB cap
        b'"}\n\n',
        usage_event(7, 3),
        DONE,
    ], None, None),  # the meter gave up on the stream: the usage after it is not read (nor stripped)
}
MALFORMED_FRAMING = {"unterminated_usage": "length", "over_cap_line_then_usage": "close"}


# The fault table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    handler: Handler | None  # None: nobody listens (connection refused)
    status: int
    complete: bool | None  # the client saw a clean end (None: not checked)
    termination: str
    usage_source: str | None  # None: no usage record (nothing was sent upstream)
    body: bytes = b""
    path: str = CHAT_PATH
    version: str = "1.1"
    backend: dict = field(default_factory=dict)
    posts: int = 1  # POSTs the backend must see: more would be a retry after bytes reached the client
    body_is_sent: bool = True  # the client must get exactly what the backend sent
    strip: bytes | None = None  # ...minus this usage-only event (the proxy injected include_usage)
    reported: tuple[int, int] | None = None
    completion_tokens: int | None = None  # the estimate, when the stream ended without usage
    error_code: str | None = None
    seconds: tuple[float, float] = (0.0, 5.0)
    upstream_closed: bool = False  # the proxy must have hung up on the backend
    check: Callable[[Response], None] | None = None


def _no_interim(response: Response) -> None:
    assert response.raw.startswith(b"HTTP/1.1 200 "), response.raw[:80]
    assert b" 100 " not in response.head and b" 103 " not in response.head
    assert "link" not in response.headers and "x-hint" not in response.headers


def _chunked(response: Response) -> None:
    assert response.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.headers


def _declared(length: int) -> Callable[[Response], None]:
    def check(response: Response) -> None:
        assert response.headers.get("content-length") == str(length)
    return check


def _retry_after(response: Response) -> None:
    assert response.headers.get("retry-after") == "7"


FAULTS: dict[str, Fault] = {
    "connection_refused": Fault(None, 502, True, "SC", None, body=STREAM_CHAT, posts=0, body_is_sent=False,
                                error_code="upstream_connect_failed"),
    "reset_after_head": Fault(reset_after([]), 200, False, "SD", "estimated", body=STREAM_CHAT_WITH_USAGE,
                              completion_tokens=0),
    "reset_after_events": Fault(reset_after([event("a"), event("b"), event("c")]), 200, False, "SD", "estimated",
                                body=STREAM_CHAT_WITH_USAGE, completion_tokens=3),
    "never_answers": Fault(stall_after(None), 504, True, "sH", "estimated", body=STREAM_CHAT,
                           backend={"timeouts": {"first_byte": "500ms"}}, body_is_sent=False,
                           error_code="upstream_first_byte_timeout", seconds=(0.45, 3.0), upstream_closed=True),
    "stalls_mid_stream": Fault(stall_after([event("a"), event("b")]), 200, False, "sD", "estimated",
                               body=STREAM_CHAT_WITH_USAGE, backend={"timeouts": {"stream_idle": "500ms"}},
                               completion_tokens=2, seconds=(0.45, 3.0), upstream_closed=True),
    "429_retry_after": Fault(json_reply(429, b'{"error":{"message":"slow down","code":429}}',
                                        b"retry-after: 7\r\n"), 429, True, "--", "none", body=PLAIN_CHAT,
                             check=_retry_after),  # refused by the backend: a record with nothing billed
    "short_body_json": Fault(short_body(b"application/json", 1000, [JSON_REPLY[:40], JSON_REPLY[40:90]]),
                             200, False, "SD", "estimated", body=PLAIN_CHAT, check=_declared(1000)),
    "short_body_sse": Fault(short_body(b"text/event-stream", 5000, [event("a"), event("b")]), 200, False, "SD",
                            "estimated", body=STREAM_CHAT_WITH_USAGE, completion_tokens=2, check=_chunked),
    "close_delimited_sse": Fault(stream(GOOD_STREAM, "close"), 200, True, "--", "reported",
                                 body=STREAM_CHAT_WITH_USAGE, reported=(7, 3), check=_chunked),
    "close_delimited_json_http10_backend": Fault(close_delimited_json(b"1.0"), 200, True, "--", "reported",
                                                 body=PLAIN_CHAT, reported=(5, 1), check=_chunked),
    "close_delimited_json_http11_backend": Fault(close_delimited_json(b"1.1"), 200, True, "--", "reported",
                                                 body=PLAIN_CHAT, reported=(5, 1), check=_chunked),
    "close_delimited_sse_http10_client": Fault(stream(GOOD_STREAM, "close"), 200, True, "--", "reported",
                                               body=STREAM_CHAT_WITH_USAGE, version="1.0", reported=(7, 3)),
    "interim_1xx_same_write": Fault(informational_then(stream(GOOD_STREAM), separate=False), 200, True, "--",
                                    "reported", body=STREAM_CHAT_WITH_USAGE, reported=(7, 3), check=_no_interim),
    "interim_1xx_separate_writes": Fault(informational_then(stream(GOOD_STREAM), separate=True), 200, True,
                                         "--", "reported", body=STREAM_CHAT_WITH_USAGE, reported=(7, 3),
                                         check=_no_interim),
    "interim_103_then_json": Fault(informational_then(json_reply(), separate=True), 200, True, "--", "reported",
                                   body=PLAIN_CHAT, reported=(5, 1), check=_no_interim),
}
for _name, (_pieces, _usage, _usage_only) in MALFORMED.items():
    _framing = MALFORMED_FRAMING.get(_name, "chunked")
    for _strip in (False, True):
        FAULTS[f"malformed_sse_{_name}" + ("_stripping" if _strip else "")] = Fault(
            stream(_pieces, _framing, gap=0.005), 200, True, "--", "reported" if _usage else "estimated",
            body=STREAM_CHAT if _strip else STREAM_CHAT_WITH_USAGE, strip=_usage_only if _strip else None,
            reported=_usage, check=_chunked)


# The client side ----------------------------------------------------------------------------------

@dataclass
class Response:
    status: int = 0
    head: bytes = b""
    raw: bytes = b""  # the first bytes received
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    size: int = 0
    sha: str = ""
    complete: bool = False
    seconds: float = 0.0


def read_response(sock: socket.socket, keep_body: bool = True, method: str = "POST") -> Response:
    """Read one response; the body is hashed as it arrives (kept too unless `keep_body` is False).

    complete: a chunked body ended with its last chunk, a Content-Length body got all its bytes, a
    close-delimited one ended with a FIN (a reset is a truncation)."""
    response = Response()
    buf = bytearray()
    hasher = hashlib.sha256()
    kept = bytearray()
    eof = [False]

    def fill() -> bool:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            eof[0] = True
            return False
        if len(response.raw) < 4096:
            response.raw += data[:4096]
        buf.extend(data)
        return True

    def take(data: bytes | bytearray) -> None:
        hasher.update(data)
        response.size += len(data)
        if keep_body:
            kept.extend(data)

    while (end := buf.find(b"\r\n\r\n")) < 0:
        if not fill():
            raise EOFError(f"connection closed before the response head: {bytes(buf[:200])!r}")
    response.head = bytes(buf[:end])
    del buf[:end + 4]
    lines = response.head.decode("latin-1").split("\r\n")
    response.status = int(lines[0].split(" ")[1])
    for line in lines[1:]:
        name, value = line.split(":", 1)
        response.headers[name.strip().lower()] = value.strip()

    if method == "HEAD":
        response.complete = True
    elif response.headers.get("transfer-encoding") == "chunked":
        pos = 0
        while True:
            while (nl := buf.find(b"\r\n", pos)) < 0:
                if not fill():
                    break
            if nl < 0:
                break
            size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
            pos = nl + 2
            if size == 0:
                while len(buf) - pos < 2 and fill():
                    pass
                response.complete = bytes(buf[pos:pos + 2]) == b"\r\n"
                break
            while size:
                if pos == len(buf):
                    del buf[:pos]
                    pos = 0
                    if not fill():
                        break
                piece = buf[pos:pos + size]
                take(piece)
                pos += len(piece)
                size -= len(piece)
            if size:
                break
            while len(buf) - pos < 2:
                if not fill():
                    break
            if len(buf) - pos < 2 or buf[pos:pos + 2] != b"\r\n":
                break
            pos += 2
            if pos > 1 << 20:
                del buf[:pos]
                pos = 0
    elif "content-length" in response.headers:
        need = int(response.headers["content-length"])
        while len(buf) < need and fill():
            pass
        take(buf[:need])
        response.complete = len(buf) >= need
    else:
        clean = True
        while True:
            if buf:
                take(buf)
                buf.clear()
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                clean = False
                break
            if not data:
                break
            buf.extend(data)
        response.complete = clean
    response.body = bytes(kept)
    response.sha = hasher.hexdigest()
    return response


# The harness -------------------------------------------------------------------------------------

class Harness:
    """One proxy in front of scripted backends; remembers every request so the end can check the books."""

    def __init__(self, tmp_path: Path, procs: list[Proc], backends: list[dict], **sections) -> None:
        self.tmp_path = tmp_path
        sections.setdefault("usage", usage_config(tmp_path))
        sections.setdefault("health_check", {"enabled": False})
        self.proxy = start_proxy(tmp_path, backends, **sections)
        procs.append(self.proxy)
        metric_value(self.proxy, "llmproxy_inflight_requests")  # one scrape first: whatever it opens stays open
        self.fd_baseline = open_fds(self.proxy.pid)
        self.requests: dict[str, bool] = {}  # rid -> a usage record is due
        self._n = 0

    def rid(self, label: str) -> str:
        self._n += 1
        return f"{label[:40]}-{self._n}-{time.monotonic_ns() % 1_000_000}"

    def send(self, rid: str, body: bytes, *, usage_due: bool, path: str = CHAT_PATH, version: str = "1.1",
             headers: dict[str, str] | None = None, keep_body: bool = True) -> Response:
        self.requests[rid] = usage_due
        started = time.monotonic()
        with raw_connect(self.proxy.port, timeout=IO_TIMEOUT) as sock:
            sock.sendall(post_request(path, body, {"X-Request-Id": rid, **(headers or {})}, version=version))
            response = read_response(sock, keep_body=keep_body)
        response.seconds = time.monotonic() - started
        return response

    def access_lines(self, rid: str) -> list[dict]:
        return [line for line in access_log(self.tmp_path) if line.get("client_request_id") == rid]

    def records(self, rid: str | None = None) -> list[dict]:
        records = usage_records(self.tmp_path)
        return records if rid is None else [r for r in records if r.get("client_request_id") == rid]

    def access_line(self, rid: str) -> dict:
        return wait_for(lambda: self.access_lines(rid), timeout=5)[0]

    def record(self, rid: str) -> dict:
        return wait_for(lambda: self.records(rid), timeout=10)[0]

    def finish(self) -> None:
        """The books and the invariants, once every request of the test is over."""
        due = sum(self.requests.values())
        wait_for(lambda: len(self.records()) >= due, timeout=10)
        wait_for(lambda: all(self.access_lines(rid) for rid in self.requests), timeout=5)
        time.sleep(0.2)  # anything recorded twice would show up by now
        log = access_log(self.tmp_path)
        assert all(line.get("request_id") for line in log), "every access-log line has a request_id"
        for rid, usage_due in self.requests.items():
            lines = [line for line in log if line.get("client_request_id") == rid]
            assert len(lines) == 1, f"{rid}: {len(lines)} access-log lines"
            records = self.records(rid)
            assert len(records) == (1 if usage_due else 0), f"{rid}: {len(records)} usage records: {records}"
            if records:
                assert records[0]["request_id"] == lines[0]["request_id"]
        assert len(self.records()) == due, "no usage record for a request this test did not make"
        output = self.proxy.text()
        for marker in ("Traceback", "meter failed", "metering the end", "internal error", "recording request"):
            assert marker not in output, f"{marker!r} in the proxy's output:\n{output[-3000:]}"
        assert_idle(self.proxy, self.fd_baseline)


@pytest.fixture
def faults():
    """Fault servers a test starts; all closed at the end of the test."""
    started = yield from owned(FaultServer.close)
    for server in started:
        assert not server.errors, f"a fault script failed: {server.errors}"


def _fault_server(faults: list, handlers) -> FaultServer:
    server = FaultServer(handlers)
    faults.append(server)
    return server


def _backend(server: FaultServer | None, name: str = "fault", **extra) -> dict:
    url = server.url if server is not None else f"http://127.0.0.1:{free_port()}"  # None: connecting is refused
    return {"url": url, "name": name, "type": "vllm", "models": ["m"], **extra}


# 1. The table: one request per fault -------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAULTS))
def test_backend_fault(name, tmp_path, procs, faults):
    fault = FAULTS[name]
    server = _fault_server(faults, fault.handler) if fault.handler is not None else None
    harness = Harness(tmp_path, procs, [_backend(server, **fault.backend)],
                      server={"listen": "127.0.0.1:0", "max_body_size": 64 << 20})
    rid = harness.rid(name)
    response = harness.send(rid, fault.body, usage_due=fault.usage_source is not None, path=fault.path,
                            version=fault.version)

    # What the client saw.
    assert response.status == fault.status, (response.head, response.body[:300])
    if fault.complete is not None:
        assert response.complete == fault.complete, "a truncated response must not end cleanly, nor vice versa"
    low, high = fault.seconds
    assert low <= response.seconds <= high, f"answered after {response.seconds:.2f}s"
    if fault.body_is_sent:
        sent = server.sent_bytes(rid)
        expected = sent.replace(fault.strip, b"") if fault.strip else sent
        if fault.strip:
            assert len(expected) < len(sent), "the usage-only event to strip is in what the backend sent"
        assert response.sha == hashlib.sha256(expected).hexdigest(), (
            f"client got {response.size} bytes, expected {len(expected)}:\n{response.body[:400]!r}\n"
            f"vs\n{expected[:400]!r}")
    if fault.error_code is not None:
        assert json.loads(response.body)["error"]["code"] == fault.error_code
    if fault.check is not None:
        fault.check(response)

    # What must not have happened: a retry after bytes reached the client, a backend left hanging.
    if server is not None:
        assert len(server.posts(rid)) == fault.posts, server.posts(rid)
    if fault.upstream_closed:
        wait_for(lambda: rid in server.peer_closed, timeout=3)

    # The books.
    line = harness.access_line(rid)
    assert line["status"] == fault.status and line["termination"] == fault.termination, line
    if response.complete:
        assert line["bytes_out"] == response.size, line
    if fault.usage_source is not None:
        record = harness.record(rid)
        assert record["usage_source"] == fault.usage_source, record
        assert record["status"] == fault.status and record["termination"] == fault.termination, record
        if fault.reported is not None:
            assert (record["prompt_tokens"], record["completion_tokens"]) == fault.reported, record
        if fault.completion_tokens is not None:
            assert record["completion_tokens"] == fault.completion_tokens, record
        if fault.usage_source == "estimated":
            assert record["prompt_tokens"] > 0, record  # from the request text
    harness.finish()


# 2. A pooled connection the backend closed ---------------------------------------------------------

def _close_when_idle(conn: FaultConn, req: dict) -> bool:
    """Answer keep-alive, then close the connection 50 ms later, as a keep-alive timeout does."""
    json_reply()(conn, req)
    time.sleep(0.05)
    conn.sock.close()
    return False


def _close_on_reuse(how: str) -> Handler:
    """Answer the first request on a connection; hang up on the next one without a byte (the race between
    the backend's keep-alive timeout and our next request)."""

    def handler(conn: FaultConn, req: dict) -> bool:
        if conn.served == 0:
            return json_reply()(conn, req)
        if how == "reset":
            conn.reset()
        else:
            conn.read_body(req)
            conn.sock.shutdown(socket.SHUT_RDWR)
        return False

    return handler


@pytest.mark.parametrize("variant", ["closed_while_idle", "closed_as_reused_fin", "closed_as_reused_rst"])
def test_pooled_connection_closed_by_the_backend_is_retried_transparently(variant, tmp_path, procs, faults):
    handler = {"closed_while_idle": _close_when_idle, "closed_as_reused_fin": _close_on_reuse("fin"),
               "closed_as_reused_rst": _close_on_reuse("reset")}[variant]
    server = _fault_server(faults, handler)
    harness = Harness(tmp_path, procs, [_backend(server, idle_timeout="30s")])
    first, second = harness.rid("first"), harness.rid("second")
    assert harness.send(first, PLAIN_CHAT, usage_due=True).status == 200
    if variant == "closed_while_idle":
        time.sleep(0.3)
    else:
        wait_for(lambda: metric_value(harness.proxy, "llmproxy_upstream_connections_idle") == 1, timeout=3)
    response = harness.send(second, PLAIN_CHAT, usage_due=True)
    assert response.status == 200 and response.complete and response.body == JSON_REPLY
    assert harness.access_line(second)["termination"] == "--"
    assert harness.record(second)["usage_source"] == "reported"
    served = [s for s in server.posts(second) if s.served_before == 0]
    assert len(served) == 1 and served[0].conn != server.posts(first)[0].conn, server.seen
    if variant != "closed_while_idle":
        assert len(server.posts(second)) == 2, "the request was first sent on the dead pooled connection"
    harness.finish()


# 3. The backend answers 400 before it read the request body ------------------------------------------

BIG = 16 << 20  # far more than the socket buffers hold: the proxy is still writing when the 400 arrives
BIG_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * BIG}]}).encode()
EARLY_400 = b'{"error":{"message":"prompt too long","code":400}}'


def _early_400(after: str) -> Handler:
    def handler(conn: FaultConn, req: dict) -> bool:
        conn.server.record_sent(req["rid"], EARLY_400)
        close = after in ("lingering_close", "reset")
        conn.send(_json_head(400, len(EARLY_400), b"connection: close\r\n" if close else b"") + EARLY_400)
        if after == "drain_and_keep_alive":  # then read the body it did not want, and serve on
            conn.read_body(req)
            return True
        if after == "keep_alive_unread":  # no "connection: close", yet it never reads on: hangs up 4 s later
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline and not conn.server.stopping:
                time.sleep(0.05)
        if after == "lingering_close":
            conn.lingering_close()
        else:
            conn.reset()
        return False

    return handler


@pytest.mark.parametrize("after", ["lingering_close", "reset", "drain_and_keep_alive", "keep_alive_unread"])
def test_early_400_before_the_request_body_was_read(after, tmp_path, procs, faults):
    server = _fault_server(faults, {"default": _early_400(after), "ok": json_reply()})
    harness = Harness(tmp_path, procs, [_backend(server, timeouts={"first_byte": "3s"})],
                      server={"listen": "127.0.0.1:0", "max_body_size": 64 << 20})
    rid = harness.rid(f"early-{after}")
    response = harness.send(rid, BIG_BODY, usage_due=True)
    assert response.status == 400 and response.complete, response.head
    assert response.body == EARLY_400
    assert response.seconds < 5, "nothing hangs"
    assert len(server.posts(rid)) == 1, "a response that reached the client is never retried"
    line = harness.access_line(rid)
    assert line["status"] == 400 and line["termination"] == "--", line
    assert harness.record(rid)["status"] == 400

    # The next request is not stuck behind the unsent body, and does not go on that connection.
    follow = harness.rid("follow")
    started = time.monotonic()
    response = harness.send(follow, PLAIN_CHAT, usage_due=True, headers={"x-fault": "ok"})
    waited = time.monotonic() - started
    assert (response.status, response.body) == (200, JSON_REPLY), (
        f"the next request got {response.status} after {waited:.1f}s: {response.body[:120]!r}")
    assert waited < 2, f"the next request waited {waited:.1f}s"
    harness.finish()
    if after == "keep_alive_unread":
        # The backend never reads the 16 MB: the proxy cannot have sent it all, so that connection must
        # not carry the next request. (A backend that drains the body may legitimately get the connection
        # back once all of it was written: the body is whole, the framing intact.)
        early_conn = server.posts(rid)[0].conn
        assert [s.conn for s in server.posts(follow)] != [early_conn], (
            "the connection whose request body was never fully sent went back to the pool and carried the next "
            "request, queued behind the rest of the old body")


# 4. A burst of 5xx: passed through, then the backend is ejected ------------------------------------------

def test_5xx_burst_is_passed_through_then_the_backend_is_ejected(tmp_path, procs, faults):
    bad = _fault_server(faults, json_reply(500, b'{"error":"boom"}'))
    good = _fault_server(faults, json_reply())
    harness = Harness(tmp_path, procs, [_backend(bad, "bad"), _backend(good, "good")],
                      routing={"load_balance": "round_robin"},
                      health_check={"enabled": False, "passive": {"consecutive_failures": 3,
                                                                  "base_ejection_time": 60}})
    statuses = []
    while metric_value(harness.proxy, "llmproxy_backend_ejections_total", 'backend="bad"') == 0:
        assert len(statuses) < 12, f"never ejected: {statuses}"
        statuses.append(harness.send(harness.rid("burst"), PLAIN_CHAT, usage_due=True).status)
    assert statuses.count(500) == 3 and len(bad.posts()) == 3, statuses  # 500 is not retried by default
    for _ in range(4):
        assert harness.send(harness.rid("after"), PLAIN_CHAT, usage_due=True).status == 200
    assert len(bad.posts()) == 3, "an ejected backend gets no traffic"
    harness.finish()


# 5. A 200 MB SSE line without a newline -----------------------------------------------------------

class PeakRss:
    """The proxy's peak RSS while the block runs, sampled every 20 ms from another thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    @property
    def growth_kib(self) -> int:
        return self.peak - self.before

    def __enter__(self) -> PeakRss:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join(5)
        with contextlib.suppress(OSError, RuntimeError):
            self.peak = max(self.peak, rss_kib(self.pid))

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_kib(self.pid))


HUGE = 200 << 20


def _huge_line(conn: FaultConn, req: dict) -> bool:
    conn.read_body(req)
    conn.send(_sse_head("chunked"))
    conn.payload(req, b'data: {"choices":[{"index":0,"delta":{"content":"', "chunked")
    block = b"a" * (1 << 20)
    for _ in range(HUGE // len(block)):
        conn.payload(req, block, "chunked")
    conn.send(b"0\r\n\r\n")
    return True


def test_a_200_mb_sse_line_without_newline_is_forwarded_with_bounded_memory(tmp_path, procs, faults):
    server = _fault_server(faults, {"default": _huge_line, "warm": json_reply()})
    server.keep_sent = False
    harness = Harness(tmp_path, procs, [_backend(server)])
    warm = harness.rid("warm")
    assert harness.send(warm, PLAIN_CHAT, usage_due=True, headers={"x-fault": "warm"}).status == 200
    rid = harness.rid("huge")
    with PeakRss(harness.proxy.pid) as rss:
        # Not asking for usage: the proxy strips, so it holds back an open event, up to its line cap.
        response = harness.send(rid, STREAM_CHAT, usage_due=True, keep_body=False)
    assert response.status == 200 and response.complete
    assert response.size == server.sent_len[rid] > HUGE
    assert response.sha == server.sent_sha[rid].hexdigest()
    growth_mib = rss.growth_kib / 1024
    assert growth_mib < 50, f"proxy RSS grew {growth_mib:.1f} MiB relaying one 200 MB line"
    record = harness.record(rid)
    assert record["usage_source"] == "estimated" and record["status"] == 200, record
    assert harness.access_line(rid)["bytes_out"] == response.size
    harness.finish()


# 6. A backend head over server.max_header_size, or a header line that never ends -------------------

HEAD_LIMIT = 16 << 10


def _head_over_limit(by: int) -> Handler:
    """A well-formed JSON response whose head (status and header lines) is HEAD_LIMIT + `by` bytes."""

    def handler(conn: FaultConn, req: dict) -> bool:
        conn.read_body(req)
        base = _json_head(200, len(JSON_REPLY))[:-2] + b"x-pad: \r\n"  # without the blank line that ends it
        conn.send(base.replace(b"x-pad: ", b"x-pad: " + b"p" * (HEAD_LIMIT + by - len(base))) + b"\r\n" + JSON_REPLY)
        conn.wait_peer_close(req["rid"])
        return False

    return handler


def _endless_header_line(conn: FaultConn, req: dict) -> bool:
    """A head whose one header line never ends: 64 KiB blocks until the proxy hangs up (or 256 MiB)."""
    conn.read_body(req)
    conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-endless: ")
    block = b"e" * (64 << 10)
    with contextlib.suppress(OSError):
        for _ in range(4096):
            conn.send(block)
    conn.wait_peer_close(req["rid"])
    return False


@pytest.mark.parametrize("variant", ["at_the_limit", "one_byte_over", "endless_header_line"])
def test_a_backend_head_over_the_limit_is_a_502_with_bounded_memory(variant, tmp_path, procs, faults):
    handler = {"at_the_limit": _head_over_limit(0), "one_byte_over": _head_over_limit(1),
               "endless_header_line": _endless_header_line}[variant]
    server = _fault_server(faults, {"default": handler, "warm": json_reply()})
    server.keep_sent = False
    harness = Harness(tmp_path, procs, [_backend(server)],
                      server={"listen": "127.0.0.1:0", "max_header_size": HEAD_LIMIT})
    assert harness.send(harness.rid("warm"), PLAIN_CHAT, usage_due=True, headers={"x-fault": "warm"}).status == 200
    rid = harness.rid(variant)
    with PeakRss(harness.proxy.pid) as rss:
        response = harness.send(rid, PLAIN_CHAT, usage_due=True)
    if variant == "at_the_limit":
        assert (response.status, response.body) == (200, JSON_REPLY), response.head[:200]
        assert len(response.headers["x-pad"]) > HEAD_LIMIT - 200  # relayed whole
    else:
        assert response.status == 502, response.head[:200]
        assert json.loads(response.body)["error"]["code"] == "upstream_protocol_error"
        assert harness.access_line(rid)["termination"] == "SH"
        wait_for(lambda: rid in server.peer_closed, timeout=3)  # the upstream connection is closed
        assert len(server.posts(rid)) == 1, "the backend got the request: it is not retried"
    assert rss.growth_kib < 2048, f"proxy RSS grew {rss.growth_kib} KiB"
    harness.finish()
