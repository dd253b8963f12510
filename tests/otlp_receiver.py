"""An OTLP/HTTP traces receiver in the test process: a thread serving POST /v1/traces, decoding each
ExportTraceServiceRequest (opentelemetry-proto) into plain span dicts a test can look at."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.support import wait_for

TRACES_PATH = "/v1/traces"
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    return None if field is None else getattr(value, field)


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


def decode(body: bytes) -> list[dict[str, Any]]:
    """The spans of one export request, each with its resource's attributes."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append({
                    "name": span.name, "kind": KINDS[span.kind], "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                    "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                    "attributes": _attributes(span.attributes), "status": span.status.code,
                    "status_message": span.status.message, "resource": resource, "scope": scope_spans.scope.name,
                    "events": [{"name": event.name, "time": event.time_unix_nano,
                                "attributes": _attributes(event.attributes)} for event in span.events],
                })
    return spans


class OtlpReceiver:
    """Collects every span exported to http://127.0.0.1:<port>/v1/traces; `close()` stops it."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                spans = decode(body) if self.path == TRACES_PATH else []
                with receiver._lock:
                    receiver.requests += 1
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver.spans += spans
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == TRACES_PATH else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def span_of(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The span of the proxy's request `request_id` (its x-request-id) once exported; there must be one."""
        def found() -> list[dict[str, Any]]:
            with self._lock:
                return [s for s in self.spans if s["attributes"].get("llmproxy.request_id") == request_id]
        spans = wait_for(found, timeout=timeout)
        assert len(spans) == 1, spans
        return spans[0]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
