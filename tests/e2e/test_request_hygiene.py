"""What never reaches a backend, and what is never kept: the proxy's own header namespace, protocol
upgrades, and a connection that sends nothing."""

from __future__ import annotations

import json
import time

import pytest

from tests.support import ResponseReader, mock_stats, post_request, raw_connect, start_mock, start_proxy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mock = start_mock("vllm")
    proxy = start_proxy(tmp_path_factory.mktemp("hygiene"), [{"url": mock.url, "name": "vllm", "type": "vllm"}],
                        server={"listen": "127.0.0.1:0", "timeouts": {"request_head": "1s"}})
    yield proxy, mock
    proxy.stop()
    mock.stop()


def test_client_headers_in_the_proxys_namespace_are_not_forwarded(setup):
    proxy, mock = setup
    body = json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct", "messages": []}).encode()
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", body, {
            "X-Request-Id": "hygiene-1", "X-LLMProxy-Key-Id": "forged", "x-llmproxy-cost": "0",
            "X-Real-IP": "10.9.9.9", "Forwarded": "for=10.9.9.9", "X-Kept": "yes"}))
        assert ResponseReader(sock).read_head().status == 200
    [seen] = [r for r in mock_stats(mock)["requests"] if ["x-request-id", "hygiene-1"] in r["headers"]]
    names = [name for name, _ in seen["headers"]]
    assert not [n for n in names if n.startswith("x-llmproxy")]
    assert "x-real-ip" not in names and "forwarded" not in names  # claims of an untrusted client
    assert ["x-kept", "yes"] in seen["headers"]


@pytest.mark.parametrize("upgrade", ["websocket", "foo/2"])
def test_a_protocol_upgrade_gets_501_and_reaches_no_backend(setup, upgrade: str):
    proxy, mock = setup
    before = mock_stats(mock)["requests_total"]
    with raw_connect(proxy.port) as sock:
        sock.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: %b\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                     % upgrade.encode())
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
    assert reader.status == 501 and json.loads(body)["error"]["code"] == "upgrade_not_supported"
    assert mock_stats(mock)["requests_total"] == before


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(setup):
    proxy, _ = setup
    started = time.monotonic()
    with raw_connect(proxy.port, timeout=10) as sock:
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            received += data
    waited = time.monotonic() - started
    assert 0.9 <= waited < 5, f"closed after {waited:.2f}s"  # request_head is 1 s here, keep-alive 75 s
    assert received == b""  # not a byte of a request: nothing to answer
