"""Usage metering end to end: the real proxy, mock backends of each dialect, records via the file reporter."""

from __future__ import annotations

import json
import time

import pytest

from llmproxy.mockbackend import TEMPLATES, prompt_tokens
from tests.support import (
    ResponseReader,
    assert_idle,
    http_post,
    metric_value,
    post_request,
    raw_connect,
    send_request,
    usage_record,
    usage_records,
)

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _events(data: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in data.decode().split("\n\n") if e.startswith("data: {")]


@pytest.fixture
def proxy_for(metered_proxy, mock_vllm, mock_tgi, mock_ollama):
    mocks = {"vllm": mock_vllm, "tgi": mock_tgi, "ollama": mock_ollama}

    def start(dialect: str, **extra):
        return metered_proxy([{"url": mocks[dialect].url, **extra.pop("backend", {})}], **extra)
    return start


@pytest.mark.parametrize("dialect", ["vllm", "tgi", "ollama"])
def test_stream_without_stream_options_is_metered_and_the_client_sees_no_usage_event(dialect, proxy_for, tmp_path):
    proxy = proxy_for(dialect)
    reader, data, complete = send_request(proxy.port, {"model": "m", "stream": True, "messages": MESSAGES},
                                          {"x-mock-tokens": "7"})
    assert complete and reader.status == 200
    events = _events(data)
    assert events and all(event["choices"] for event in events), "no usage-only event may reach this client"
    assert not any(event.get("usage") for event in events)
    assert data.endswith(b"data: [DONE]\n\n")
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    assert record["usage_source"] == "reported"
    assert record["completion_tokens"] == 7
    assert record["prompt_tokens"] > 0
    assert record["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"]
    assert record["is_stream"] is True and record["endpoint"] == "/v1/chat/completions"
    assert record["status"] == 200 and record["termination"] == "--"
    assert_idle(proxy)


def test_client_that_asked_for_usage_gets_the_usage_event(proxy_for, tmp_path):
    proxy = proxy_for("vllm")
    reader, data, complete = send_request(proxy.port, {
        "model": "m", "stream": True, "messages": MESSAGES, "stream_options": {"include_usage": True}},
        {"x-mock-tokens": "5"})
    assert complete
    usage_events = [e for e in _events(data) if e["choices"] == [] and e.get("usage")]
    assert len(usage_events) == 1 and usage_events[0]["usage"]["completion_tokens"] == 5
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    assert record["usage_source"] == "reported" and record["completion_tokens"] == 5


def test_injection_can_be_switched_off_per_backend(proxy_for, tmp_path):
    proxy = proxy_for("vllm", backend={"inject_usage": False})
    reader, data, _ = send_request(proxy.port, {"model": "m", "stream": True, "messages": MESSAGES},
                                   {"x-mock-tokens": "4"})
    assert not any(e.get("usage") for e in _events(data))
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    # The backend was not asked, so it reported nothing: its tokenizer counted the prompt afterwards.
    assert record["usage_source"] == "tokenized"
    assert record["prompt_tokens"] == prompt_tokens({"messages": MESSAGES}, TEMPLATES["vllm"])
    assert record["completion_tokens"] == 4  # one per content delta relayed


def test_client_disconnect_before_the_usage_event_still_gives_one_counted_record(proxy_for, tmp_path, mock_vllm):
    proxy = proxy_for("vllm")
    gate = f"gate-{time.monotonic_ns()}"
    sock = raw_connect(proxy.port)
    sock.sendall(post_request("/v1/chat/completions", json.dumps(
        {"model": "m", "stream": True, "messages": MESSAGES}).encode(), {"x-mock-gate": gate, "x-mock-tokens": "3"}))
    reader = ResponseReader(sock).read_head()
    content = []
    while len(content) < 3:  # read every content delta, releasing the next event each time
        chunk = reader.read_chunk()
        assert chunk
        content += [e for e in _events(chunk) if e["choices"] and e["choices"][0]["delta"].get("content")]
        if len(content) < 3:
            http_post(f"{mock_vllm.url}/_mock/release/{gate}")
    sock.close()  # before the usage event: the backend never gets to report
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    assert record["usage_source"] == "tokenized"  # the backend's tokenizer counted the prompt afterwards
    assert record["completion_tokens"] == 3
    assert record["prompt_tokens"] == prompt_tokens({"messages": MESSAGES}, TEMPLATES["vllm"])
    assert record["termination"] == "CD"
    time.sleep(0.5)
    assert len([r for r in usage_records(tmp_path) if r["request_id"] == reader.headers["x-request-id"]]) == 1
    assert_idle(proxy)


@pytest.mark.parametrize(("dialect", "path", "body", "expected_completion"), [
    ("ollama", "/api/chat", {"model": "llama3.2", "messages": MESSAGES}, 6),
    ("ollama", "/api/generate", {"model": "llama3.2", "prompt": "hi"}, 6),
    ("tgi", "/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 6, "details": True}}, 6),
    ("vllm", "/v1/completions", {"model": "m", "prompt": "Once upon", "stream": True}, 6),
])
def test_native_and_completion_streams_are_metered(dialect, path, body, expected_completion, proxy_for, tmp_path):
    proxy = proxy_for(dialect)
    reader, _, complete = send_request(proxy.port, body, {"x-mock-tokens": "6"}, path=path)
    assert complete
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    assert record["usage_source"] == "reported"
    assert record["completion_tokens"] == expected_completion


def test_non_streaming_response_usage_and_cost(proxy_for, tmp_path):
    proxy = proxy_for("vllm", pricing={"priced-model": {"input_per_million": 2.0, "output_per_million": 6.0}})
    reader, data, complete = send_request(proxy.port, {"model": "priced-model", "messages": MESSAGES},
                                          {"x-mock-tokens": "9"})
    assert complete
    reply = json.loads(data)
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    assert record["usage_source"] == "reported" and record["is_stream"] is False
    assert record["prompt_tokens"] == reply["usage"]["prompt_tokens"]
    assert record["completion_tokens"] == 9
    expected = (reply["usage"]["prompt_tokens"] * 2.0 + 9 * 6.0) / 1_000_000
    assert record["cost_usd"] == pytest.approx(expected)
    assert metric_value(proxy, "llmproxy_estimated_cost_usd_total", 'model="priced-model"') == pytest.approx(expected)
    assert metric_value(proxy, "llmproxy_usage_tokens_total", 'model="priced-model",type="completion"') == 9


def test_record_has_every_field(proxy_for, tmp_path):
    proxy = proxy_for("vllm")
    reader, _, _ = send_request(proxy.port, {"model": "m", "stream": True, "messages": MESSAGES})
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    for key in ("request_id", "user_id", "key_id", "model", "prompt_tokens", "completion_tokens", "total_tokens",
                "is_stream", "timestamp", "backend", "endpoint", "status", "termination", "usage_source", "ttft_ms",
                "duration_ms"):
        assert key in record, key
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]
    assert record["model"] == "m" and record["backend"]
    assert record["ttft_ms"] > 0 and record["duration_ms"] >= record["ttft_ms"]
