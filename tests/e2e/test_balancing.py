"""End-to-end: how `routing.load_balance` spreads real traffic over real mock backends.

Every count is taken proxy-side (`llmproxy_requests_total{backend=...}`), so the probes the proxy sends
to the mocks (kind detection, /health, /v1/models, /metrics) never blur a share. Load comes from a small
asyncio client: a fixed pool of keep-alive connections, each running one request at a time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from itertools import groupby

import pytest

from tests.support import (
    CHAT,
    STREAM_CHAT,
    Proc,
    ResponseReader,
    assert_idle,
    http_get,
    http_post,
    metric_value,
    mock_stats,
    post_request,
    raw_connect,
    start_mock,
    start_proxy,
    upstreams,
    wait_for,
)

PATH = "/v1/chat/completions"
LOAD_TIMEOUT = 60.0  # the most one burst of load may take, whatever happens


# Load ------------------------------------------------------------------------------------------------

async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request and read its whole response; return (status, connection still usable)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass  # trailers
                break
            await reader.readexactly(size + 2)
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()
        return status, False
    return status, headers.get("connection") != "close"


async def _load(port: int, total: int, concurrency: int, request: bytes) -> Counter:
    remaining = total
    statuses: Counter = Counter()

    async def connect():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await connect()
        try:
            while remaining > 0:
                remaining -= 1
                status, reusable = await _exchange(reader, writer, request)
                statuses[status] += 1
                if not reusable:
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), LOAD_TIMEOUT)
    return statuses


def run_load(proxy: Proc, total: int, concurrency: int, headers: dict[str, str] | None = None,
             body: bytes = CHAT) -> None:
    """`total` requests through `concurrency` keep-alive connections; every one must answer 200."""
    request = post_request(PATH, body, {"x-mock-tokens": "1", **(headers or {})})
    statuses = asyncio.run(_load(proxy.port, total, concurrency, request))
    assert statuses == Counter({200: total}), statuses


def served(proxy: Proc, names: list[str]) -> dict[str, int]:
    """Requests each backend has answered so far, as the proxy counts them."""
    return {name: int(metric_value(proxy, "llmproxy_requests_total", f'backend="{name}"')) for name in names}


def shares_of(proxy: Proc, names: list[str], before: dict[str, int] | None = None) -> tuple[dict[str, float], int]:
    counts = served(proxy, names)
    if before:
        counts = {name: counts[name] - before[name] for name in names}
    total = sum(counts.values())
    return {name: counts[name] / total for name in names}, total


def inflight_gauge(proxy: Proc, name: str) -> float:
    return metric_value(proxy, "llmproxy_backend_inflight_requests", f'backend="{name}"')


def balancing(strategy: str) -> dict:
    return {"load_balance": strategy, "retries": 0}


# Fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    """Two identical, instant vLLM mocks (delays come per request, as x-mock-* headers)."""
    mocks = []
    try:
        mocks += [start_mock("vllm"), start_mock("vllm")]
        yield mocks
    finally:
        for mock in mocks:
            mock.stop()


@pytest.fixture(scope="module")
def paced():
    """vLLM mocks whose every answer takes 2, 20 and 40 ms before its first byte."""
    mocks = []
    try:
        for delay in (2, 20, 40):
            mocks.append(start_mock("vllm", "--first-byte-delay-ms", str(delay)))
        yield mocks
    finally:
        for mock in mocks:
            mock.stop()


@pytest.fixture
def proxies():
    """Proxies a test starts; each is checked idle, then stopped, whatever happened."""
    started: list[Proc] = []
    yield started
    try:
        for proxy in started:
            if proxy.popen.poll() is None:
                assert_idle(proxy)
    finally:
        for proxy in started:
            proxy.stop()


def _start(proxies: list[Proc], tmp_path, backends: list[dict], **sections) -> Proc:
    proxy = start_proxy(tmp_path, backends, **sections)
    proxies.append(proxy)
    # Every backend known (kind and models probed) before any load: no request races the first probe.
    wait_for(lambda: all(u["available"] and u["models"] for u in upstreams(proxy).values()), timeout=10)
    return proxy


# 1. weighted / round_robin ---------------------------------------------------------------------------

def test_weighted_5_to_3_shares_hold_over_thousands_of_concurrent_requests(pair, tmp_path, proxies):
    proxy = _start(proxies, tmp_path, [{"url": pair[0].url, "name": "five", "weight": 5},
                                       {"url": pair[1].url, "name": "three", "weight": 3}],
                   routing=balancing("weighted"))
    run_load(proxy, 2400, 16, body=STREAM_CHAT)  # 1-token streams
    shares, total = shares_of(proxy, ["five", "three"])
    assert total == 2400
    assert abs(shares["five"] - 0.625) <= 0.03, shares
    assert abs(shares["three"] - 0.375) <= 0.03, shares


def test_weighted_picks_are_interleaved_not_bursts(pair, tmp_path, proxies):
    # One client, one request at a time: the order of picks is the order of the access log.
    proxy = _start(proxies, tmp_path, [{"url": pair[0].url, "name": "five", "weight": 5},
                                       {"url": pair[1].url, "name": "three", "weight": 3}],
                   routing=balancing("weighted"))
    run_load(proxy, 40, 1)
    log = tmp_path / "access.log"
    picks = wait_for(lambda: (p := [r["backend"] for r in map(json.loads, log.read_text().splitlines())
                                    if r["path"] == PATH]) and len(p) == 40 and p)
    for start in range(len(picks) - 7):
        window = Counter(picks[start:start + 8])
        assert window == Counter(five=5, three=3), (start, picks)
    assert max(len(list(run)) for _, run in groupby(picks)) <= 2, picks  # never three in a row


def test_round_robin_with_equal_weights_is_an_even_split(pair, tmp_path, proxies):
    proxy = _start(proxies, tmp_path, [{"url": pair[0].url, "name": "left"}, {"url": pair[1].url, "name": "right"}],
                   routing=balancing("round_robin"))
    run_load(proxy, 2400, 16)
    counts = served(proxy, ["left", "right"])
    assert sum(counts.values()) == 2400
    assert abs(counts["left"] - counts["right"]) <= 2, counts


# 2. least_connections --------------------------------------------------------------------------------

def test_least_connections_sends_less_to_a_ten_times_slower_backend(paced, tmp_path, proxies):
    fast, slow = paced[0], paced[1]  # 2 ms and 20 ms before the first byte
    proxy = _start(proxies, tmp_path, [{"url": fast.url, "name": "fast"}, {"url": slow.url, "name": "slow"}],
                   routing=balancing("least_connections"))
    run_load(proxy, 1200, 16)
    shares, total = shares_of(proxy, ["fast", "slow"])
    assert total == 1200
    assert 0 < shares["slow"] < 0.25, shares
    for name in ("fast", "slow"):
        assert inflight_gauge(proxy, name) == 0
        assert upstreams(proxy)[name]["inflight"] == 0
    assert_idle(proxy)


def _open_gated_stream(proxy: Proc, model: str, gate: str) -> tuple[socket.socket, ResponseReader]:
    """A stream whose head and first event have reached us, held open by the mock until `gate` is released."""
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = raw_connect(proxy.port)
    sock.sendall(post_request(PATH, body, {"x-mock-gate": gate, "x-mock-tokens": "2", "x-marker": gate}))
    reader = ResponseReader(sock).read_head()
    assert reader.status == 200
    first = reader.read_chunk()
    assert first and first.startswith(b"data: "), first
    return sock, reader


def _finish_gated_stream(mock: Proc, sock: socket.socket, reader: ResponseReader, gate: str) -> None:
    for _ in range(10):  # more releases than the stream has events; a spare release is harmless
        http_post(f"{mock.url}/_mock/release/{gate}")
    body, complete = reader.read_body()
    sock.close()
    assert complete and body.rstrip().endswith(b"data: [DONE]"), body


def test_in_flight_counts_whole_streams_and_least_connections_avoids_the_busy_backend(pair, tmp_path, proxies):
    # "pin" only serves the model "pinned": those streams can only go to it, whatever the strategy.
    pin, other = pair
    proxy = _start(proxies, tmp_path, [{"url": pin.url, "name": "pin", "models": ["m", "pinned"]},
                                       {"url": other.url, "name": "other", "models": ["m"]}],
                   routing=balancing("least_connections"))
    streams = []
    try:
        for i in range(3):
            gate = f"pin-{i}-{time.monotonic_ns()}"
            streams.append((pin, gate, *_open_gated_stream(proxy, "pinned", gate)))
        # Heads and first events are out, the rest is held: in flight until the stream ends, not the head.
        assert {n: u["inflight"] for n, u in upstreams(proxy).items()} == {"pin": 3, "other": 0}
        assert inflight_gauge(proxy, "pin") == 3 and inflight_gauge(proxy, "other") == 0

        # 3 vs 0 in flight: every request for "m", one after another, goes to the idle backend.
        before = served(proxy, ["pin", "other"])
        run_load(proxy, 6, 1)
        after = served(proxy, ["pin", "other"])
        assert (after["pin"] - before["pin"], after["other"] - before["other"]) == (0, 6)

        # Two open streams for "m" go to "other" too (0 < 3, then 1 < 3) and count there.
        for i in range(2):
            gate = f"other-{i}-{time.monotonic_ns()}"
            streams.append((other, gate, *_open_gated_stream(proxy, "m", gate)))
        gates = {gate for _, gate, _, _ in streams}
        for mock, count in ((pin, 3), (other, 2)):  # where the streams really are, as the mocks see them
            held = [r for r in mock_stats(mock)["requests"]
                    if r["outcome"] is None and any(h == ["x-marker", g] for h in r["headers"] for g in gates)]
            assert len(held) == count
        assert {n: u["inflight"] for n, u in upstreams(proxy).items()} == {"pin": 3, "other": 2}
        assert inflight_gauge(proxy, "pin") == 3 and inflight_gauge(proxy, "other") == 2

        # 3 vs 2 still: the next one goes to "other" as well.
        before = served(proxy, ["pin", "other"])
        run_load(proxy, 1, 1)
        after = served(proxy, ["pin", "other"])
        assert (after["pin"] - before["pin"], after["other"] - before["other"]) == (0, 1)
    finally:
        for mock, gate, sock, reader in streams:
            _finish_gated_stream(mock, sock, reader, gate)
    wait_for(lambda: inflight_gauge(proxy, "pin") == 0 and inflight_gauge(proxy, "other") == 0)
    assert {n: u["inflight"] for n, u in upstreams(proxy).items()} == {"pin": 0, "other": 0}


# 3. latency_based ------------------------------------------------------------------------------------

def test_latency_based_favours_the_fastest_yet_keeps_every_backend_in_use(paced, tmp_path, proxies):
    names = ["ms2", "ms20", "ms40"]  # first byte after 2, 20 and 40 ms
    backends = [{"url": mock.url, "name": name} for mock, name in zip(paced, names, strict=True)]
    proxy = _start(proxies, tmp_path, backends, routing=balancing("latency_based"))
    run_load(proxy, 1500, 16)
    shares, total = shares_of(proxy, names)
    assert total == 1500
    assert shares["ms2"] > 0.5 and shares["ms2"] > shares["ms20"] > shares["ms40"] > 0.0, shares
    assert max(shares.values()) < 1.0, shares
    # One request at a time nobody is busy, so in-flight counts (least_connections) tie and round robin
    # rotates; only the latency estimates still say the 2 ms backend answers first.
    before = served(proxy, names)
    run_load(proxy, 150, 1)
    shares, total = shares_of(proxy, names, before)
    assert total == 150
    assert shares["ms2"] > 0.5, shares


# 4. queue_depth --------------------------------------------------------------------------------------

def _queue_gauges(proxy: Proc) -> dict[str, float]:
    _, text = http_get(proxy.url + "/metrics")
    gauges = {}
    for line in text.decode().splitlines():
        if line.startswith('llmproxy_backend_queue_depth{backend="'):
            labels, value = line.rsplit(" ", 1)
            gauges[labels.split('"')[1]] = float(value)
    return gauges


def test_queue_depth_follows_the_backends_own_queue_reports(tmp_path, procs, proxies):
    for dialect in ("vllm", "vllm", "tgi"):
        procs.append(start_mock(dialect))
    busy, idle, tgi = procs
    names = ["busy", "idle", "tgi"]
    # Pinned before the proxy starts: its first probe round already reads 50 waiting on "busy".
    assert http_post(busy.url + "/_mock/gauges?waiting=50")[0] == 200
    proxy = _start(proxies, tmp_path, [{"url": busy.url, "name": "busy"}, {"url": idle.url, "name": "idle"},
                                       {"url": tgi.url, "name": "tgi"}],
                   routing=balancing("queue_depth"), health_check={"interval": 0.2})
    found = upstreams(proxy)
    assert found["tgi"]["type"] == "tgi"
    assert found["busy"]["queue_depth"] >= 50
    assert found["idle"]["queue_depth"] is not None and found["idle"]["queue_depth"] < 50
    assert found["tgi"]["queue_depth"] is not None and found["tgi"]["queue_depth"] < 50
    gauges = _queue_gauges(proxy)
    assert set(gauges) == set(names) and gauges["busy"] >= 50, gauges

    run_load(proxy, 600, 8)
    shares, total = shares_of(proxy, names)
    assert total == 600
    assert shares["busy"] <= 0.01, shares
    assert shares["idle"] > 0.2 and shares["tgi"] > 0.2, shares  # the two short queues share the work

    # Now "busy" drains and the others (the TGI one by its own metric names) report long queues.
    assert http_post(busy.url + "/_mock/gauges")[0] == 200
    assert http_post(idle.url + "/_mock/gauges?waiting=50")[0] == 200
    assert http_post(tgi.url + "/_mock/gauges?waiting=50")[0] == 200
    wait_for(lambda: (u := upstreams(proxy))["busy"]["queue_depth"] < 50
             and u["idle"]["queue_depth"] >= 50 and u["tgi"]["queue_depth"] >= 50, timeout=5)
    gauges = _queue_gauges(proxy)
    assert gauges["busy"] < 50 <= min(gauges["idle"], gauges["tgi"]), gauges
    before = served(proxy, names)
    run_load(proxy, 600, 8)
    shares, total = shares_of(proxy, names, before)
    assert total == 600
    assert shares["busy"] >= 0.99, shares


# 5. weights under least_connections ------------------------------------------------------------------

def test_least_connections_honours_weights(pair, tmp_path, proxies):
    proxy = _start(proxies, tmp_path, [{"url": pair[0].url, "name": "heavy", "weight": 3},
                                       {"url": pair[1].url, "name": "light", "weight": 1}],
                   routing=balancing("least_connections"))
    # Equal speed (20 ms each): only the weights can tell the two apart.
    run_load(proxy, 1200, 16, {"x-mock-first-byte-delay-ms": "20"})
    shares, total = shares_of(proxy, ["heavy", "light"])
    assert total == 1200
    assert abs(shares["heavy"] - 0.75) <= 0.06, shares
