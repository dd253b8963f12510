"""Webhook delivery: a small HTTP/1.1 client (h11 over asyncio streams) and Standard Webhooks signing.

One POST per record. Connections are kept alive and reused (at most `concurrency` idle); a reused
connection that fails before any response byte is retried once on a fresh one, because the consumer
may have closed it while idle — that is not a failed attempt.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import random
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from llmproxy.config.model import WebhookConfig, signing_key
from llmproxy.delivery.retry import EXCERPT_BYTES, AttemptResult, RetryPolicy, decide, parse_retry_after
from llmproxy.delivery.spool import Action, Row

READ_SIZE = 65536
MAX_RESPONSE_BODY = 64 * 1024  # read past this and the connection is closed instead of reused
IDLE_TIMEOUT = 4.0  # below common server keep-alive timeouts (uvicorn: 5 s), so we rarely reuse a closing one
USER_AGENT = b"llmproxy-usage/1"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass(slots=True)
class Response:
    status: int
    retry_after: bytes | None
    excerpt: bytes


class _Conn:
    __slots__ = ("h11", "idle_since", "reader", "received", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.received = False  # any byte of the current response arrived

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class WebhookClient:
    """POSTs to one URL over a small keep-alive pool."""

    def __init__(self, url: str, max_idle: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode()
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.ssl = ssl.create_default_context() if self.tls else None
        self.max_idle = max_idle
        self._idle: list[_Conn] = []

    async def post(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        """One request/response exchange. The caller bounds it with a timeout (cancellation is safe)."""
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._exchange(conn, body, headers)
            except (OSError, EOFError, h11.ProtocolError):
                if conn.received:
                    raise
                # Stale keep-alive connection: the consumer closed it while idle. Retry once, fresh.
        conn = await self._connect()
        return await self._exchange(conn, body, headers)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkout(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_TIMEOUT and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.tls else None, limit=READ_SIZE)
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        reusable = False
        try:
            conn.received = False
            request = h11.Request(method="POST", target=self.target, headers=[
                (b"host", self.host_header), (b"user-agent", USER_AGENT), (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), *headers])
            conn.writer.write(conn.h11.send(request) + conn.h11.send(h11.Data(data=body))
                              + conn.h11.send(h11.EndOfMessage()))
            await conn.writer.drain()
            response, excerpt, complete = await self._read_response(conn)
            if complete and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                reusable = True
            return Response(response.status_code, _header(response.headers, b"retry-after"), excerpt)
        finally:
            # On any error or cancellation (timeout) the connection's state is unknown: never reuse it.
            if reusable and len(self._idle) < self.max_idle:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()

    async def _read_response(self, conn: _Conn) -> tuple[h11.Response, bytes, bool]:
        response = None
        excerpt = bytearray()
        size = 0
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(READ_SIZE)
                conn.received = conn.received or bool(data)
                conn.h11.receive_data(data)  # b"" is EOF: h11 raises if the message is incomplete
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if len(excerpt) < EXCERPT_BYTES:
                    excerpt += event.data[:EXCERPT_BYTES - len(excerpt)]
                if size > MAX_RESPONSE_BODY:
                    return response, bytes(excerpt), False  # not worth draining to keep the connection
            elif isinstance(event, h11.EndOfMessage):
                return response, bytes(excerpt), True
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("connection closed")
            # InformationalResponse (1xx) events are skipped.


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class WebhookSender:
    """Delivers rows of one webhook reporter, one POST per row."""

    def __init__(self, config: WebhookConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.policy = RetryPolicy(config.max_attempts, config.max_age, config.backoff_base, config.backoff_cap)
        self.key = signing_key(config.secret) if config.secret is not None else None
        self.extra = [(name.lower().encode(), value.encode()) for name, value in config.headers.items()]
        self.client = WebhookClient(config.url, max_idle=config.concurrency)

    async def deliver(self, rows: list[Row]) -> list[Action]:
        return [await self._deliver_one(row) for row in rows]

    async def _deliver_one(self, row: Row) -> Action:
        now = time.time()
        timestamp = int(now)
        headers = [*self.extra, (b"webhook-id", row.request_id.encode()),
                   (b"webhook-timestamp", str(timestamp).encode())]
        if self.key is not None:
            headers.append((b"webhook-signature", sign(self.key, row.request_id, timestamp, row.body).encode()))
        try:
            response = await asyncio.wait_for(self.client.post(row.body, headers), self.config.timeout)
            result = AttemptResult(response.status, response.excerpt.decode("utf-8", "replace") or None,
                                   parse_retry_after(response.retry_after, time.time()))
        except asyncio.TimeoutError:
            result = AttemptResult(None, f"timeout after {self.config.timeout:g}s", failure="timeout")
        except (OSError, EOFError, h11.ProtocolError) as exc:
            result = AttemptResult(None, f"connection: {exc!r}", failure="connection")
        return decide(row, result, time.time(), self.policy, self.rng)

    async def close(self) -> None:
        await self.client.close()
