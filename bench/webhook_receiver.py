"""A webhook receiver for bench.features: counts the signed usage records the proxy delivers.

    python -m bench.webhook_receiver SECRET      (started by bench.features as a pinned child)

It answers 204 to every POST, checks each Standard Webhooks signature, counts distinct webhook-ids, and
answers GET /stats with the tally as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

from bench.harness import HOST
from bench.procs import Service


def signature_ok(key: bytes, headers: dict[bytes, bytes], body: bytes) -> bool:
    """Whether a Standard Webhooks v1 signature of `body` under `key` is among the webhook-signature values."""
    signed = headers.get(b"webhook-id", b"") + b"." + headers.get(b"webhook-timestamp", b"") + b"." + body
    expected = b"v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    return any(hmac.compare_digest(candidate, expected)
               for candidate in headers.get(b"webhook-signature", b"").split())


@dataclass
class Tally:
    """What the receiver got: every POST, the distinct webhook-ids, and what was wrong with any of them."""

    key: bytes
    posts: int = 0
    ids: set[bytes] = field(default_factory=set)
    duplicates: int = 0
    bad_signatures: int = 0
    unparsable: int = 0
    usage_source: Counter[str] = field(default_factory=Counter)

    def add(self, headers: dict[bytes, bytes], body: bytes) -> None:
        self.posts += 1
        webhook_id = headers.get(b"webhook-id", b"")
        if webhook_id in self.ids:
            self.duplicates += 1  # a redelivery (at-least-once): deduplicated on webhook-id, as consumers do
        self.ids.add(webhook_id)
        if not signature_ok(self.key, headers, body):
            self.bad_signatures += 1
        try:
            self.usage_source[str(orjson.loads(body).get("usage_source"))] += 1
        except (orjson.JSONDecodeError, AttributeError):
            self.unparsable += 1

    def as_dict(self) -> dict[str, Any]:
        return {"posts": self.posts, "records": len(self.ids), "duplicates": self.duplicates,
                "bad_signatures": self.bad_signatures, "unparsable": self.unparsable,
                "usage_source": dict(self.usage_source)}


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server: 204 to every POST (counted), the tally as JSON to GET /stats.

    It only parses what the proxy's webhook client sends: Content-Length bodies, no chunked requests.
    """

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            headers = {name.strip().lower(): value.strip()
                       for name, _, value in (line.partition(b":") for line in lines[1:])}
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self.answer(lines[0].split(b" ")[:2], headers, body)

    def answer(self, request_line: list[bytes], headers: dict[bytes, bytes], body: bytes) -> None:
        assert self.transport is not None
        if request_line[0] == b"POST":
            self.tally.add(headers, body)
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            return
        stats = orjson.dumps(self.tally.as_dict())
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(stats) + stats)
        self.transport.close()


async def serve_receiver(secret: str) -> None:
    tally = Tally(base64.b64decode(secret.removeprefix("whsec_")))
    server = await asyncio.get_running_loop().create_server(lambda: ReceiverProtocol(tally), HOST, 0)
    print(f"webhook receiver listening on http://{HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


class WebhookReceiver(Service):
    """This module run as the receiver child; it prints the `listening on` banner Service waits for."""

    def __init__(self, secret: str, cpu: int | None) -> None:
        super().__init__("webhook-receiver", [], cpu)
        self.argv = [sys.executable, "-m", "bench.webhook_receiver", secret]


if __name__ == "__main__":
    uvloop.run(serve_receiver(sys.argv[1]))
