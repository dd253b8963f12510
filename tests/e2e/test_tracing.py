"""End-to-end: OpenTelemetry spans of the real proxy, received by an in-process OTLP/HTTP receiver.

A streamed, an aborted and a refused request each export one span in the GenAI semantic conventions; the
client's traceparent is the span's parent and the backend gets the proxy span's; sampling at 0 keeps only
traces a client asked to keep; with tracing off a client's traceparent reaches the backend unchanged.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.support import (
    STREAM_CHAT,
    ResponseReader,
    http_post,
    mock_stats,
    post_request,
    raw_connect,
    send_request,
    wait_for,
)

API_KEY = "sk-tracing-test-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CLIENT_TRACE = os.urandom(16).hex()
CLIENT_SPAN = os.urandom(8).hex()


def traceparent(trace_id: str = CLIENT_TRACE, span_id: str = CLIENT_SPAN, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@pytest.fixture
def receiver():
    otlp = OtlpReceiver()
    yield otlp
    otlp.close()


def tracing(receiver: OtlpReceiver, **options: object) -> dict:
    return {"enabled": True, "endpoint": receiver.endpoint, "export_interval": "50ms", "service_name": "llmproxy-test",
            "headers": {"x-collector-token": "t0ken"}, **options}


def upstream_headers(mock, request_id: str) -> dict[str, str]:
    """The headers of the request the mock got for the proxy's request `request_id`."""
    def found() -> list[dict[str, str]]:
        return [dict(r["headers"]) for r in mock_stats(mock)["requests"]
                if ("x-request-id", request_id) in [tuple(h) for h in r["headers"]]]
    requests = wait_for(found)
    assert len(requests) == 1
    return requests[0]


def test_streamed_aborted_and_refused_requests_each_export_one_genai_span(receiver, new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url, "name": "vllm-a"}], tracing=tracing(receiver),
                      auth={"enabled": True, "keys": [{"key": API_KEY}]})

    # Streamed, with the client's trace: the proxy span is its child, and the backend's parent.
    reader, body, complete = send_request(proxy.port, STREAM_CHAT, {**AUTH, "traceparent": traceparent(),
                                                                    "tracestate": "vendor=abc"})
    assert reader.status == 200 and complete and body.endswith(b"data: [DONE]\n\n")
    request_id = reader.headers["x-request-id"]
    span = receiver.span_of(request_id)
    attributes = span["attributes"]
    assert span["name"] == "chat m" and span["kind"] == "CLIENT" and span["status"] == 0
    assert span["trace_id"] == CLIENT_TRACE and span["parent_span_id"] == CLIENT_SPAN
    assert span["resource"]["service.name"] == "llmproxy-test" and span["scope"] == "llmproxy"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["gen_ai.response.model"] == "m"  # as the mock's usage chunk names it
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["llmproxy.usage_source"] == "reported"
    assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", mock.port)
    assert attributes["llmproxy.backend"] == "vllm-a" and attributes["http.response.status_code"] == 200
    assert attributes["llmproxy.termination"] == "--" and "error.type" not in attributes
    [event] = span["events"]
    assert event["name"] == "first_token" and span["start"] < event["time"] < span["end"]
    ttft = event["attributes"]["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft == attributes["gen_ai.response.time_to_first_chunk"]
    upstream = upstream_headers(mock, request_id)
    assert upstream["traceparent"] == f"00-{CLIENT_TRACE}-{span['span_id']}-01"
    assert upstream["tracestate"] == "vendor=abc"  # passed on unchanged
    assert receiver.headers[0]["x-collector-token"] == "t0ken"

    # Aborted: the client leaves after the first event, while the backend waits at its gate.
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {**AUTH, "x-mock-gate": "never"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and reader.read_chunk()
    span = receiver.span_of(reader.headers["x-request-id"])
    attributes = span["attributes"]
    assert attributes["error.type"] == "client_closed" and attributes["llmproxy.termination"] == "CD"
    assert span["status"] == 2 and span["parent_span_id"] == ""  # ERROR; a trace of its own: no client trace
    assert attributes["gen_ai.usage.output_tokens"] >= 0 and attributes["llmproxy.usage_source"] == "estimated"
    assert [event["name"] for event in span["events"]] == ["first_token"]

    # Refused: no key. A span all the same, with its error, and nothing sent upstream.
    posts_before = len(mock_stats(mock)["requests"])
    reader, body, _ = send_request(proxy.port, STREAM_CHAT, {"traceparent": traceparent()})
    assert reader.status == 401
    span = receiver.span_of(reader.headers["x-request-id"])
    attributes = span["attributes"]
    assert attributes["error.type"] == "invalid_api_key" and attributes["http.response.status_code"] == 401
    assert span["status"] == 2 and span["trace_id"] == CLIENT_TRACE and span["name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert "server.address" not in attributes and "llmproxy.backend" not in attributes and not span["events"]
    assert len(mock_stats(mock)["requests"]) == posts_before
    assert len(receiver.spans) == 3  # nothing else was traced (the proxy's own probes are no generations)


def test_sample_ratio_zero_traces_only_what_the_client_asked_to_keep(receiver, new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url}], tracing=tracing(receiver, sample_ratio=0))
    untraced, _, _ = send_request(proxy.port, STREAM_CHAT)
    unsampled, _, _ = send_request(proxy.port, STREAM_CHAT, {"traceparent": traceparent(sampled=False)})
    kept, _, _ = send_request(proxy.port, STREAM_CHAT, {"traceparent": traceparent()})
    assert untraced.status == unsampled.status == kept.status == 200

    assert "traceparent" not in upstream_headers(mock, untraced.headers["x-request-id"])  # no trace to continue
    # The client's unsampled trace goes on, unsampled, from a span of the proxy's that records nothing.
    passed = upstream_headers(mock, unsampled.headers["x-request-id"])["traceparent"]
    assert passed.startswith(f"00-{CLIENT_TRACE}-") and passed.endswith("-00") and CLIENT_SPAN not in passed
    assert proxy.stop(signal.SIGTERM) == 0  # the drain flushes the exporter: every span is out
    assert [span["attributes"]["llmproxy.request_id"] for span in receiver.spans] == [kept.headers["x-request-id"]]


def test_tracing_off_passes_the_clients_traceparent_unchanged(new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url}])
    status, body = http_post(proxy.url + "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 200, body
    reader, _, _ = send_request(proxy.port, STREAM_CHAT, {"traceparent": traceparent(), "tracestate": "k=v"})
    upstream = upstream_headers(mock, reader.headers["x-request-id"])
    assert upstream["traceparent"] == traceparent() and upstream["tracestate"] == "k=v"


def test_each_worker_exports_its_own_spans(receiver, new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url}], server={"listen": "127.0.0.1:0", "workers": 2}, tracing=tracing(receiver))
    request_ids = []

    def two_workers_seen() -> bool:  # new connections, spread over the workers by SO_REUSEPORT
        reader, _, _ = send_request(proxy.port, STREAM_CHAT)
        assert reader.status == 200
        request_ids.append(reader.headers["x-request-id"])
        return len({span["resource"]["process.pid"] for span in receiver.spans}) == 2
    wait_for(two_workers_seen, timeout=20.0, interval=0.05)
    assert proxy.stop(signal.SIGTERM) == 0
    assert sorted(span["attributes"]["llmproxy.request_id"] for span in receiver.spans) == sorted(request_ids)
