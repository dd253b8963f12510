"""End-to-end: de-duplication of identical requests in flight (caching.dedup), real proxy, real mock backend.

The mock holds each response head back (`--first-byte-delay-ms`) so that identical requests sent together
are all in flight at once; it counts the upstream requests (its log of POSTs) and sees the upstream close.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support import (
    ResponseReader,
    access_log,
    assert_idle,
    metric_value,
    mock_stats,
    post_count,
    post_request,
    raw_connect,
    usage_records,
    wait_for,
)

CHAT_PATH = "/v1/chat/completions"
CLIENTS = 50


def caching(**options: object) -> dict:
    return {"enabled": True, "strategies": [{"id": "det", "match": {"path": CHAT_PATH,
                                                                    "json_body": {"temperature": 0.0}}}],
            **options}


def request(first_byte_delay_ms: int = 0) -> bytes:
    """The streamed chat request every test sends; the mock holds its head back `first_byte_delay_ms` (a header:
    not part of the cache key, and not slowing the mock's own stats endpoint as its option would)."""
    body = b'{"model": "m", "stream": true, "temperature": 0.0, "messages": [{"role": "user", "content": "hi"}]}'
    return post_request(CHAT_PATH, body, {"x-mock-first-byte-delay-ms": str(first_byte_delay_ms)})


def leader_upstream(proxy) -> None:
    """Wait until a request is upstream (the leader): identical requests from now on follow it."""
    wait_for(lambda: metric_value(proxy, "llmproxy_upstream_connections_checked_out") == 1)


def read_stream(port: int, data: bytes, start: threading.Barrier | None = None) -> tuple[bytes, bool, str, float]:
    """Send, read the whole streamed response: (body, complete, x-llmproxy-deduplicated, seconds it took)."""
    with raw_connect(port, timeout=30) as sock:
        if start is not None:
            start.wait(10)
        begun = time.monotonic()
        sock.sendall(data)
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        body, complete = reader.read_body()
        return body, complete, reader.headers.get("x-llmproxy-deduplicated", ""), time.monotonic() - begun


def test_50_identical_streams_share_one_upstream_request(new_mock, metered_proxy, tmp_path):
    mock = new_mock("vllm", "--tokens", "40", "--delay-ms", "5")
    proxy = metered_proxy([{"name": "a", "url": mock.url}], caching=caching())
    start = threading.Barrier(CLIENTS)
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda _: read_stream(proxy.port, request(1500), start), range(CLIENTS)))
    bodies = {body for body, complete, _, _ in results if complete}
    assert len(bodies) == 1 and all(complete for _, complete, _, _ in results)
    assert b"data: [DONE]" in bodies.pop()
    assert post_count(mock) == 1
    records = wait_for(lambda: len(found := usage_records(tmp_path)) == CLIENTS and found)
    leaders = [r for r in records if not r["deduplicated"] and not r["cached"]]
    assert len(leaders) == 1  # the others followed it (or, arriving after its end, hit the cache)
    followers = [r for r in records if r["deduplicated"]]
    assert all(r["completion_tokens"] == leaders[0]["completion_tokens"] for r in followers)
    assert metric_value(proxy, "llmproxy_dedup_followers_total", 'outcome="complete"') == len(followers) > 0
    assert_idle(proxy)


def test_a_latecomer_gets_the_stream_from_its_first_byte(new_mock, new_proxy):
    mock = new_mock("vllm", "--tokens", "30", "--delay-ms", "20")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching())
    with raw_connect(proxy.port, timeout=10) as leader:
        leader.sendall(request())
        reader = ResponseReader(leader).read_head()
        first = reader.read_chunk()  # the stream is under way
        body, complete, deduplicated, _ = read_stream(proxy.port, request())
        rest, whole = reader.read_body()
    assert complete and whole and deduplicated == "true"
    assert body == first + rest
    assert post_count(mock) == 1


def test_a_follower_that_stops_reading_is_cut_and_the_others_complete(new_mock, metered_proxy, tmp_path):
    # About 1 MB of events: far more than a stalled reader's socket buffers and its 64 KiB lag bound.
    mock = new_mock("vllm", "--tokens", "5000")
    # max_entry_kb above the answer: a follower slow to arrive on a loaded machine can still join mid-stream.
    proxy = metered_proxy([{"name": "a", "url": mock.url}], caching=caching(dedup_max_lag_kb=64, max_entry_kb=4096),
                          server={"listen": "127.0.0.1:0", "timeouts": {"write": "60s"}})
    # Small segments and buffer: else loopback's 64 KiB segments let the kernel queue the whole stream for it.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    with raw_connect(proxy.port, timeout=30) as leader:
        leader.sendall(request(1500))
        leader_upstream(proxy)
        stalled.connect(("127.0.0.1", proxy.port))
        stalled.sendall(request())
        with ThreadPoolExecutor(CLIENTS - 2) as pool:
            readers = pool.map(lambda _: read_stream(proxy.port, request()), range(CLIENTS - 2))
            reader = ResponseReader(leader).read_head()
            body, complete = reader.read_body()
            results = list(readers)
    assert complete and all(c and b == body for b, c, _, _ in results)
    assert max(seconds for _, _, _, seconds in results) < 30  # never held back until the write timeout
    wait_for(lambda: metric_value(proxy, "llmproxy_dedup_followers_total", 'outcome="cut"') == 1, timeout=10)
    stalled.settimeout(10)
    received = 0
    try:
        while data := stalled.recv(65536):
            received += len(data)
    except ConnectionResetError:
        pass
    stalled.close()
    assert received < len(body)  # truncated
    records = wait_for(lambda: len(found := usage_records(tmp_path)) == CLIENTS and found)
    assert [r["termination"] for r in records].count("cD") == 1
    assert post_count(mock) == 1
    assert_idle(proxy)


def test_the_upstream_goes_on_for_followers_when_the_leader_leaves_and_closes_when_all_have(new_mock, new_proxy,
                                                                                            tmp_path):
    mock = new_mock("vllm", "--tokens", "2000", "--delay-ms", "10")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching())
    leader = raw_connect(proxy.port, timeout=10)
    leader.sendall(request(500))
    leader_upstream(proxy)
    followers = [raw_connect(proxy.port, timeout=10) for _ in range(CLIENTS - 1)]
    for sock in followers:
        sock.sendall(request())
    readers = [ResponseReader(sock).read_head() for sock in followers]
    for reader in readers:
        assert reader.read_chunk()
    leader.close()  # the leader's client goes: its followers keep the stream
    time.sleep(0.3)
    assert all(reader.read_chunk() for reader in readers)
    assert mock_stats(mock)["client_disconnects_midstream"] == 0
    for sock in followers:
        sock.close()
    all_gone = time.monotonic()
    stats = wait_for(lambda: (found := mock_stats(mock))["client_disconnects_midstream"] == 1 and found)
    assert stats["last_disconnect_monotonic"] - all_gone < 1.0  # the upstream closed within a second
    assert post_count(mock) == 1
    def posts() -> list[dict]:
        return [entry for entry in access_log(tmp_path) if entry["method"] == "POST"]
    log = wait_for(lambda: len(found := posts()) == CLIENTS and found)
    assert [entry["termination"] for entry in log] == ["CD"] * CLIENTS
    assert_idle(proxy)


def test_followers_of_a_leader_that_fails_before_its_head_go_upstream_themselves(new_mock, new_proxy):
    # The leader's request times out before any response byte: its followers fall back, and each goes upstream
    # on its own rather than follow the first of them (which could fail as long again, and again).
    mock = new_mock("vllm")
    proxy = new_proxy([{"name": "a", "url": mock.url, "timeouts": {"first_byte": 2.0}}], caching=caching(),
                      routing={"retries": 0})
    with ThreadPoolExecutor(4) as pool:
        def leader() -> int:
            with raw_connect(proxy.port, timeout=30) as sock:
                sock.sendall(request(first_byte_delay_ms=10_000))
                return ResponseReader(sock).read_head().status

        led = pool.submit(leader)
        leader_upstream(proxy)
        followers = [pool.submit(read_stream, proxy.port, request()) for _ in range(3)]
        time.sleep(0.5)  # they follow the leader (it waits 2 s for its first byte)
        assert led.result(timeout=30) == 504
        results = [f.result(timeout=30) for f in followers]
    assert all(complete and deduplicated == "" for _, complete, deduplicated, _ in results)
    assert post_count(mock) == 1 + 3
