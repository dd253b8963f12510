"""Rate limits and budgets end to end: real proxies, a real mock backend and, for the shared store, a real Redis.

Every refusal is checked twice: the answer (429 with Retry-After and the OpenAI error shape) and the backend,
which must not have received the refused request. Every admission is checked to be given back: after any
ending of a stream, the key can again open exactly its number of concurrent streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import itertools
import json
import math
import re
import select
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.support import (
    CHAT,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    assert_idle,
    free_port,
    http_get,
    http_post,
    metric_value,
    mock_stats,
    post_request,
    raw_connect,
    start_proxy,
    usage_config,
    usage_record,
    usage_records,
    wait_for,
)

PATH = "/v1/chat/completions"
HOLD_STREAM = json.dumps({"model": "priced-model", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
# Probes off, models given, no passive ejection: after start-up the mock sees nothing but the tests' requests,
# so its request counter is the number of requests the proxy forwarded.
QUIET = {"enabled": False, "passive": {"enabled": False}}


def make_key(name: str) -> str:
    return f"sk-test-ratelimit-{name}-0123456789"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> dict:
        return json.loads(self.body)["error"]


def call(port: int, key: str | None, body: bytes = CHAT, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> Reply:
    """One request on its own connection; the whole response is read."""
    extra = {"Authorization": f"Bearer {key}"} if key else {}
    with raw_connect(port, timeout=timeout) as sock:
        sock.sendall(post_request(PATH, body, {**extra, **(headers or {})}))
        reader = ResponseReader(sock).read_head()
        content, _ = reader.read_body()
    return Reply(reader.status, reader.headers, content)


class Client:
    """A keep-alive connection to one proxy, reopened only when the proxy says it closes."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.sock = None

    def call(self, body: bytes = CHAT, headers: dict[str, str] | None = None) -> Reply:
        if self.sock is None:
            self.sock = raw_connect(self.port, timeout=10)
        self.sock.sendall(post_request(PATH, body, {"Authorization": f"Bearer {self.key}", **(headers or {})}))
        reader = ResponseReader(self.sock).read_head()
        content, complete = reader.read_body()
        assert complete
        if reader.headers.get("connection") == "close":
            self.close()
        return Reply(reader.status, reader.headers, content)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def posts(mock: Proc) -> int:
    """Requests the mock received (with QUIET health checks, only what the proxies forwarded)."""
    return mock_stats(mock)["requests_total"]


def held(proxy: Proc) -> int:
    return json.loads(http_get(proxy.url + "/health")[1])["ratelimit"]["admissions_held"]


def backend(mock: Proc, **extra) -> dict:
    return {"url": mock.url, "type": "vllm", "models": ["m"], **extra}


def launch(tmp: Path, procs: list, backends: list[dict], keys: dict[str, dict | None], *,
           usage: bool = False, **rate_limit) -> Proc:
    """A proxy with auth on, these keys (key -> its own limits) and rate limiting on with `rate_limit`."""
    tmp.mkdir(parents=True, exist_ok=True)
    sections: dict = {"health_check": QUIET}
    if usage:
        sections["usage"] = usage_config(tmp)
    for name in ("server", "routing"):
        if name in rate_limit:
            sections[name] = rate_limit.pop(name)
    key_list = [{"key": k, "user_id": f"user-{i}", **({"rate_limit": v} if v else {})}
                for i, (k, v) in enumerate(keys.items())]
    proxy = start_proxy(tmp, backends, auth={"enabled": True, "keys": key_list},
                        rate_limit={"enabled": True, **rate_limit}, **sections)
    procs.append(proxy)
    return proxy


def assert_refused(reply: Reply, kind: str = "requests", code: str = "rate_limit_exceeded") -> None:
    assert reply.status == 429, (reply.status, reply.body)
    assert reply.error["type"] == kind and reply.error["code"] == code, reply.error
    assert int(reply.headers["retry-after"]) >= 1


def seconds(text: str) -> float:
    """An x-ratelimit-reset-* value ("20ms", "1.5s", "6m0s") in seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?(?:e[+-]?\d+)?)s)?|(\d+)ms", text)
    assert match and text, f"not a reset duration: {text!r}"
    if match.group(3) is not None:
        return int(match.group(3)) / 1000
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server):
    redis_server.flushall()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def store(request) -> dict:
    """The rate_limit settings of either store (a fresh, empty Redis database for "redis")."""
    if request.param == "memory":
        return {"store": "memory"}
    return {"store": "redis", "redis_url": request.getfixturevalue("redis_url")}


# 1. Request rate across parallel connections and proxies -------------------------------------------------


def wave(ports: list[int], key: str, count: int) -> list[Reply]:
    """`count` requests at once, each on its own connection, spread over the proxies."""
    barrier = threading.Barrier(count)

    def one(i: int) -> Reply:
        barrier.wait(timeout=10)
        return call(ports[i % len(ports)], key)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def hammer(ports: list[int], key: str, threads: int, duration: float) -> tuple[list[Reply], float]:
    """`threads` keep-alive clients sending back to back to the proxies for `duration` seconds.

    Returns the replies and the wall time from just before the first request to after the last answer.
    """
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]
    replies: list[Reply] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        clients = [Client(port, key) for port in ports]
        mine: list[Reply] = []
        try:
            barrier.wait(timeout=10)
            n = i
            while time.monotonic() < deadline[0]:
                mine.append(clients[n % len(clients)].call())
                n += 1
        except BaseException as error:  # reported below: a thread must not fail silently
            failures.append(error)
        finally:
            for client in clients:
                client.close()
            with lock:
                replies.extend(mine)

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    started = time.monotonic()
    deadline[0] = started + duration
    barrier.wait(timeout=10)
    for thread in workers:
        thread.join(duration + 20)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in workers)
    assert not failures, failures
    return replies, elapsed


def check_request_limit(replies: list[Reply], elapsed: float, burst: int, per_minute: float) -> int:
    """Every reply is 200 or a proper 429; admissions stay within the GCRA bound. Returns the admitted count."""
    statuses = Counter(r.status for r in replies)
    assert set(statuses) <= {200, 429}, statuses
    for reply in replies:
        if reply.status == 429:
            assert_refused(reply, "requests")
            assert "(requests)" in reply.error["message"]
    admitted = statuses[200]
    assert admitted <= burst + per_minute / 60 * elapsed + 1, (admitted, elapsed)
    # Not refusing too much either: the load never paused, so every refill was taken.
    assert admitted >= burst + math.floor(per_minute / 60 * (elapsed - 1.5)), (admitted, elapsed)
    assert statuses[429] > admitted
    return admitted


WAVE, SUSTAINED = make_key("wave"), make_key("sustained")
REQUEST_KEYS = {WAVE: {"requests_per_minute": 1, "burst": 10},  # no refill during a wave: exactly the burst
                SUSTAINED: {"requests_per_minute": 60, "burst": 10}}


def test_request_rate_is_shared_by_two_proxies_on_one_redis(tmp_path, procs, redis_url, new_mock):
    mock = new_mock()
    proxies = [launch(tmp_path / f"p{i}", procs, [backend(mock)], REQUEST_KEYS, store="redis", redis_url=redis_url)
               for i in (1, 2)]
    ports = [p.port for p in proxies]
    before = posts(mock)

    replies = wave(ports, WAVE, 50)
    assert Counter(r.status for r in replies) == {200: 10, 429: 40}  # one allowance for both proxies
    for reply in replies:
        if reply.status == 429:
            assert_refused(reply, "requests")
    assert posts(mock) == before + 10

    before = posts(mock)
    replies, elapsed = hammer(ports, SUSTAINED, threads=50, duration=3.0)
    admitted = check_request_limit(replies, elapsed, burst=10, per_minute=60)
    assert posts(mock) == before + admitted  # the refused ones never reached the backend
    for proxy in proxies:
        assert_idle(proxy)
        assert held(proxy) == 0


def test_request_rate_with_the_memory_store(tmp_path, procs, new_mock):
    mock = new_mock()
    proxy = launch(tmp_path, procs, [backend(mock)], REQUEST_KEYS, store="memory")
    before = posts(mock)

    replies = wave([proxy.port], WAVE, 50)
    assert Counter(r.status for r in replies) == {200: 10, 429: 40}
    assert posts(mock) == before + 10

    before = posts(mock)
    replies, elapsed = hammer([proxy.port], SUSTAINED, threads=50, duration=3.0)
    admitted = check_request_limit(replies, elapsed, burst=10, per_minute=60)
    assert posts(mock) == before + admitted
    assert_idle(proxy)


# 2. Concurrency slots come back whatever the ending ------------------------------------------------------

MAX_CONCURRENT = 4
CONCURRENT = make_key("concurrent")
# Knobs of each ending; the "fast" backend has short timeouts, so its timeouts end streams quickly.
ENDINGS = {
    "complete": {"x-mock-tokens": "5"},
    "client_gone_midstream": {"x-mock-tokens": "200", "x-mock-delay-ms": "5"},
    "client_gone_before_first_byte": {"x-mock-first-byte-delay-ms": "150"},
    "backend_reset": {"x-mock-tokens": "200", "x-mock-reset-after-bytes": "300"},
    "first_byte_timeout": {"x-mock-first-byte-delay-ms": "1500"},
    "stream_idle_timeout": {"x-mock-tokens": "50", "x-mock-stall-after": "2"},
}
# The access log's termination code of each ending once admitted (HAProxy-style: who, then in which phase).
TERMINATIONS = {"--", "CD", "CH", "SD", "sH", "sD", "PR"}


def end_one_stream(port: int, ending: str) -> Reply | None:
    """Run one stream to the given ending. Returns the 429 if it was refused, else None."""
    with raw_connect(port, timeout=10) as sock:
        sock.sendall(post_request(PATH, STREAM_CHAT, {"Authorization": f"Bearer {CONCURRENT}", **ENDINGS[ending]}))
        reader = ResponseReader(sock)
        if ending == "client_gone_before_first_byte":
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                return None  # admitted, waiting for the backend: leave now
        reader.read_head()
        if reader.status == 429:
            body, _ = reader.read_body()
            return Reply(429, reader.headers, body)
        if ending == "client_gone_before_first_byte":
            raise AssertionError(f"a response came before the backend's first byte: {reader.status}")
        if ending == "first_byte_timeout":
            body, _ = reader.read_body()
            assert reader.status == 504 and json.loads(body)["error"]["code"] == "upstream_first_byte_timeout"
            return None
        assert reader.status == 200
        if ending == "client_gone_midstream":
            assert reader.read_chunk()
            return None  # leave mid-stream
        body, complete = reader.read_body()
        assert complete == (ending == "complete"), (ending, body[-200:])
        if ending == "complete":
            assert body.endswith(b"data: [DONE]\n\n")
    return None


def open_held_streams(port: int, gate: str, count: int) -> list[tuple]:
    """`count` streams that are admitted and then wait on the mock's gate after their first event."""
    opened: list[tuple] = []
    try:
        for _ in range(count):
            sock = raw_connect(port, timeout=10)
            reader = ResponseReader(sock)
            opened.append((sock, reader))
            sock.sendall(post_request(PATH, HOLD_STREAM, {"Authorization": f"Bearer {CONCURRENT}",
                                                          "x-mock-gate": gate, "x-mock-tokens": "3"}))
            assert reader.read_head().status == 200, reader.status
            assert reader.read_chunk()
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    return opened


def assert_exactly_n_concurrent(proxy: Proc, mock: Proc, gate: str) -> None:
    streams = open_held_streams(proxy.port, gate, MAX_CONCURRENT)
    try:
        before = posts(mock)
        refused = call(proxy.port, CONCURRENT, STREAM_CHAT)
        assert_refused(refused, "requests")
        assert "concurrency" in refused.error["message"]
        assert posts(mock) == before
    finally:
        for _ in range(MAX_CONCURRENT * 8):
            http_post(f"{mock.url}/_mock/release/{gate}")
        for sock, reader in streams:
            with sock:
                body, complete = reader.read_body()
                assert complete and body.endswith(b"data: [DONE]\n\n")


def lease_count(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return client.zcard(f"llmproxy:cc:key:{key_id(CONCURRENT)}")
    finally:
        client.close()


def test_concurrency_slots_are_given_back_after_every_kind_of_ending(tmp_path, procs, store, new_mock):
    mock = new_mock()
    fast = backend(mock, name="fast", timeouts={"first_byte": "200ms", "stream_idle": "200ms"})
    hold = backend(mock, name="hold", models=["priced-model"])
    proxy = launch(tmp_path, procs, [fast, hold], {CONCURRENT: {"max_concurrent": MAX_CONCURRENT}},
                   routing={"retries": 0}, **store)
    kinds = list(ENDINGS)
    refusals: list[Reply] = []
    lock = threading.Lock()

    def run(i: int) -> str:
        ending = kinds[i % len(kinds)]
        for _ in range(300):  # those over the limit are refused: try again until admitted
            refused = end_one_stream(proxy.port, ending)
            if refused is None:
                return ending
            with lock:
                refusals.append(refused)
            time.sleep(0.02)
        raise AssertionError(f"{ending} was never admitted")

    with ThreadPoolExecutor(3 * MAX_CONCURRENT) as pool:
        done = Counter(pool.map(run, range(300)))
    assert done == {ending: 50 for ending in kinds}
    assert refusals, "the load never went over the limit"
    for refused in refusals:
        assert_refused(refused, "requests")
        assert "concurrency" in refused.error["message"]

    wait_for(lambda: held(proxy) == 0, timeout=10)
    assert_idle(proxy)
    if store["store"] == "redis":
        wait_for(lambda: lease_count(store["redis_url"]) == 0, timeout=5)
    log_lines = (tmp_path / "access.log").read_text().splitlines()
    terminations = Counter(json.loads(line)["termination"] for line in log_lines)
    assert set(terminations) >= TERMINATIONS, terminations  # every ending really happened

    assert_exactly_n_concurrent(proxy, mock, "round-1")
    wait_for(lambda: held(proxy) == 0, timeout=5)
    if store["store"] == "redis":
        wait_for(lambda: lease_count(store["redis_url"]) == 0, timeout=5)
    assert_exactly_n_concurrent(proxy, mock, "round-2")  # and again once they finished
    wait_for(lambda: held(proxy) == 0, timeout=5)
    assert_idle(proxy)


# 3. Token limits are charged from metered usage -------------------------------------------------------------

TOKENS = make_key("tokens")


def test_reported_usage_over_tokens_per_minute_refuses_the_next_request(tmp_path, procs, store, new_mock):
    mock = new_mock()
    proxy = launch(tmp_path, procs, [backend(mock)], {TOKENS: {"tokens_per_minute": 50}}, usage=True, **store)
    first = call(proxy.port, TOKENS, headers={"x-mock-tokens": "60"})
    assert first.status == 200
    record = usage_record(tmp_path, first.headers["x-request-id"])
    used = record["prompt_tokens"] + record["completion_tokens"]
    assert record["usage_source"] == "reported" and record["completion_tokens"] == 60 and used > 50

    before = posts(mock)
    refused = call(proxy.port, TOKENS)
    assert_refused(refused, "tokens")
    assert refused.headers["x-ratelimit-limit-tokens"] == "50"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # The bucket is `used - 50` tokens below zero, refilled at 50 a minute: full again after `used` tokens' time.
    assert abs(seconds(refused.headers["x-ratelimit-reset-tokens"]) - 60 * used / 50) <= 2
    assert abs(int(refused.headers["retry-after"]) - 60 * (used - 50) / 50) <= 2
    assert posts(mock) == before
    assert_idle(proxy)


def drop_bound(capacity: int, elapsed: float) -> int:
    """The most a bucket of `capacity` a minute refills in `elapsed` seconds, plus rounding of the headers."""
    return math.ceil(capacity / 60 * elapsed) + 1


def test_estimated_usage_of_a_disconnected_stream_is_charged(tmp_path, procs, store, new_mock):
    mock = new_mock()
    capacity = 1200  # 20 tokens a second of refill, against a charge of some 600
    proxy = launch(tmp_path, procs, [backend(mock)], {TOKENS: {"tokens_per_minute": capacity}}, usage=True, **store)
    prompt = "word " * 600
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}).encode()
    gate = "disconnect"
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request(PATH, body, {"Authorization": f"Bearer {TOKENS}", "x-mock-gate": gate,
                                               "x-mock-tokens": "50"}))
        reader = ResponseReader(sock).read_head()
        started = time.monotonic()
        assert reader.status == 200
        before = int(reader.headers["x-ratelimit-remaining-tokens"])
        assert reader.headers["x-ratelimit-limit-tokens"] == str(capacity)
        content = 0
        while content < 3:  # three content events, then leave before the usage event
            chunk = reader.read_chunk()
            assert chunk
            content += chunk.count(b'"content":" tok')
            if content < 3:
                http_post(f"{mock.url}/_mock/release/{gate}")
    record = usage_record(tmp_path, reader.headers["x-request-id"])
    # No usage arrived: vLLM's tokenizer counted the prompt after the request, and that is what is charged.
    assert record["usage_source"] == "tokenized" and record["termination"] == "CD"
    charged = record["prompt_tokens"] + record["completion_tokens"]
    assert charged >= 600

    after_reply = call(proxy.port, TOKENS, headers={"x-mock-tokens": "1"})
    elapsed = time.monotonic() - started
    assert after_reply.status == 200
    after = int(after_reply.headers["x-ratelimit-remaining-tokens"])
    assert charged - drop_bound(capacity, elapsed) <= before - after <= charged + 1, (before, after, charged, elapsed)
    assert_idle(proxy)


class Answers503(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts = 0

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.command == "POST":
            type(self).posts += 1
        body = b'{"error": {"message": "overloaded", "type": "server_error"}}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the proxy closing its pooled connections at the end is no error


@contextlib.contextmanager
def backend_answering_503():
    handler = type("Handler", (Answers503,), {"posts": 0})
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("failing", ["closed_port", "answers_503"])
def test_a_request_that_failed_over_is_charged_once(tmp_path, procs, failing, new_mock):
    mock = new_mock()
    capacity = 1200
    with contextlib.ExitStack() as stack:
        if failing == "closed_port":
            bad_url, bad_server = f"http://127.0.0.1:{free_port()}", None
        else:
            bad_url, bad_server = stack.enter_context(backend_answering_503())
        backends = [{"url": bad_url, "name": "bad", "type": "vllm", "models": ["m"]}, backend(mock, name="good")]
        proxy = launch(tmp_path, procs, backends, {TOKENS: {"tokens_per_minute": capacity}}, usage=True,
                       store="memory", routing={"load_balance": "round_robin", "retries": 1, "retry_backoff": "1ms"})
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * 400}]}).encode()
        replies, times = [], []
        for _ in range(5):
            replies.append(call(proxy.port, TOKENS, body, {"x-mock-tokens": "40"}))
            times.append(time.monotonic())
        assert all(r.status == 200 for r in replies), [r.body for r in replies]
        access = {}
        for line in (tmp_path / "access.log").read_text().splitlines():
            entry = json.loads(line)
            access[entry["request_id"]] = entry
        failed_over = [i for i, r in enumerate(replies[:-1]) if access[r.headers["x-request-id"]]["retries"] == 1]
        assert failed_over, "no request was tried on the failing backend first"
        if bad_server is not None:
            assert bad_server.posts >= len(failed_over)  # the failing backend did get (and refuse) them
        wait_for(lambda: len(usage_records(tmp_path)) == len(replies), timeout=5)
        time.sleep(0.3)
        assert len(usage_records(tmp_path)) == len(replies)  # one record per request, failed over or not
        for i in failed_over:
            record = usage_record(tmp_path, replies[i].headers["x-request-id"])
            assert record["backend"] == "good" and record["usage_source"] == "reported"
            assert record["completion_tokens"] == 40
            charged = record["prompt_tokens"] + record["completion_tokens"]
            before = int(replies[i].headers["x-ratelimit-remaining-tokens"])
            after = int(replies[i + 1].headers["x-ratelimit-remaining-tokens"])
            elapsed = times[i + 1] - times[i] + 0.05
            assert charged - drop_bound(capacity, elapsed) <= before - after <= charged + 1, (before, after, charged)
        assert_idle(proxy)


# 4. Redis going away and coming back ------------------------------------------------------------------------

OUTAGE = make_key("outage")


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_killed_and_restarted(tmp_path, procs, policy, new_mock):
    mock = new_mock()
    burst = 3
    with RedisServer() as redis_server:
        proxy = launch(tmp_path, procs, [backend(mock)], {OUTAGE: {"requests_per_minute": 1, "burst": burst}},
                       store="redis", redis_url=redis_server.url, on_store_error=policy)
        first = call(proxy.port, OUTAGE)
        assert first.status == 200 and first.headers["x-ratelimit-remaining-requests"] == str(burst - 1)
        errors = metric_value(proxy, "llmproxy_ratelimit_store_errors_total")

        redis_server.kill()
        before = posts(mock)
        started = time.monotonic()
        replies = [call(proxy.port, OUTAGE) for _ in range(2 * burst)]
        assert time.monotonic() - started < 10  # an unreachable store costs at most its timeout per call
        if policy == "fail_open":
            assert [r.status for r in replies] == [200] * len(replies)  # more than the burst: no limit applied
            assert posts(mock) == before + len(replies)
        else:
            for reply in replies:
                assert reply.status == 503
                assert reply.error["code"] == "rate_limit_store_unavailable"
                assert reply.error["type"] == "service_unavailable"
            assert posts(mock) == before
        assert metric_value(proxy, "llmproxy_ratelimit_store_errors_total") >= errors + len(replies)

        redis_server.start()  # the same port, empty
        # Limits apply again: once the store answers (the reply carries its counters), a burst exhausts.
        limited = wait_for(lambda: (r := call(proxy.port, OUTAGE)).status == 200
                           and "x-ratelimit-remaining-requests" in r.headers and r, timeout=10, interval=0.1)
        remaining = int(limited.headers["x-ratelimit-remaining-requests"])
        assert remaining < burst
        before = posts(mock)
        replies = [call(proxy.port, OUTAGE) for _ in range(remaining + 1)]
        assert [r.status for r in replies] == [200] * remaining + [429]
        assert_refused(replies[-1], "requests")
        assert posts(mock) == before + remaining
        assert_idle(proxy)


# 5. The x-ratelimit-* headers -------------------------------------------------------------------------------

HEADED, REQUESTS_ONLY, UNLIMITED = make_key("headed"), make_key("requests-only"), make_key("unlimited")


def test_rate_limit_headers_count_down_on_plain_and_streaming_responses(tmp_path, procs, new_mock):
    mock = new_mock()
    proxy = launch(tmp_path, procs, [backend(mock)], {
        HEADED: {"requests_per_minute": 6, "burst": 4, "tokens_per_minute": 100000},
        REQUESTS_ONLY: {"requests_per_minute": 6, "burst": 4},
        UNLIMITED: None,
    }, store="memory")
    resets = []
    for i in range(4):
        stream = i % 2 == 1
        reply = call(proxy.port, HEADED, STREAM_CHAT if stream else CHAT)
        assert reply.status == 200
        if stream:
            assert reply.headers["content-type"].startswith("text/event-stream")
            assert reply.body.endswith(b"data: [DONE]\n\n")
        assert reply.headers["x-ratelimit-limit-requests"] == "6"  # per minute, as OpenAI means it
        assert reply.headers["x-ratelimit-remaining-requests"] == str(3 - i)
        resets.append(seconds(reply.headers["x-ratelimit-reset-requests"]))
        assert reply.headers["x-ratelimit-limit-tokens"] == "100000"
        assert 99000 < int(reply.headers["x-ratelimit-remaining-tokens"]) <= 100000
        assert 0 <= seconds(reply.headers["x-ratelimit-reset-tokens"]) < 60
    # Each admission pushes the full-again time one emission interval (10 s) further.
    assert all(abs(b - a - 10) < 1 for a, b in itertools.pairwise(resets)), resets
    assert 9 < resets[0] <= 10

    refused = call(proxy.port, HEADED, STREAM_CHAT)
    assert_refused(refused, "requests")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 9 <= int(refused.headers["retry-after"]) <= 10

    plain = call(proxy.port, REQUESTS_ONLY, STREAM_CHAT)
    assert plain.status == 200 and plain.headers["x-ratelimit-remaining-requests"] == "3"
    assert not any(name.endswith("-tokens") for name in plain.headers if name.startswith("x-ratelimit"))
    free = call(proxy.port, UNLIMITED)
    assert free.status == 200 and not any(name.startswith("x-ratelimit") for name in free.headers)
    assert_idle(proxy)


# 6. Budgets ---------------------------------------------------------------------------------------------------

BUDGETED = make_key("budgeted")


def test_exhausted_daily_budget_refuses_until_utc_midnight(tmp_path, procs, store, new_mock):
    now = datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    if (midnight - now).total_seconds() < 120:
        pytest.skip("too close to UTC midnight: the budget period would roll over during the test")
    mock = new_mock()
    proxy = launch(tmp_path, procs, [backend(mock)], {BUDGETED: {"budget": {"tokens": 50, "per": "day"}}},
                   usage=True, **store)
    first = call(proxy.port, BUDGETED, headers={"x-mock-tokens": "60"})
    assert first.status == 200
    record = usage_record(tmp_path, first.headers["x-request-id"])
    assert record["prompt_tokens"] + record["completion_tokens"] > 50

    before = posts(mock)
    for _ in range(2):
        refused = call(proxy.port, BUDGETED)
        assert_refused(refused, "insufficient_quota", "insufficient_quota")
        until_midnight = (midnight - datetime.now(timezone.utc)).total_seconds()
        assert abs(int(refused.headers["retry-after"]) - until_midnight) <= 60, refused.headers
        assert midnight.strftime("%Y-%m-%dT00:00:00Z") in refused.error["message"]
    assert posts(mock) == before  # the backend got nothing for the refused requests
    assert len(usage_records(tmp_path)) == 1
    assert_idle(proxy)


# 7. The global limit ----------------------------------------------------------------------------------------

OWN_LIMIT, NO_OWN_LIMIT = make_key("own-limit"), make_key("no-own-limit")


def test_global_limit_is_shared_and_not_consumed_by_requests_a_key_limit_refused(tmp_path, procs, store, new_mock):
    mock = new_mock()
    proxy = launch(tmp_path, procs, [backend(mock)], {
        OWN_LIMIT: {"requests_per_minute": 1, "burst": 2},
        NO_OWN_LIMIT: None,
    }, **{"global": {"requests_per_minute": 1, "burst": 6}}, **store)
    before = posts(mock)
    own = [call(proxy.port, OWN_LIMIT) for _ in range(5)]
    assert [r.status for r in own] == [200, 200, 429, 429, 429]
    for reply in own[2:]:
        assert_refused(reply, "requests")
        assert "this API key" in reply.error["message"]

    other = [call(proxy.port, NO_OWN_LIMIT) for _ in range(8)]
    # The global allowance is 6: 2 went to the first key, and its 3 refused requests took none of it.
    assert [r.status for r in other] == [200] * 4 + [429] * 4
    for reply in other[4:]:
        assert_refused(reply, "requests")
        assert "the proxy" in reply.error["message"]
    # A key without limits shows the global ones: 1 request per minute (OpenAI's meaning), 3 of its burst left.
    assert other[0].headers["x-ratelimit-limit-requests"] == "1"
    assert other[0].headers["x-ratelimit-remaining-requests"] == "3"
    assert call(proxy.port, OWN_LIMIT).status == 429
    assert posts(mock) == before + 6
    assert_idle(proxy)
