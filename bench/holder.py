"""A load process for bench.memory and bench.connections: it holds idle connections or drives streams.

    python -m bench.holder idle --port PORT --count N
    python -m bench.holder streams --port PORT --count N --tokens T --delay-ms D [--timeout S]

It runs apart from the benchmark, so that thousands of sockets and the parsing of their streams cost
neither the measuring process nor the proxy anything they would not cost with real clients. It is
pinned wherever its parent is (the parent's CPU mask is inherited). Its soft RLIMIT_NOFILE is raised to
the hard limit first; raise the hard limit in the parent when N is above it.

Both modes first open N connections to 127.0.0.1:PORT, `--batch` connects at a time (a burst beyond the
listener's accept queue would cost 1 s SYN retransmits). `idle` then sends nothing. `streams` writes one
streamed chat completion on every connection once all are open (over --ramp-s), so that all N are in
flight together, and checks every response as bench.loadgen does (status 200, chunked framing,
`data: [DONE]` last) plus the number of SSE `data:` events: T + 2 for the vLLM mock (the role event,
T tokens, `[DONE]`).

It reports on stdout, one JSON object a line:
- {"event": "opened", "open": n, "failed": m, "errors": {...}, "seconds": s} once every connect was tried;
- streams: {"event": "sent", ...} when every request is written (spread over --ramp-s), {"event": "progress", ...} every
  --progress-s, and {"event": "done", ...} with the outcome once every stream has ended;
- {"event": "status", "open": n, "closed_by_peer": c} whenever the server closed connections (at most
  every --progress-s);
- {"event": "closed", ...} when it closes everything itself: on SIGTERM or SIGINT, when its parent is
  gone, or after --max-seconds (so a benchmark that dies cannot leave it running).
After "done" the connections stay open (idle keep-alive) until then.

The benchmarks start and read it through bench.rig.Holder.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop

from bench.harness import HOST, chat_request
from bench.interleave import Failures
from bench.loadgen import StreamClient, StreamResult
from bench.stats import summary_ms

EVENT = b"data:"
_SEAM = len(EVENT) - 1  # bytes kept from the end of a body piece: an event marker may straddle two pieces
PARENT_CHECK_S = 1.0


def emit(event: str, **fields: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps({"event": event, **fields}) + b"\n")
    sys.stdout.flush()


@dataclass
class Tally:
    """What the connections of this process saw. `streaming` counts streams between first event and end."""

    open: int = 0
    closed_by_peer: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    streaming: int = 0
    max_streaming: int = 0
    completed: int = 0
    errors: Failures = field(default_factory=Failures)  # failed connects and streams, by message
    events_per_stream: collections.Counter[int] = field(default_factory=collections.Counter)
    ttft_ns: list[int] = field(default_factory=list)
    total_ns: list[int] = field(default_factory=list)
    closing: bool = False  # set when this process closes its connections: those are not closed by the peer

    def lost(self, by_us: bool = False) -> None:
        self.open -= 1
        if not (by_us or self.closing):
            self.closed_by_peer += 1

    def status(self) -> dict[str, int]:
        return {"open": self.open, "closed_by_peer": self.closed_by_peer}

    def progress(self) -> dict[str, int]:
        return {**self.status(), "in_flight": self.in_flight, "streaming": self.streaming,
                "completed": self.completed, "failed": self.errors.count}


class IdleClient(asyncio.Protocol):
    """A connection that sends nothing and only notices being closed."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.lost()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class CountingClient(StreamClient):
    """StreamClient that also counts `data:` events and keeps the in-flight and streaming gauges."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        super().__init__()

    def _reset(self) -> None:
        super()._reset()
        self.events = 0
        self._carry = b""

    def connection_lost(self, exc: Exception | None) -> None:
        aborted = self.closed  # StreamClient aborts a connection after a failed or unreadable response
        super().connection_lost(exc)
        self.tally.lost(by_us=aborted)

    async def request(self, payload: bytes, timeout: float) -> StreamResult:
        tally = self.tally
        tally.in_flight += 1
        tally.max_in_flight = max(tally.max_in_flight, tally.in_flight)
        try:
            return await super().request(payload, timeout)
        finally:
            tally.in_flight -= 1
            if self._ttft >= 0:
                tally.streaming -= 1

    def _body(self, buf: bytearray, pos: int, n: int, now: int) -> None:
        started = self._ttft >= 0
        super()._body(buf, pos, n, now)
        if not started and self._ttft >= 0:
            tally = self.tally
            tally.streaming += 1
            tally.max_streaming = max(tally.max_streaming, tally.streaming)
        end = pos + n
        # a marker that straddles the seam has to start in the carry and end in the next few bytes; with
        # both shorter than the marker, any match in their concatenation is one of those
        self.events += buf.count(EVENT, pos, end) + (self._carry + bytes(buf[pos:min(end, pos + _SEAM)])).count(EVENT)
        self._carry = (self._carry + bytes(buf[max(pos, end - _SEAM):end]))[-_SEAM:]


async def open_all(factory: Callable[[], asyncio.Protocol], port: int, count: int, batch: int,
                   tally: Tally) -> list[Any]:
    """Open `count` connections, `batch` at a time; return the protocols of those that opened."""
    loop = asyncio.get_running_loop()

    async def one() -> Any:
        try:
            _, protocol = await loop.create_connection(factory, HOST, port)
        except OSError as exc:
            tally.errors.add(f"connect failed: {exc.strerror or type(exc).__name__}")
            return None
        tally.open += 1
        return protocol

    opened = []
    for first in range(0, count, batch):
        results = await asyncio.gather(*(one() for _ in range(min(batch, count - first))))
        opened += [protocol for protocol in results if protocol is not None]
    return opened


async def stream_one(client: CountingClient, payload: bytes, timeout: float, expected_events: int) -> None:
    tally = client.tally
    result = await client.request(payload, timeout)
    if not result.ok:
        tally.errors.add(result.error or "failed")
    elif client.events != expected_events:
        tally.errors.add(f"{client.events} SSE events, expected {expected_events}")
        tally.events_per_stream[client.events] += 1
    else:
        tally.completed += 1
        tally.events_per_stream[client.events] += 1
        tally.ttft_ns.append(result.ttft_ns)
        tally.total_ns.append(result.total_ns)


async def report_status(tally: Tally, every_s: float) -> None:
    """Emit a status line whenever the server has closed connections since the last one."""
    reported = tally.closed_by_peer
    while True:
        await asyncio.sleep(every_s)
        if tally.closed_by_peer != reported:
            reported = tally.closed_by_peer
            emit("status", **tally.status())


async def hold_idle(args: argparse.Namespace, tally: Tally, held: list[Any]) -> None:
    started = time.monotonic()
    held += await open_all(lambda: IdleClient(tally), args.port, args.count, args.batch, tally)
    emit("opened", **tally.status(), failed=tally.errors.count, errors=tally.errors.kinds,
         seconds=round(time.monotonic() - started, 3))
    await report_status(tally, args.progress_s)


async def drive_streams(args: argparse.Namespace, tally: Tally, held: list[Any]) -> None:
    started = time.monotonic()
    held += await open_all(lambda: CountingClient(tally), args.port, args.count, args.batch, tally)
    opened_s = time.monotonic() - started
    emit("opened", **tally.status(), failed=tally.errors.count, errors=tally.errors.kinds, seconds=round(opened_s, 3))
    payload = chat_request(args.port, {"x-mock-tokens": str(args.tokens), "x-mock-delay-ms": f"{args.delay_ms:g}"})
    expected = args.tokens + 2  # the role event, one per token, `[DONE]`
    tasks = await _spread([stream_one(client, payload, args.timeout, expected) for client in held], args.ramp_s)
    await asyncio.sleep(0)  # every task runs to its write
    emit("sent", requests=len(tasks), seconds=round(time.monotonic() - started - opened_s, 3))
    progress = asyncio.ensure_future(_progress(tally, args.progress_s))
    await asyncio.gather(*tasks)
    progress.cancel()
    emit("done", **tally.progress(), max_in_flight=tally.max_in_flight, max_streaming=tally.max_streaming,
         errors=tally.errors.kinds, events_per_stream={str(k): v for k, v in sorted(tally.events_per_stream.items())},
         ttft_ms=summary_ms(tally.ttft_ns), stream_ms=summary_ms(tally.total_ns),
         seconds=round(time.monotonic() - started, 3))
    await report_status(tally, args.progress_s)


async def _spread(coroutines: list[Coroutine[Any, Any, None]], ramp_s: float) -> list[asyncio.Future[None]]:
    """Start the coroutines evenly over `ramp_s` seconds (all at once when 0); return their tasks.

    Streams started in the same instant have their token timers in step too, so the backend and the
    proxy get every stream's next event in one burst per token interval; a ramp spreads them out.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for i, coroutine in enumerate(coroutines):
        wait = started + ramp_s * i / len(coroutines) - loop.time()
        if wait > 0.005:  # sleep in slices of at least a few ms: one sleep per stream would cost more than it spreads
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(coroutine))
    return tasks


async def _progress(tally: Tally, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        emit("progress", **tally.progress())


async def _parent_gone(parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_S)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tally, held = Tally(), []
    mode: Callable[[argparse.Namespace, Tally, list[Any]], Awaitable[None]] = (
        hold_idle if args.mode == "idle" else drive_streams)
    work = asyncio.ensure_future(mode(args, tally, held))
    stopped = asyncio.ensure_future(stop.wait())
    parent = asyncio.ensure_future(_parent_gone(os.getppid()))
    done, _ = await asyncio.wait([work, stopped, parent], timeout=args.max_seconds,
                                 return_when=asyncio.FIRST_COMPLETED)
    reason = "signal" if stopped in done else "parent gone" if parent in done else "max-seconds"
    if work in done:
        work.result()  # a crash of the work itself: let it show in the traceback
    for task in (work, stopped, parent):
        task.cancel()
    tally.closing = True
    still_open = tally.open
    for protocol in held:
        protocol.close()
    await asyncio.sleep(0)
    emit("closed", reason=reason, closed_by_peer=tally.closed_by_peer, closed_by_us=still_open)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.holder", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("idle", "streams"))
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 to connect to")
    parser.add_argument("--count", type=int, required=True, help="connections (and streams) to open")
    parser.add_argument("--batch", type=int, default=256, help="connects in flight at a time (default 256)")
    parser.add_argument("--tokens", type=int, default=64, help="streams: x-mock-tokens (default 64)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="streams: x-mock-delay-ms (default 50)")
    parser.add_argument("--timeout", type=float, default=120.0, help="streams: per-stream timeout (default 120 s)")
    parser.add_argument("--ramp-s", type=float, default=0.0,
                        help="streams: spread the requests over this many seconds once all are connected (default 0)")
    parser.add_argument("--progress-s", type=float, default=0.5, help="seconds between progress lines")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="close everything and exit after this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
