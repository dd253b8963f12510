"""A rolling restart as Kubernetes does it, on one machine: two proxies behind a balancer that sends new
connections only to proxies whose /ready answers 200 (tests/ready_balancer.py); one proxy gets SIGTERM with
streams in flight through it.

What must hold (the README's "Kubernetes" section relies on it): the stopping proxy's /ready turns 503 before it
stops accepting, so the balancer stops sending before any connection could be refused; every stream in flight
completes with its whole content; and new connections made meanwhile all succeed, through the other proxy.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from tests.ready_balancer import REFUSED, ReadyBalancer
from tests.support import NO_PERIODIC_PROBES, start_mock, start_proxy

STREAMS = 100
TOKENS = 50  # at 100 ms apart: a 5 s stream, still going when the stopping proxy closes its listener
TOKEN_DELAY_MS = 100
SHUTDOWN_DELAY = 1.0  # ten of the balancer's /ready polls see the 503 before the listener closes
POLL_INTERVAL = 0.1
NEW_CONNECTION_EVERY = 0.05
EXPECTED = "".join(f" tok{i}" for i in range(TOKENS))
STREAM_BODY = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
PLAIN_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
WAIT = 20.0  # the bound on every wait of the test


def request_bytes(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmproxy\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked body; raises ValueError if it is cut short (no last chunk)."""
    out, rest = bytearray(), body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            raise ValueError("chunked body cut short")
        out += rest[:size]
        rest = rest[size + 2:]


def streamed_content(payload: bytes) -> str:
    """The concatenated deltas of an OpenAI chat stream; requires its closing `data: [DONE]`."""
    events = [line[6:] for line in payload.split(b"\n") if line.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", "the stream did not end with [DONE]"
    return "".join(json.loads(event)["choices"][0]["delta"].get("content", "") for event in events[:-1])


async def exchange(port: int, body: bytes, started: asyncio.Event | None = None) -> tuple[int, bytes]:
    """Send one request through the balancer; return the status and the (de-chunked) body. `started` is set
    once the response head has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(body))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        if started is not None:
            started.set()
        raw = await asyncio.wait_for(reader.read(), WAIT)  # to EOF: the proxy closes after the response
    finally:
        writer.close()
    status = int(head.split()[1])
    return status, dechunk(raw) if b"transfer-encoding: chunked" in head.lower() else raw


async def wait_until(predicate, what: str) -> None:
    for _ in range(int(WAIT / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {WAIT}s: {what}")


@pytest.fixture
def fleet(tmp_path, procs):
    """A paced vLLM mock and two proxies in front of it, A and B, each with shutdown_delay."""
    mock = start_mock("vllm", "--tokens", str(TOKENS), "--delay-ms", str(TOKEN_DELAY_MS))
    procs.append(mock)
    proxies = {}
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        proxies[name] = start_proxy(directory, [{"url": mock.url, "name": "mock"}], health_check=NO_PERIODIC_PROBES,
                                    server={"listen": "127.0.0.1:0", "shutdown_delay": f"{SHUTDOWN_DELAY}s",
                                            "shutdown_timeout": "30s"})
        procs.append(proxies[name])
    return proxies


def test_sigterm_with_100_streams_in_flight_drops_nothing_behind_a_ready_gated_balancer(fleet):
    steps: list[str] = []

    async def bounded() -> None:
        try:
            await asyncio.wait_for(rolling_restart(fleet["a"], fleet["b"], steps), 5 * WAIT)
        except asyncio.TimeoutError:
            raise AssertionError(f"the rolling restart did not end within {5 * WAIT}s; it got to: {steps}") from None

    asyncio.run(bounded())


async def rolling_restart(proxy_a, proxy_b, steps: list[str]) -> None:
    loop = asyncio.get_running_loop()
    balancer = ReadyBalancer({"a": proxy_a.port, "b": proxy_b.port}, poll_interval=POLL_INTERVAL)
    await balancer.start()
    try:
        a, b = balancer.upstreams["a"], balancer.upstreams["b"]
        await wait_until(lambda: a.ready and b.ready, "both proxies ready")
        steps.append("both ready")

        heads = [asyncio.Event() for _ in range(STREAMS)]
        streams = [asyncio.ensure_future(exchange(balancer.port, STREAM_BODY, head)) for head in heads]
        await wait_until(lambda: all(head.is_set() for head in heads), "every stream's response head")
        stream_placements = list(balancer.placements)
        steps.append("every stream started")
        on_a = [p for p in stream_placements if p.upstream == "a"]
        assert len(stream_placements) == STREAMS and len(on_a) >= STREAMS // 3, "round robin over two ready"

        proxy_a.popen.send_signal(signal.SIGTERM)
        signalled = loop.time()
        steps.append("SIGTERM sent to A")
        new_requests = []
        while proxy_a.popen.poll() is None and loop.time() - signalled < WAIT:  # new connections all along
            new_requests.append(asyncio.ensure_future(exchange(balancer.port, PLAIN_BODY)))
            await asyncio.sleep(NEW_CONNECTION_EVERY)
        assert proxy_a.popen.poll() == 0, "A exits 0 once its streams are done"
        steps.append("A exited")

        results = await asyncio.wait_for(asyncio.gather(*streams), WAIT)
        steps.append("streams done")
        new_results = await asyncio.wait_for(asyncio.gather(*new_requests), WAIT)
        steps.append("new requests done")
    finally:
        await balancer.close()
        steps.append("balancer closed")

    # /ready said 503 before the listener closed, and the balancer saw both in that order.
    turned_503 = a.first(503, after=signalled)
    refused = a.first(REFUSED, after=signalled)
    assert turned_503 is not None and refused is not None, a.probes[-20:]
    assert signalled < turned_503 < refused
    assert not [at for at, seen in a.probes if signalled <= at < turned_503 and seen != 200]

    # Every stream completed with its whole content, A's too, although A stopped accepting while they ran.
    assert [status for status, _ in results] == [200] * STREAMS
    assert all(streamed_content(payload) == EXPECTED for _, payload in results)
    assert max(p.closed_at for p in on_a) > refused, "A's streams were still in flight when A stopped accepting"

    # No connection was refused: each went to a proxy that accepted it and answered; after the 503, only to B.
    new_placements = balancer.placements[STREAMS:]
    assert len(new_placements) == len(new_requests) >= 10
    assert all(p.connected for p in balancer.placements)
    assert [status for status, _ in new_results] == [200] * len(new_results)
    assert {p.upstream for p in new_placements if p.accepted_at >= turned_503} == {"b"}
