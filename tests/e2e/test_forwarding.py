"""What the backend receives: its own Host and key, never the client's credentials or hop-by-hop headers."""

from __future__ import annotations

import pytest

from tests.support import (
    CHAT,
    ResponseReader,
    mock_stats,
    post_request,
    raw_connect,
    start_proxy,
    wait_for,
)


def _last_request_headers(mock, marker: str) -> dict[str, list[str]]:
    def find():
        for entry in reversed(mock_stats(mock)["requests"]):
            headers = {}
            for name, value in entry["headers"]:
                headers.setdefault(name, []).append(value)
            if headers.get("x-marker") == [marker]:
                return headers
        return None
    return wait_for(find)


def _send(proxy, headers: dict[str, str]) -> ResponseReader:
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/v1/chat/completions", CHAT, headers))
        reader = ResponseReader(sock).read_head()
        reader.read_body()
    return reader


@pytest.fixture(scope="module")
def proxy(mock_vllm, tmp_path_factory):
    proc = start_proxy(tmp_path_factory.mktemp("fwd"), [{"url": mock_vllm.url, "api_key": "backend-secret"}],
                       server={"listen": "127.0.0.1:0", "trusted_proxies": ["10.0.0.0/8"]})
    yield proc
    proc.stop()


def test_client_credentials_and_hop_by_hop_headers_are_not_forwarded(proxy, mock_vllm):
    reader = _send(proxy, {
        "x-marker": "creds", "Authorization": "Bearer client-key", "X-API-Key": "client-key",
        "Connection": "keep-alive, X-Private", "X-Private": "drop-me", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc", "TE": "trailers", "X-Custom": "kept",
    })
    assert reader.status == 200
    headers = _last_request_headers(mock_vllm, "creds")
    assert headers["authorization"] == ["Bearer backend-secret"]
    assert "x-api-key" not in headers
    for hop in ("connection", "keep-alive", "proxy-authorization", "te", "x-private", "transfer-encoding"):
        assert hop not in headers, hop
    assert headers["x-custom"] == ["kept"]
    assert headers["host"] == [mock_vllm.url.removeprefix("http://")]
    assert headers["content-length"] == [str(len(CHAT))]


def test_request_id_is_kept_when_valid_and_generated_otherwise(proxy, mock_vllm):
    reader = _send(proxy, {"x-marker": "rid1", "X-Request-Id": "client-id-123"})
    assert _last_request_headers(mock_vllm, "rid1")["x-request-id"] == ["client-id-123"]
    assert reader.headers["x-request-id"] == "client-id-123"
    reader = _send(proxy, {"x-marker": "rid2", "X-Request-Id": "bad id with spaces"})
    generated = _last_request_headers(mock_vllm, "rid2")["x-request-id"]
    assert generated != ["bad id with spaces"] and len(generated[0]) >= 16
    reader = _send(proxy, {"x-marker": "rid3", "X-Request-Id": "x" * 129})
    assert _last_request_headers(mock_vllm, "rid3")["x-request-id"] != ["x" * 129]
    first = _last_request_headers(mock_vllm, "rid2")["x-request-id"]
    _send(proxy, {"x-marker": "rid4"})
    assert _last_request_headers(mock_vllm, "rid4")["x-request-id"] != first


def test_forwarded_for_from_untrusted_peer_is_replaced(proxy, mock_vllm):
    _send(proxy, {"x-marker": "xff", "X-Forwarded-For": "1.2.3.4"})
    assert _last_request_headers(mock_vllm, "xff")["x-forwarded-for"] == ["127.0.0.1"]


def test_forwarded_for_from_trusted_peer_is_appended(mock_vllm, tmp_path, procs):
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url}],
                        server={"listen": "127.0.0.1:0", "trusted_proxies": ["127.0.0.1"]})
    procs.append(proxy)
    _send(proxy, {"x-marker": "xff-trusted", "X-Forwarded-For": "1.2.3.4"})
    assert _last_request_headers(mock_vllm, "xff-trusted")["x-forwarded-for"] == ["1.2.3.4, 127.0.0.1"]


def test_backend_base_path_is_prefixed(mock_vllm, new_proxy):
    proxy = new_proxy([{"url": mock_vllm.url + "/prefix"}])
    _send(proxy, {"x-marker": "base"})
    entry = wait_for(lambda: [e for e in mock_stats(mock_vllm)["requests"]
                              if ["x-marker", "base"] in e["headers"]])
    assert entry[-1]["path"] == "/prefix/v1/chat/completions"
