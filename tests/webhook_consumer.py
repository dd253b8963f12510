"""A webhook consumer for tests: an h11 server on 127.0.0.1 that verifies Standard Webhooks signatures.

It shares no code with llmproxy.delivery: the verification below is an independent implementation of
the spec (https://www.standardwebhooks.com/), so a signing bug cannot hide behind a matching one.
Answers are scripted (`script` is consumed first, then the first `fail_each` requests of every webhook-id
get `fail_status`, then `default_status`); `down()` closes the listener and every open connection, `up()`
listens again on the same port. `peak_concurrency` is the most requests it was answering at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import h11

TOLERANCE = 300  # seconds of clock skew accepted on webhook-timestamp, as the reference libraries do


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """True when `headers` carry a valid v1 signature of `body` for `secret` and a fresh timestamp."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        return False
    try:
        timestamp = int(stamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode("utf-8")
    signed = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in signatures.split(" "):  # several signatures during a secret rotation
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


@dataclass
class Received:
    at: float  # time.monotonic() when the request was complete
    webhook_id: str | None
    headers: dict[str, str]
    body: bytes
    status: int  # what the consumer answered
    signature_ok: bool | None  # None when the consumer has no secret

    @property
    def record(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class WebhookConsumer:
    def __init__(self, secret: str | None = None, path: str = "/usage") -> None:
        self.secret = secret
        self.path = path
        self.port = 0
        self.script: list[Answer] = []
        self.default_status = 200
        self.fail_each = 0  # answer fail_status to this many requests of each webhook-id before the others
        self.fail_status = 500
        self.delay = 0.0  # seconds before answering (a slow consumer)
        self.received: list[Received] = []
        self.concurrency = 0  # requests being answered now
        self.peak_concurrency = 0
        self._seen: Counter[str | None] = Counter()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.new_request = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def delivered_ids(self) -> set[str | None]:
        return {r.webhook_id for r in self.received if 200 <= r.status < 300}

    async def up(self) -> WebhookConsumer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        """Wait until predicate() holds, re-checked after each request; bounded by `timeout`."""
        async def until() -> None:
            while not predicate():
                self.new_request.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.new_request.wait(), 0.05)
        await asyncio.wait_for(until(), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                answer = await self._answer(request, body)
                headers = [("content-length", str(len(answer.body))), *answer.headers]
                writer.write(conn.send(h11.Response(status_code=answer.status, headers=headers))
                             + conn.send(h11.Data(data=answer.body)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[Any, bytes]:
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _answer(self, request: h11.Request, body: bytes) -> Answer:
        self.concurrency += 1
        self.peak_concurrency = max(self.peak_concurrency, self.concurrency)
        try:
            return await self._answer_one(request, body)
        finally:
            self.concurrency -= 1

    async def _answer_one(self, request: h11.Request, body: bytes) -> Answer:
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        if self.delay:
            await asyncio.sleep(self.delay)
        webhook_id = headers.get("webhook-id")
        self._seen[webhook_id] += 1
        if self.script:
            answer = self.script.pop(0)
        elif self._seen[webhook_id] <= self.fail_each:
            answer = Answer(self.fail_status)
        else:
            answer = Answer(self.default_status)
        signature_ok = None if self.secret is None else verify_standard_webhook(self.secret, headers, body)
        if signature_ok is False or request.target.decode() != self.path:
            answer = Answer(401 if signature_ok is False else 404, body=b"bad signature or path")
        self.received.append(Received(time.monotonic(), webhook_id, headers, body, answer.status, signature_ok))
        self.new_request.set()
        return answer
