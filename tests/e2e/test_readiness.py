"""Readiness and the SIGTERM sequence: /ready turns 503 at once, the proxy serves on for shutdown_delay, then
stops accepting and drains."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time

from tests.support import http_get, http_post, start_mock, start_proxy, wait_for


def ready(proxy) -> tuple[int, dict]:
    status, body = http_get(proxy.url + "/ready")
    return status, json.loads(body)


CHAT = json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_ready_follows_the_backends(tmp_path):
    mock = start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": mock.url, "name": "a"}],
                        health_check={"interval": "200ms", "timeout": "200ms", "unhealthy_threshold": 1,
                                      "healthy_threshold": 1})
    try:
        assert http_get(proxy.url + "/ready")[0] == 200
        http_post(mock.url + "/_mock/health/503")  # the backend says it cannot serve
        wait_for(lambda: ready(proxy)[0] == 503, timeout=5)
        assert ready(proxy)[1] == {"status": "not_ready", "reason": "no backend available", "available": 0}
        assert http_get(proxy.url + "/health")[0] == 200  # liveness: the proxy itself is fine
        http_post(mock.url + "/_mock/health/200")
        wait_for(lambda: http_get(proxy.url + "/ready")[0] == 200, timeout=5)
    finally:
        proxy.stop()
        mock.stop()


def test_sigterm_turns_ready_503_first_serves_through_the_delay_then_stops_accepting(tmp_path):
    mock = start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": mock.url, "name": "a"}],
                        server={"listen": "127.0.0.1:0", "shutdown_delay": "1500ms"})
    try:
        proxy.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: ready(proxy)[0] == 503, timeout=1)
        assert ready(proxy)[1]["reason"] == "shutting down"
        assert time.monotonic() - signalled < 1.0
        assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200  # new connections still served
        wait_for(lambda: proxy.popen.poll() is not None, timeout=10)
        assert proxy.popen.returncode == 0
        assert time.monotonic() - signalled >= 1.5, "the listener stayed open for shutdown_delay"
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.settimeout(1)
            assert sock.connect_ex(("127.0.0.1", proxy.port)) != 0
    finally:
        proxy.stop()
        mock.stop()
