"""Behaviours found by review: each test names what must hold, and failed before its fix."""

from __future__ import annotations

import json

from tests.support import (
    STREAM_CHAT,
    ResponseReader,
    post_request,
    raw_connect,
    send_request,
    usage_records,
    wait_for,
)


def test_recording_failures_never_strand_the_connection(mock_vllm, tmp_path, metered_proxy):
    proxy = metered_proxy([{"url": mock_vllm.url}])
    deep = "[" * 600 + "]" * 600  # deep enough to break a recursive walk of the request
    body = ('{"model": "m", "input": ' + deep + "}").encode()
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/completions", body, {"x-mock-status": "400"}))
        reader = ResponseReader(sock).read_head()
        reader.read_body()
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "2"}))
        second = ResponseReader(sock)
        second.buffer = reader.buffer
        second.read_head()
        _, complete = second.read_body()
    assert complete, "the connection goes on after the first request"
    wait_for(lambda: len(usage_records(tmp_path)) == 2, timeout=5)


def test_clients_cannot_dodge_metering_with_odd_bodies(mock_vllm, tmp_path, metered_proxy):
    proxy = metered_proxy([{"url": mock_vllm.url}])
    ids = []
    for body in (b"\n  " + STREAM_CHAT, json.dumps({"model": "m", "stream": 1, "messages": [{"role": "user",
                                                                                      "content": "hi"}]}).encode()):
        reader, data, complete = send_request(proxy.port, body, {"x-mock-tokens": "5"})
        assert complete and b"data: [DONE]" in data
        ids.append(reader.headers["x-request-id"])
    records = wait_for(lambda: [r for r in usage_records(tmp_path) if r["request_id"] in ids] if len(
        [r for r in usage_records(tmp_path) if r["request_id"] in ids]) == 2 else None, timeout=5)
    for record in records:
        assert record["completion_tokens"] == 5 and record["prompt_tokens"] > 0, record
        assert record["is_stream"] is True


def test_reused_client_request_ids_still_give_distinct_usage_records(mock_vllm, tmp_path, metered_proxy):
    proxy = metered_proxy([{"url": mock_vllm.url}])
    for _ in range(2):
        reader, _, _ = send_request(proxy.port, STREAM_CHAT, {"X-Request-Id": "same-id", "x-mock-tokens": "2"})
        assert reader.headers["x-request-id"] == "same-id"  # the client's id is still echoed
    records = wait_for(lambda: len(usage_records(tmp_path)) == 2 and usage_records(tmp_path), timeout=5)
    assert len({r["request_id"] for r in records}) == 2
    assert {r["client_request_id"] for r in records} == {"same-id"}
