"""End-to-end: the real proxy process relaying real mock backends of each dialect."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.fixtures.record import SPECS
from tests.support import (
    FIXTURE_FILES,
    FIXTURES,
    STREAM_CHAT,
    ResponseReader,
    assert_idle,
    free_port,
    http_post,
    metric_value,
    mock_stats,
    post_request,
    raw_connect,
    recv_until_closed,
    rss_kib,
    sha256,
    start_proxy,
    wait_for,
)

# Asking for usage ourselves means the proxy strips no event: what the backend sends is what we get.
CHAT_WITH_USAGE = json.dumps({**json.loads(STREAM_CHAT), "stream_options": {"include_usage": True}}).encode()


pytestmark = pytest.mark.usefixtures("proxy_idle_after")  # `proxy`: tests/e2e/conftest.py


def _fixture_dialect(name: str) -> str:
    return json.loads((FIXTURES / name).with_suffix(".json").read_text())["backend"]


def test_recorded_fixtures_are_present():
    # every stream the recorder makes, so a missing one fails here instead of silently not being relayed
    missing = {spec.name + spec.ext for spec in SPECS} - set(FIXTURE_FILES)
    assert not missing, f"recorded streams missing from {FIXTURES}: {sorted(missing)}"


@pytest.mark.parametrize("fixture", FIXTURE_FILES)
def test_fixture_bytes_reach_the_client_exactly(fixture, mock_vllm, mock_tgi, mock_ollama, new_mock, new_proxy):
    dialect = _fixture_dialect(fixture)
    # the llama.cpp and SGLang recordings are replayed by a mock of their own dialect, started for the test
    mock = {"vllm": mock_vllm, "tgi": mock_tgi, "ollama": mock_ollama}.get(dialect) or new_mock(dialect)
    proxy = new_proxy([{"url": mock.url}])
    expected = (FIXTURES / fixture).read_bytes()
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", CHAT_WITH_USAGE, {"x-mock-fixture": fixture}))
        reader = ResponseReader(sock).read_head()
        body, complete = reader.read_body()
    assert reader.status == 200
    assert complete
    assert sha256(body) == sha256(expected)
    # ...and it is what the backend says it sent.
    sent = wait_for(lambda: [r for r in mock_stats(mock)["requests"]
                             if r.get("response_body_sha256") == sha256(expected)])
    assert sent


def test_no_buffering_event_two_is_sent_only_after_client_holds_event_one(proxy, mock_vllm):
    gate = f"gate-{time.monotonic_ns()}"
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", CHAT_WITH_USAGE, {"x-mock-gate": gate, "x-mock-tokens": "3"}))
        reader = ResponseReader(sock).read_head()
        seen = []
        # Each event must reach us while the backend is still blocked on the gate for the next one:
        # had the proxy buffered anything, read_chunk would hang (socket timeout) and fail the test.
        while True:
            chunk = reader.read_chunk()
            assert chunk is not None, "stream truncated"
            if chunk == b"":
                break
            seen.append(chunk)
            http_post(f"{mock_vllm.url}/_mock/release/{gate}")
    events = b"".join(seen).split(b"\n\n")
    assert events[-2] == b"data: [DONE]"
    assert len([e for e in events if e.startswith(b"data: {")]) >= 3


def test_client_disconnect_mid_stream_closes_upstream_within_one_second(proxy, mock_vllm):
    before = mock_stats(mock_vllm)["client_disconnects_midstream"]
    sock = raw_connect(proxy.port)
    sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "1000", "x-mock-delay-ms": "50"}))
    reader = ResponseReader(sock).read_head()
    assert reader.read_chunk()
    sock.close()
    closed_at = time.monotonic()
    stats = wait_for(lambda: (s := mock_stats(mock_vllm))["client_disconnects_midstream"] > before and s,
                     timeout=1.0)
    assert stats["last_disconnect_monotonic"] - closed_at < 1.0


def test_client_disconnect_during_a_long_prefill_closes_upstream_within_one_second(proxy, mock_vllm):
    marker = f"prefill-{time.monotonic_ns()}"
    sock = raw_connect(proxy.port)
    sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                              {"x-mock-first-byte-delay-ms": "30000", "x-marker": marker}))
    wait_for(lambda: [r for r in mock_stats(mock_vllm)["requests"] if ["x-marker", marker] in r["headers"]])
    sock.close()  # the backend has sent nothing yet: only the client's EOF can tell the proxy
    closed_at = time.monotonic()
    record = wait_for(lambda: [r for r in mock_stats(mock_vllm)["requests"]
                               if ["x-marker", marker] in r["headers"] and r["outcome"] == "client_disconnect"],
                      timeout=1.0)
    assert record
    assert mock_stats(mock_vllm)["last_disconnect_monotonic"] - closed_at < 1.0


def test_backend_reset_mid_stream_reaches_client_as_truncation(proxy):
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": "50", "x-mock-reset-after-bytes": "600"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        body, complete = reader.read_body()
    assert not complete, "a reset backend must not look like a clean end of stream"
    assert body.startswith(b"data: ")
    assert b"[DONE]" not in body


def test_slow_client_keeps_proxy_memory_bounded(proxy):
    rss_before = rss_kib(proxy.pid)
    sock = raw_connect(proxy.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    # ~200 MB offered: 1M events of ~200 bytes, sent as fast as the backend can.
    sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "1000000"}))
    time.sleep(3.0)  # the backend pushes as hard as it can while we read nothing
    growth_mib = (rss_kib(proxy.pid) - rss_before) / 1024
    reader = ResponseReader(sock).read_head()
    assert reader.status == 200 and reader.read_chunk(), "the backend must really be streaming"
    sock.close()
    assert growth_mib < 50, f"proxy RSS grew {growth_mib:.1f} MiB while the client did not read"


def test_openai_sdk_streaming_and_plain_chat(proxy):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    stream = client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    completion = client.completions.create(model="m", prompt="Once upon", max_tokens=5)
    assert completion.choices[0].text
    embedding = client.embeddings.create(model="m", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[0].embedding
    models = client.models.list()
    assert models.data


def test_openai_sdk_error_shape_when_no_backend_answers(new_proxy):
    openai = pytest.importorskip("openai")
    dead_port = free_port()
    proxy = new_proxy([{"url": f"http://127.0.0.1:{dead_port}"}])
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    assert raised.value.body["type"] == "api_error"
    assert raised.value.body["code"] == "upstream_connect_failed"
    assert raised.value.request_id


@pytest.mark.parametrize(("dialect", "path", "body"), [
    ("tgi", "/generate_stream", {"inputs": "What is AI?", "parameters": {"max_new_tokens": 5, "details": True}}),
    ("ollama", "/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}),
    ("ollama", "/api/generate", {"model": "llama3.2", "prompt": "hi"}),
])
def test_native_streaming_paths_are_relayed(dialect, path, body, mock_tgi, mock_ollama, new_proxy):
    mock = {"tgi": mock_tgi, "ollama": mock_ollama}[dialect]
    proxy = new_proxy([{"url": mock.url}])
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request(path, json.dumps(body).encode()))
        reader = ResponseReader(sock).read_head()
        streamed, complete = reader.read_body()
    assert reader.status == 200 and complete
    last = streamed.strip().splitlines()[-1]
    assert b'"details"' in last or b'"done":true' in last


def test_upstream_connections_are_reused_and_metrics_count_requests(proxy):
    before = metric_value(proxy, "llmproxy_requests_total", 'backend="vllm",status="200"')
    with raw_connect(proxy.port) as sock:
        for _ in range(5):
            sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "2"}))
            reader = ResponseReader(sock).read_head()
            _, complete = reader.read_body()
            assert complete
            sock_buffer_left = reader.buffer
            assert sock_buffer_left == b""
    assert metric_value(proxy, "llmproxy_requests_total", 'backend="vllm",status="200"') == before + 5
    assert metric_value(proxy, "llmproxy_upstream_connections_idle") >= 1


def test_close_delimited_backend_body_is_rechunked_for_the_client(proxy):
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-close-delimited": "1", "x-mock-tokens": "4"}))
        reader = ResponseReader(sock).read_head()
        assert reader.headers.get("transfer-encoding") == "chunked"
        body, complete = reader.read_body()
    assert complete and body.endswith(b"data: [DONE]\n\n")


def test_http10_client_gets_a_close_delimited_stream(proxy):
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "3"}, version="1.0"))
        raw = recv_until_closed(sock)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert body.endswith(b"data: [DONE]\n\n")


def test_pipelined_requests_are_answered_in_order(proxy):
    with raw_connect(proxy.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post_request("/v1/chat/completions", STREAM_CHAT)
                     + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(sock)
        statuses = []
        for _ in range(3):
            reader.read_head()
            _body, complete = reader.read_body()
            assert complete
            statuses.append((reader.status, reader.headers.get("content-type", "")))
    assert [s for s, _ in statuses] == [200, 200, 200]
    assert statuses[1][1].startswith("text/event-stream")


def test_expect_100_continue_is_honoured(proxy):
    with raw_connect(proxy.port) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(STREAM_CHAT)}\r\n"
                "Expect: 100-continue\r\n\r\n").encode()
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(STREAM_CHAT)
        reader = ResponseReader(sock).read_head()
        _, complete = reader.read_body()
    assert reader.status == 200 and complete


def test_first_byte_timeout_answers_504(mock_vllm, new_proxy):
    proxy = new_proxy([{"url": mock_vllm.url, "timeouts": {"first_byte": "300ms"}}])
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-first-byte-delay-ms": "3000"}))
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
    assert reader.status == 504
    assert json.loads(body)["error"]["code"] == "upstream_first_byte_timeout"
    assert_idle(proxy)


def test_stream_idle_timeout_truncates(mock_vllm, tmp_path, procs):
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url}],
                        server={"listen": "127.0.0.1:0", "timeouts": {"stream_idle": "400ms"}})
    procs.append(proxy)
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-stall-after": "2"}))
        reader = ResponseReader(sock).read_head()
        _body, complete = reader.read_body()
    assert reader.status == 200 and not complete
    assert_idle(proxy)
    log = (tmp_path / "access.log").read_text()
    assert '"termination":"sD"' in log


def test_backend_error_status_is_passed_through(proxy):
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-status": "503", "x-mock-retry-after": "2"}))
        reader = ResponseReader(sock).read_head()
        _body, complete = reader.read_body()
    assert reader.status == 503 and complete
    assert reader.headers["retry-after"] == "2"
