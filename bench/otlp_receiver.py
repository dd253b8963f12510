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

import uvloop
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench import webhook_receiver
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


class ReceiverProtocol(webhook_receiver.ReceiverProtocol):
    """The webhook receiver's HTTP/1.1 server (keep-alive Content-Length POSTs, GET /stats as JSON), answering
    each POST as an OTLP collector does."""

    def answer(self, request_line: list[bytes], headers: dict[bytes, bytes], body: bytes) -> None:
        if request_line[0] != b"POST":
            super().answer(request_line, headers, body)  # GET /stats
            return
        assert self.transport is not None
        self.tally.add(body)
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(ANSWER), ANSWER))


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
