"""End-to-end: failover, active health thresholds, passive ejection and retries, with real processes.

Backends are mock-backend processes (killed with SIGKILL and restarted on the same port where a test
needs a dead or returning backend) and, where one backend alone must misbehave on every request (the
x-mock-* headers reach whichever backend the proxy picks), a tiny HTTP server inside the test.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import (
    CHAT,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    access_log,
    assert_idle,
    free_port,
    health,
    http_post,
    metric_value,
    mock_stats,
    owned,
    post_count,
    post_request,
    raw_connect,
    send_request,
    upstreams,
    wait_for,
)

CHAT_PATH = "/v1/chat/completions"
HEALTH_PATHS = {"vllm": "/health", "ollama": "/api/version"}
# Tests that are not about active health probe rarely, so mock stats hold few probe records.
QUIET_HEALTH = {"interval": 5, "timeout": 1, "models_interval": 60}


# Helpers ------------------------------------------------------------------------------------------

def _upstream(proxy: Proc, name: str) -> dict:
    return upstreams(proxy)[name]


def _healthy_metric(proxy: Proc, name: str) -> float:
    return metric_value(proxy, "llmproxy_backend_healthy", f'backend="{name}"')


def _retries(proxy: Proc, reason: str = "") -> float:
    return metric_value(proxy, "llmproxy_upstream_retries_total", f'reason="{reason}"' if reason else "")


def _ejections(proxy: Proc, name: str = "") -> float:
    return metric_value(proxy, "llmproxy_backend_ejections_total", f'backend="{name}"' if name else "")


def _reset(*mocks: Proc) -> None:
    for mock in mocks:
        assert http_post(mock.url + "/_mock/reset-stats")[0] == 200


def _request(port: int) -> tuple[ResponseReader, bytes, bool]:
    """A plain chat request on a fresh connection, its whole response read."""
    return send_request(port, CHAT, path=CHAT_PATH, timeout=10)


class _CountingReader(ResponseReader):
    """A ResponseReader that counts every byte the client received."""

    received = 0

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.received += len(data)
        self.buffer += data
        return True


def _stream(port: int, rid: str, headers: dict[str, str]) -> dict:
    """One streaming chat request; what the client saw, without raising."""
    result = {"id": rid, "status": 0, "received": 0, "complete": False, "done": False, "error": None}
    reader = None
    try:
        with raw_connect(port, timeout=20) as sock:
            sock.sendall(post_request(CHAT_PATH, STREAM_CHAT, {"x-request-id": rid, **headers}))
            reader = _CountingReader(sock)
            reader.read_head()
            result["status"] = reader.status
            body, result["complete"] = reader.read_body()
            result["done"] = b"data: [DONE]" in body
    except (OSError, EOFError, ValueError) as exc:
        result["error"] = repr(exc)
    if reader is not None:
        result["received"] = reader.received
    return result


def _wave(port: int, prefix: str, count: int, headers: dict[str, str]) -> tuple[ThreadPoolExecutor, list]:
    pool = ThreadPoolExecutor(max_workers=count)
    return pool, [pool.submit(_stream, port, f"{prefix}-{i}", headers) for i in range(count)]


class FakeBackend:
    """An in-test HTTP/1.1 server posing as a vLLM server: probes pass, every POST gets `status`.

    GET /health -> 200, GET /v1/models -> model "m"; POST anything -> `status` with `body` and `headers`.
    """

    def __init__(self, status: int, body: bytes = b'{"error": "fake backend says no"}',
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.posts = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._reply(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode())
                elif self.path == "/health":
                    self._reply(200, b"")
                else:
                    self._reply(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with owner._lock:
                    owner.posts += 1
                self._reply(owner.status, owner.body, owner.headers)

            def _reply(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # the proxy aborts connections whose answer it refuses: not an error here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def config(self, name: str) -> dict:
        return {"url": self.url, "name": name, "type": "vllm", "models": ["m"]}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def fakes():
    """In-test backends; all are closed at the end of the test."""
    yield from owned(FakeBackend.close)


def _fake(fakes: list, *args, **kwargs) -> FakeBackend:
    fake = FakeBackend(*args, **kwargs)
    fakes.append(fake)
    return fake


def _all_available(proxy: Proc, count: int, timeout: float = 5.0) -> None:
    wait_for(lambda: health(proxy)["available"] == count, timeout=timeout)


# 1. Failover under load ---------------------------------------------------------------------------

def test_killing_a_backend_under_load_loses_no_request_that_had_not_started_streaming(tmp_path, new_mock, new_proxy):
    mocks = [new_mock() for _ in range(3)]
    names = ["a", "b", "c"]
    interval, healthy_threshold = 0.2, 2
    proxy = new_proxy([{"url": m.url, "name": n} for m, n in zip(mocks, names, strict=True)],
                      routing={"load_balance": "round_robin"},
                      health_check={"interval": interval, "timeout": 0.5, "healthy_threshold": healthy_threshold,
                                    "unhealthy_threshold": 2, "models_interval": 60,
                                    # Only the probes find it dead: meanwhile new requests keep being routed to it.
                                    # (Recovery ending an ejection: test_a_restarted_backend_is_taken_back_*.)
                                    "passive": {"consecutive_failures": 1000}})
    _all_available(proxy, 3)
    victim, victim_name = mocks[1], "b"
    victim_port = victim.port
    knobs = {"x-mock-tokens": "20", "x-mock-delay-ms": "20"}

    pools = []
    try:
        pool0, wave0 = _wave(proxy.port, "w0", 200, knobs)
        pools.append(pool0)
        # Kill it while it is streaming: some of its responses are under way, others not yet started.
        wait_for(lambda: mock_stats(victim)["requests_running"] >= 5, timeout=10, interval=0.005)
        victim.stop(signal.SIGKILL)
        # New requests right away: the first are routed to the dead backend before anything noticed.
        pool1, wave1 = _wave(proxy.port, "w1", 200, knobs)
        pools.append(pool1)
        results = [f.result(timeout=60) for f in wave0 + wave1]
        pool2, wave2 = _wave(proxy.port, "w2", 200, knobs)
        pools.append(pool2)
        results += [f.result(timeout=60) for f in wave2]
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    ok = [r for r in results if r["status"] == 200 and r["complete"] and r["done"]]
    truncated = [r for r in results if r["status"] == 200 and not r["complete"] and r["received"] > 0]
    errors = [r for r in results if r not in ok and r not in truncated]
    by_id = wait_for(lambda: len(d := {line["client_request_id"]: line for line in access_log(tmp_path)
                                        if line.get("client_request_id")}) == 600 and d, timeout=5)
    assert not errors, f"{len(errors)} requests failed, e.g. {[(r, by_id[r['id']]) for r in errors[:3]]}"
    assert len(ok) + len(truncated) == 600
    # Only streams that were under way on the killed backend may be cut: they had received bytes, came
    # before the kill, and the proxy says they were on that backend, cut by it mid-stream.
    assert truncated, "the kill hit no stream: the test did not test failover mid-stream"
    assert all(r["id"].startswith("w0-") for r in truncated)
    for r in truncated:
        assert (by_id[r["id"]]["backend"], by_id[r["id"]]["termination"]) == (victim_name, "SD"), by_id[r["id"]]
    # Requests were sent to the dead backend (refused, or reset before any answer) and then served,
    # whole, by another.
    retried = [line for line in by_id.values() if line["retries"] > 0]
    assert retried and all(line["status"] == 200 and line["backend"] != victim_name for line in retried)
    ok_ids = {r["id"] for r in ok}
    assert all(line["client_request_id"] in ok_ids for line in retried)
    assert _retries(proxy) >= len(retried)
    assert _retries(proxy, "connect_error") >= 1  # the new requests routed to it before the probes noticed

    # The dead backend is out.
    wait_for(lambda: not _upstream(proxy, victim_name)["available"], timeout=3)
    state = _upstream(proxy, victim_name)
    assert not state["healthy"] and state["last_error"]
    assert _healthy_metric(proxy, victim_name) == 0
    assert _healthy_metric(proxy, "a") == _healthy_metric(proxy, "c") == 1
    assert health(proxy)["status"] == "ok"

    # Restarted on the same port, it is back within interval x healthy_threshold (plus slack)...
    revived = new_mock("vllm", "--listen", f"127.0.0.1:{victim_port}")
    assert revived.port == victim_port
    started = time.monotonic()
    wait_for(lambda: _upstream(proxy, victim_name)["available"], timeout=interval * healthy_threshold + 1.5)
    assert time.monotonic() - started <= interval * healthy_threshold + 1.5
    assert _healthy_metric(proxy, victim_name) == 1
    assert _upstream(proxy, victim_name)["ejected_for_s"] == 0
    # ...and gets its share of traffic again.
    with ThreadPoolExecutor(max_workers=10) as pool:
        again = list(pool.map(lambda i: _stream(proxy.port, f"again-{i}", {"x-mock-tokens": "3"}), range(30)))
    assert all(r["status"] == 200 and r["done"] for r in again), again
    assert post_count(revived) >= 5
    assert_idle(proxy)


# 2. Active health thresholds ----------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ["vllm", "ollama"])
def test_active_probes_take_a_backend_out_only_after_unhealthy_threshold_and_back_after_healthy_threshold(
        dialect, new_mock, new_proxy):
    target = new_mock(dialect)
    other = new_mock("vllm")
    interval = 0.3
    proxy = new_proxy([{"url": target.url, "name": "target"}, {"url": other.url, "name": "other"}],
                      routing={"load_balance": "round_robin"},
                      health_check={"interval": interval, "timeout": 0.5, "unhealthy_threshold": 3,
                                    "healthy_threshold": 2, "models_interval": 60, "passive": {"enabled": False}})
    _all_available(proxy, 2)
    assert _upstream(proxy, "target")["type"] == dialect
    probe_path = HEALTH_PATHS[dialect]

    def failed_probes() -> int:
        return sum(1 for r in mock_stats(target)["requests"] if r["path"] == probe_path and r["status"] == 503)

    _reset(target)
    assert http_post(target.url + "/_mock/health/503")[0] == 200
    failing_since = time.monotonic()
    # The first failed probe is seen (last_error) but one is not enough...
    state = wait_for(lambda: (s := _upstream(proxy, "target"))["last_error"] and s, timeout=interval + 1.0)
    assert "503" in state["last_error"]
    assert state["available"] and state["healthy"]
    time.sleep(max(0.0, failing_since + 0.35 - time.monotonic()))
    assert _upstream(proxy, "target")["available"], "out before unhealthy_threshold failed probes"
    # ...it takes three in a row: at least two intervals after the first, and by ~1.5 s.
    wait_for(lambda: not _upstream(proxy, "target")["available"], timeout=2.0, interval=0.01)
    elapsed = time.monotonic() - failing_since
    assert 2 * interval - 0.05 <= elapsed <= 2.0
    assert failed_probes() >= 3
    assert _healthy_metric(proxy, "target") == 0
    assert not _upstream(proxy, "target")["healthy"]
    assert health(proxy)["status"] == "ok"

    # While unhealthy it gets no traffic.
    _reset(target)
    for _ in range(10):
        reader, _, complete = _request(proxy.port)
        assert reader.status == 200 and complete
    assert post_count(target) == 0

    # Healthy again after healthy_threshold passing probes: the first pass (last_error cleared) is not enough.
    assert http_post(target.url + "/_mock/health/200")[0] == 200
    passing_since = time.monotonic()
    state = wait_for(lambda: (s := _upstream(proxy, "target"))["last_error"] is None and s,
                     timeout=interval + 1.0, interval=0.01)
    assert not state["available"] and not state["healthy"], "back after one passing probe"
    wait_for(lambda: _upstream(proxy, "target")["available"], timeout=2.0, interval=0.01)
    assert interval - 0.05 <= time.monotonic() - passing_since <= 2.0
    assert _healthy_metric(proxy, "target") == 1
    _reset(target)
    for _ in range(10):
        reader, _, complete = _request(proxy.port)
        assert reader.status == 200 and complete
    assert post_count(target) >= 4
    assert_idle(proxy)


# 3. Passive ejection ------------------------------------------------------------------------------

def test_a_backend_failing_every_request_is_ejected_for_base_ejection_time(fakes, new_mock, new_proxy):
    bad = _fake(fakes, 500)
    good = new_mock()
    base = 1.5
    proxy = new_proxy([bad.config("bad"), {"url": good.url, "name": "good"}],
                      routing={"load_balance": "round_robin"},
                      health_check={**QUIET_HEALTH, "passive": {"consecutive_failures": 3, "base_ejection_time": base,
                                                                "max_ejection_time": 60}})
    _all_available(proxy, 2)

    def until_ejected() -> tuple[list[int], float]:
        statuses = []
        while _ejections(proxy, "bad") == ejected_before:
            assert len(statuses) < 20, "never ejected"
            statuses.append(_request(proxy.port)[0].status)
        return statuses, time.monotonic()

    ejected_before = 0.0
    statuses, ejected_at = until_ejected()
    assert bad.posts == 3 and statuses.count(500) == 3  # 500 is not retried by default: the client sees it
    assert statuses.count(200) == len(statuses) - 3
    state = _upstream(proxy, "bad")
    assert not state["available"] and state["healthy"]
    assert base - 0.5 < state["ejected_for_s"] <= base
    assert _healthy_metric(proxy, "bad") == 0
    assert _ejections(proxy, "bad") == 1

    # While ejected, every request goes to the other backend.
    for _ in range(6):
        assert _request(proxy.port)[0].status == 200
    assert bad.posts == 3

    # Back after about base_ejection_time.
    wait_for(lambda: _upstream(proxy, "bad")["available"], timeout=base + 2)
    assert base - 0.3 <= time.monotonic() - ejected_at <= base + 1.0
    assert _healthy_metric(proxy, "bad") == 1

    # Failing again, it is ejected again, for twice as long.
    ejected_before = 1.0
    until_ejected()
    assert bad.posts == 6
    assert 2 * base - 0.5 < _upstream(proxy, "bad")["ejected_for_s"] <= 2 * base
    assert _ejections(proxy, "bad") == 2
    assert_idle(proxy)


def test_a_restarted_backend_is_taken_back_at_once_although_it_was_ejected(new_mock, new_proxy):
    mocks = [new_mock() for _ in range(2)]
    interval, healthy_threshold = 0.2, 2
    proxy = new_proxy([{"url": m.url, "name": f"m{i}"} for i, m in enumerate(mocks)],
                      routing={"load_balance": "round_robin"},
                      health_check={"interval": interval, "timeout": 0.5, "unhealthy_threshold": 2,
                                    "healthy_threshold": healthy_threshold, "models_interval": 60,
                                    "passive": {"consecutive_failures": 3, "base_ejection_time": 30}})
    _all_available(proxy, 2)
    port = mocks[1].port
    mocks[1].stop(signal.SIGKILL)
    for i in range(20):  # refused, retried on m0: every client gets its answer
        if _ejections(proxy, "m1"):
            break
        result = _stream(proxy.port, f"e{i}", {"x-mock-tokens": "3"})
        assert (result["status"], result["done"]) == (200, True), result
    assert _ejections(proxy, "m1") == 1
    assert _upstream(proxy, "m1")["ejected_for_s"] > 25
    wait_for(lambda: not _upstream(proxy, "m1")["healthy"], timeout=2)  # the probes saw it die too

    revived = new_mock("vllm", "--listen", f"127.0.0.1:{port}")
    started = time.monotonic()
    # Back after healthy_threshold probes, not after the 30 s ejection: it was restarted.
    wait_for(lambda: _upstream(proxy, "m1")["available"], timeout=interval * healthy_threshold + 1.5)
    assert time.monotonic() - started <= interval * healthy_threshold + 1.5
    assert _upstream(proxy, "m1")["ejected_for_s"] == 0
    assert _healthy_metric(proxy, "m1") == 1
    for i in range(6):
        assert _stream(proxy.port, f"back{i}", {"x-mock-tokens": "3"})["done"]
    assert post_count(revived) == 3
    assert_idle(proxy)


def test_max_ejection_percent_keeps_half_the_backends_even_when_all_fail(fakes, new_proxy):
    bad1, bad2 = _fake(fakes, 500), _fake(fakes, 500)
    proxy = new_proxy([bad1.config("bad1"), bad2.config("bad2")],
                      routing={"load_balance": "round_robin"},
                      health_check={**QUIET_HEALTH, "passive": {"consecutive_failures": 3, "base_ejection_time": 30,
                                                                "max_ejection_percent": 50}})
    _all_available(proxy, 2)
    for _ in range(16):
        assert _request(proxy.port)[0].status == 500
    assert _ejections(proxy) == 1
    states = {name: _upstream(proxy, name) for name in ("bad1", "bad2")}
    ejected = [name for name, s in states.items() if s["ejected_for_s"] > 0]
    assert len(ejected) == 1
    kept = "bad2" if ejected == ["bad1"] else "bad1"
    assert states[kept]["available"] and states[kept]["consecutive_failures"] >= 3
    assert _healthy_metric(proxy, kept) == 1 and _healthy_metric(proxy, ejected[0]) == 0
    assert bad1.posts + bad2.posts == 16
    assert_idle(proxy)


def test_when_every_backend_is_down_requests_are_still_tried(new_mock, new_proxy):
    mocks = [new_mock() for _ in range(2)]
    proxy = new_proxy([{"url": m.url, "name": f"m{i}"} for i, m in enumerate(mocks)],
                      health_check={"interval": 0.2, "timeout": 0.5, "unhealthy_threshold": 2,
                                    # Slow to take a backend back: the request below is tried all the same.
                                    "healthy_threshold": 100, "models_interval": 60})
    _all_available(proxy, 2)
    ports = [m.port for m in mocks]
    for mock in mocks:
        mock.stop(signal.SIGKILL)
    wait_for(lambda: health(proxy)["available"] == 0, timeout=3)
    assert health(proxy)["status"] == "degraded"

    for _ in range(3):
        reader, body, complete = _request(proxy.port)
        assert reader.status == 502, body  # the connect error, not a 503 "no backend available"
        assert json.loads(body)["error"]["code"] == "upstream_connect_failed"
    assert _retries(proxy, "connect_error") >= 3

    revived = new_mock("vllm", "--listen", f"127.0.0.1:{ports[0]}")
    assert revived.port == ports[0]
    reader, _, complete = _request(proxy.port)
    assert reader.status == 200 and complete
    assert health(proxy)["available"] == 0  # the probes have not taken it back yet: it was tried anyway
    assert post_count(revived) == 1
    assert_idle(proxy)


# 4. Retries ---------------------------------------------------------------------------------------

def _retry_proxy(new_proxy, fake: FakeBackend, good: Proc, **routing) -> Proc:
    proxy = new_proxy([fake.config("fake"), {"url": good.url, "name": "good"}],
                      routing={"load_balance": "round_robin", **routing},
                      health_check={**QUIET_HEALTH, "passive": {"enabled": False}})
    _all_available(proxy, 2)
    return proxy


def test_a_503_is_retried_on_another_backend_by_default(fakes, new_mock, new_proxy):
    fake = _fake(fakes, 503)
    good = new_mock()
    proxy = _retry_proxy(new_proxy, fake, good)
    for i in range(10):
        result = _stream(proxy.port, f"r{i}", {"x-mock-tokens": "5"})
        assert (result["status"], result["complete"], result["done"]) == (200, True, True), result
    assert fake.posts >= 4  # round robin sent it its share: every one of them was retried
    assert _retries(proxy, "503") == fake.posts
    assert _retries(proxy) == fake.posts
    assert post_count(good) == 10
    assert_idle(proxy)


def test_a_503_reaches_the_client_as_sent_when_retry_on_excludes_it(fakes, new_mock, new_proxy):
    fake = _fake(fakes, 503, b'{"error": "overloaded, from the fake"}', {"x-fake": "yes"})
    good = new_mock()
    proxy = _retry_proxy(new_proxy, fake, good, retry_on=["connect_error"])
    answers = [_request(proxy.port) for _ in range(6)]
    refused = [(reader, body) for reader, body, _ in answers if reader.status == 503]
    assert len(refused) == fake.posts >= 2
    for reader, body in refused:
        assert body == b'{"error": "overloaded, from the fake"}'
        assert reader.headers.get("x-fake") == "yes"
    assert all(reader.status == 200 for reader, _, _ in answers if reader.status != 503)
    assert _retries(proxy) == 0
    assert_idle(proxy)


@pytest.mark.parametrize("retry_429", [False, True])
def test_a_429_goes_back_with_retry_after_unless_429_is_in_retry_on(retry_429, fakes, new_mock, new_proxy):
    fake = _fake(fakes, 429, b'{"error": "slow down"}', {"Retry-After": "7"})
    good = new_mock()
    retry_on = ["connect_error", "reset", "502", "503"] + (["429"] if retry_429 else [])
    proxy = _retry_proxy(new_proxy, fake, good, retry_on=retry_on)
    answers = [_request(proxy.port) for _ in range(6)]
    assert fake.posts >= 2
    statuses = [reader.status for reader, _, _ in answers]
    if retry_429:
        assert statuses == [200] * 6
        assert _retries(proxy, "429") == fake.posts
    else:
        assert statuses.count(429) == fake.posts
        assert all(reader.headers.get("retry-after") == "7" and body == b'{"error": "slow down"}'
                   for reader, body, _ in answers if reader.status == 429)
        assert _retries(proxy) == 0
    assert_idle(proxy)


def test_retries_zero_means_no_retry(fakes, new_mock, new_proxy):
    fake = _fake(fakes, 503)
    good = new_mock()
    proxy = _retry_proxy(new_proxy, fake, good, retries=0)
    statuses = [_request(proxy.port)[0].status for _ in range(6)]
    assert fake.posts >= 2
    assert statuses.count(503) == fake.posts and statuses.count(200) == 6 - fake.posts
    assert post_count(good) == 6 - fake.posts
    assert _retries(proxy) == 0
    assert_idle(proxy)


def test_no_retry_once_bytes_reached_the_client(new_mock, new_proxy):
    mocks = [new_mock() for _ in range(2)]
    proxy = new_proxy([{"url": m.url, "name": f"m{i}"} for i, m in enumerate(mocks)],
                      routing={"load_balance": "round_robin"}, health_check=QUIET_HEALTH)
    _all_available(proxy, 2)
    for attempt in range(4):
        _reset(*mocks)
        # Events 50 ms apart: the first ones reach the client well before the reset comes.
        result = _stream(proxy.port, f"reset-{attempt}", {"x-mock-tokens": "50", "x-mock-delay-ms": "50",
                                                          "x-mock-reset-after-bytes": "600"})
        assert result["status"] == 200 and result["received"] > 0
        assert not result["complete"] and not result["done"], "the client must see the stream cut"
        assert sum(post_count(m) for m in mocks) == 1, "retried after bytes reached the client"
    assert _retries(proxy) == 0
    assert_idle(proxy)


# 5. Connect failures ------------------------------------------------------------------------------

def test_connect_failures_are_retried_on_another_backend_and_the_dead_one_is_ejected(new_mock, new_proxy):
    good = new_mock()
    dead_url = f"http://127.0.0.1:{free_port()}"
    dead = {"url": dead_url, "name": "dead", "type": "vllm", "models": ["m"]}
    proxy = new_proxy([dead, {"url": good.url, "name": "good"}],
                      routing={"load_balance": "round_robin"},
                      # No active probes: only live traffic can find out the port is closed.
                      health_check={"enabled": False, "models_interval": 60,
                                    "passive": {"consecutive_failures": 3, "base_ejection_time": 30}})
    assert _upstream(proxy, "dead")["available"]
    for i in range(12):
        result = _stream(proxy.port, f"c{i}", {"x-mock-tokens": "3"})
        assert (result["status"], result["done"]) == (200, True), result
    assert _retries(proxy, "connect_error") == 3  # the three tries that ejected it; none after
    assert _ejections(proxy, "dead") == 1
    state = _upstream(proxy, "dead")
    assert not state["available"] and state["ejected_for_s"] > 25
    assert _healthy_metric(proxy, "dead") == 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        burst = list(pool.map(lambda i: _stream(proxy.port, f"burst-{i}", {"x-mock-tokens": "3"}), range(24)))
    assert all(r["status"] == 200 and r["done"] for r in burst)
    assert _retries(proxy, "connect_error") == 3
    assert_idle(proxy)


class _ResetAtOnceServer:
    """A listener that accepts every connection and resets it at once (SO_LINGER 0): a backend dying
    just after the kernel completed the handshake, as a SIGKILLed server does to its accept backlog."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def test_a_connection_reset_right_after_connect_is_retried_not_answered_500(new_mock, new_proxy):
    resetting = _ResetAtOnceServer()
    try:
        good = new_mock()
        proxy = new_proxy([{"url": resetting.url, "name": "resetting", "type": "vllm", "models": ["m"]},
                                            {"url": good.url, "name": "good"}],
                          routing={"load_balance": "round_robin"},
                          health_check={"enabled": False, "models_interval": 60, "passive": {"enabled": False}})
        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(lambda i: _request(proxy.port)[0].status, range(300)))
        assert _retries(proxy) > 0
        assert statuses.count(200) == 300, {status: statuses.count(status) for status in set(statuses)}
        assert_idle(proxy)
    finally:
        resetting.close()
