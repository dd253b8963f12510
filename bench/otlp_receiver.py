"""An OTLP/HTTP traces receiver for bench.tracing: counts the spans the proxies export.

    python -m bench.otlp_receiver      (started by bench.tracing as a pinned child)

It answers every POST /v1/traces with an empty ExportTraceServiceResponse, decodes each request with
opentelemetry-proto (a dependency of the OTLP exporter, so installed with the otel extra), counts spans and
export requests by service.name, and answers GET /stats with the tally as JSON.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any

import orjson
import uvloop
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.harness import HOST
from bench.procs import Service

TRACES_PATH = b"/v1/traces"
ANSWER = ExportTraceServiceResponse().SerializeToString()


class Tally:
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()  # by the exporting proxy's service.name
        self.exports: Counter[str] = Counter()
        self.unparsable = 0

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception:  # protobuf's DecodeError: counted, never fatal
            self.unparsable += 1
            return
        for resource_spans in request.resource_spans:
            service = next((item.value.string_value for item in resource_spans.resource.attributes
                            if item.key == "service.name"), "")
            self.exports[service] += 1
            self.spans[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)

    def as_dict(self) -> dict[str, Any]:
        return {"spans": dict(self.spans), "exports": dict(self.exports), "unparsable": self.unparsable}


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server for the exporter's Content-Length POSTs, and GET /stats."""

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
            self.answer(lines[0].split(b" ")[:2], body)

    def answer(self, request_line: list[bytes], body: bytes) -> None:
        assert self.transport is not None
        if request_line[0] == b"POST":
            self.tally.add(body)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (len(ANSWER), ANSWER))
            return
        stats = orjson.dumps(self.tally.as_dict())
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(stats) + stats)
        self.transport.close()


async def serve_receiver() -> None:
    tally = Tally()
    server = await asyncio.get_running_loop().create_server(lambda: ReceiverProtocol(tally), HOST, 0)
    print(f"otlp receiver listening on http://{HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


class OtlpReceiver(Service):
    """This module run as the receiver child; it prints the `listening on` banner Service waits for."""

    def __init__(self, cpu: int | None) -> None:
        super().__init__("otlp-receiver", [], cpu)
        self.argv = [sys.executable, "-m", "bench.otlp_receiver"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}{TRACES_PATH.decode()}"


if __name__ == "__main__":
    uvloop.run(serve_receiver())
