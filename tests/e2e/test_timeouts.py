"""Client-side and upstream timeouts and connection limits, with the real proxy process."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.support import (
    STREAM_CHAT,
    ResponseReader,
    assert_idle,
    post_request,
    raw_connect,
    recv_until_closed,
)


def _proxy(new_proxy, backend_url: str, **server) -> object:
    return new_proxy([{"url": backend_url}], server={"listen": "127.0.0.1:0", **server})


def test_trickled_head_is_cut_at_the_absolute_deadline(mock_vllm, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, timeouts={"request_head": "1s"})
    with raw_connect(proxy.port, timeout=10) as sock:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.send(bytes([byte]))  # one byte every 50 ms: progress never extends the deadline
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        answer = recv_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.9 < elapsed < 2.5


def test_idle_keepalive_connection_is_closed(mock_vllm, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, timeouts={"keepalive": "500ms"})
    with raw_connect(proxy.port, timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        ResponseReader(sock).read_head().read_body()
        time.sleep(0.3)  # a second request inside the idle window resets it
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        ResponseReader(sock).read_head().read_body()
        started = time.monotonic()
        assert recv_until_closed(sock) == b""
        assert 0.3 < time.monotonic() - started < 2.0


def test_stalled_request_body_gets_408(mock_vllm, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, timeouts={"body": "500ms"})
    with raw_connect(proxy.port, timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        started = time.monotonic()
        answer = recv_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3.0
    assert_idle(proxy)


def test_client_that_stops_reading_is_cut_after_the_write_timeout(mock_vllm, tmp_path, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, timeouts={"write": "1s"})
    sock = raw_connect(proxy.port, timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT, {"x-mock-tokens": "1000000"}))
    time.sleep(2.5)  # read nothing: the proxy pauses the backend, then gives up on us
    assert_idle(proxy)
    log = (tmp_path / "access.log").read_text()
    assert '"termination":"cD"' in log
    sock.close()


def test_connections_beyond_max_connections_are_refused_without_disturbing_others(mock_vllm, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, max_connections=2)
    first, second = raw_connect(proxy.port), raw_connect(proxy.port)
    time.sleep(0.2)
    third = raw_connect(proxy.port)
    assert recv_until_closed(third) == b"", "the connection over the limit is closed at once"
    for sock in (first, second):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ResponseReader(sock).read_head().status == 200
        sock.close()
    third.close()


@pytest.fixture
def blackhole_port():
    """A listening socket that never accepts, its queue already full: connecting to it hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    yield server.getsockname()[1]
    for sock in (*fillers, server):
        sock.close()


def test_connect_timeout_answers_504(blackhole_port, new_proxy):
    proxy = new_proxy([{"url": f"http://127.0.0.1:{blackhole_port}", "timeouts": {"connect": "500ms"}}])
    with raw_connect(proxy.port, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT))
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
    assert reader.status == 504
    assert json.loads(body)["error"]["code"] == "upstream_connect_timeout"
    assert time.monotonic() - started < 3.0
    assert_idle(proxy)


def test_a_slow_pipelined_head_does_not_cut_the_stream_before_it(mock_vllm, new_proxy):
    proxy = _proxy(new_proxy, mock_vllm.url, timeouts={"request_head": "1s"})
    with raw_connect(proxy.port, timeout=10) as sock:
        sock.sendall(post_request("/v1/chat/completions", STREAM_CHAT,
                                  {"x-mock-tokens": "15", "x-mock-delay-ms": "100"}))
        reader = ResponseReader(sock).read_head()
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request, pipelined, arrives slowly
        body, complete = reader.read_body()  # the stream lasts 1.5 s: longer than the head deadline
        assert complete and body.endswith(b"data: [DONE]\n\n")
        started = time.monotonic()
        rest = recv_until_closed(sock)
    assert (reader.buffer + rest).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 2.5  # its own deadline then applies
