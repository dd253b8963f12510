"""Nothing queues in the proxy below a backend by default; `max_concurrent` is a deliberate queue, measured.

The streams here stall after their first event (x-mock-stall-after: 1), so they hold their upstream connection
for as long as the test keeps them: with a cap in the proxy, whatever is past it waits for one of them to end.
"""

from __future__ import annotations

import asyncio
import resource
import time

import pytest

from tests.support import STREAM_CHAT, http_get, metric_value, post_request, wait_for

STALLED = {"x-mock-stall-after": "1"}
MANY = 1500  # above the old per-backend default cap of 1,024


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"{need} sockets need an open-files limit of {need}; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


async def open_stream(port: int, headers: dict[str, str]) -> tuple[asyncio.StreamWriter, asyncio.Future[bytes]]:
    """Send a streamed chat; return the writer (close it to end the stream) and a task that reads until the
    first SSE event and returns what it read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_request("/v1/chat/completions", STREAM_CHAT, headers))

    async def first_event() -> bytes:
        seen = b""
        while b"data:" not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                break
            seen += chunk
        return seen

    return writer, asyncio.ensure_future(first_event())


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()


def test_by_default_1500_concurrent_streams_to_one_backend_all_get_their_first_event_at_once(new_mock, new_proxy):
    raise_nofile(2 * MANY + 200)
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url, "name": "only"}], logging={"access_log": "off"})

    async def run() -> tuple[int, float, float]:
        writers, reads = [], []
        started = time.monotonic()
        for _ in range(MANY):
            writer, read = await open_stream(proxy.port, STALLED)
            writers.append(writer)
            reads.append(read)
        try:
            # Generous for a loaded 2-core machine: the proxy opens 1,500 upstream connections meanwhile. With a
            # cap below 1,500 the rest would wait for a stream to end (these never do) or 503 after 5 s.
            done, _ = await asyncio.wait(reads, timeout=60)
            served = sum(1 for read in done if read.result().startswith(b"HTTP/1.1 200") and b"data:" in read.result())
            checked_out = await asyncio.to_thread(metric_value, proxy, "llmproxy_upstream_connections_checked_out")
            return served, time.monotonic() - started, checked_out
        finally:
            close_all(writers)
            for read in reads:
                read.cancel()

    served, seconds, checked_out = asyncio.run(run())
    assert served == MANY, f"{MANY - served} of {MANY} streams had no first event after {seconds:.1f}s"
    assert checked_out == MANY  # one upstream connection each, all at once: no queue in the proxy
    assert "llmproxy_backend_queued_requests{" not in http_get(proxy.url + "/metrics")[1].decode()  # no queue
    wait_for(lambda: metric_value(proxy, "llmproxy_upstream_connections_checked_out") == 0, timeout=30)


def test_past_max_concurrent_a_request_waits_in_the_proxy_is_counted_and_its_wait_observed(new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"url": mock.url, "name": "q", "max_concurrent": 10}], logging={"access_log": "off"})
    queued = 'backend="q"'

    async def run() -> tuple[float, float, float]:
        held = [await open_stream(proxy.port, STALLED) for _ in range(10)]
        writers = [writer for writer, _ in held]
        try:
            for _, read in held:
                assert b"data:" in await asyncio.wait_for(read, 20)
            eleventh, read = await open_stream(proxy.port, {})
            writers.append(eleventh)
            await asyncio.to_thread(wait_for, lambda: metric_value(
                proxy, "llmproxy_backend_queued_requests", queued) == 1, 10)
            await asyncio.sleep(0.5)
            assert not read.done(), "the 11th request was served while 10 streams held every slot"
            waited_from = time.monotonic()
            writers[0].transport.abort()  # one stream ends: its slot goes to the 11th
            head = await asyncio.wait_for(read, 20)
            assert head.startswith(b"HTTP/1.1 200") and b"data:" in head
            waited = time.monotonic() - waited_from + 0.5
            name = "llmproxy_backend_queue_wait_seconds"
            count = await asyncio.to_thread(metric_value, proxy, f"{name}_count", queued)
            total = await asyncio.to_thread(metric_value, proxy, f"{name}_sum", queued)
            return waited, count, total
        finally:
            close_all(writers)

    waited, count, total = asyncio.run(run())
    assert count == 11  # every admission, the first ten with a wait of 0
    assert 0.5 <= total <= waited + 5  # the 11th's wait: at least the half second it was seen waiting
    assert metric_value(proxy, "llmproxy_backend_queued_requests", queued) == 0
    wait_for(lambda: metric_value(proxy, "llmproxy_upstream_connections_checked_out") == 0, timeout=10)
