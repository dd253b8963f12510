"""End-to-end: the proxy's in-product overhead histograms and its Server-Timing header."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.support import ResponseReader, metric_value, post_request, raw_connect

HISTOGRAMS = ("request", "first_byte", "chunk")
SERVER_TIMING = re.compile(r"^proxy;dur=(\d+\.\d{3})$")


pytestmark = pytest.mark.usefixtures("proxy_idle_after")  # `proxy`: tests/e2e/conftest.py


def _histograms(proxy) -> dict[str, tuple[float, float]]:
    """(count, sum) of each overhead histogram, as scraped."""
    return {kind: (metric_value(proxy, f"llmproxy_proxy_{kind}_overhead_seconds_count"),
                   metric_value(proxy, f"llmproxy_proxy_{kind}_overhead_seconds_sum")) for kind in HISTOGRAMS}


def _exchange(proxy, body: dict, headers: dict[str, str]) -> tuple[ResponseReader, bytes, float]:
    """One request on a fresh connection: the response, its body and the client's wall time in seconds."""
    with raw_connect(proxy.port) as sock:
        started = time.perf_counter()
        sock.sendall(post_request("/v1/chat/completions", json.dumps(body).encode(), headers))
        reader = ResponseReader(sock).read_head()
        payload, complete = reader.read_body()
        elapsed = time.perf_counter() - started
    assert reader.status == 200 and complete
    return reader, payload, elapsed


def test_a_stream_is_measured_per_read_and_carries_no_server_timing(proxy):
    before = _histograms(proxy)
    # Events 30 ms apart arrive in reads of their own: each later read is one chunk observation.
    reader, payload, elapsed = _exchange(proxy, {"model": "m", "stream": True, "messages": []},
                                         {"x-mock-tokens": "5", "x-mock-delay-ms": "30"})
    assert payload.count(b"data: ") >= 7 and b"[DONE]" in payload
    assert "server-timing" not in reader.headers  # the head left before the proxy's time was known
    after = _histograms(proxy)
    counts = {kind: after[kind][0] - before[kind][0] for kind in HISTOGRAMS}
    assert counts["request"] == 1 and counts["first_byte"] == 1
    assert 5 <= counts["chunk"] <= 10
    for kind in HISTOGRAMS:  # the proxy's share is a part of what the client waited, never more
        assert 0 < after[kind][1] - before[kind][1] < elapsed


def test_a_plain_response_says_how_long_the_proxy_held_it(proxy):
    before = _histograms(proxy)
    reader, payload, elapsed = _exchange(proxy, {"model": "m", "messages": []}, {"x-mock-tokens": "3"})
    assert json.loads(payload)["object"] == "chat.completion"
    match = SERVER_TIMING.match(reader.headers.get("server-timing", ""))
    assert match, reader.headers
    assert 0 < float(match.group(1)) < elapsed * 1000
    after = _histograms(proxy)
    assert after["request"][0] - before["request"][0] == 1
    assert after["first_byte"][0] - before["first_byte"][0] == 1
    # Server-Timing is the request side plus the response side up to the head: no more than both histograms
    proxy_ms = sum(after[kind][1] - before[kind][1] for kind in ("request", "first_byte")) * 1000
    assert float(match.group(1)) <= proxy_ms + 0.001


def test_a_pipelined_request_is_not_charged_for_its_wait_behind_the_one_before(proxy):
    slow = post_request("/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode(),
                        {"x-mock-first-byte-delay-ms": "300"})
    quick = post_request("/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode())
    with raw_connect(proxy.port) as sock:
        sock.sendall(slow + quick)  # the second is complete at once but waits ~300 ms for its turn
        timings = []
        reader = ResponseReader(sock)  # one reader: what it buffered of the second response stays with it
        for _ in range(2):
            reader.read_head()
            reader.read_body()
            timings.append(float(SERVER_TIMING.match(reader.headers["server-timing"]).group(1)))
    assert timings[1] < 100, timings
