"""A tiny TCP load balancer that sends new connections only to upstreams whose GET /ready answers 200.

It stands for what Kubernetes puts in front of the proxy's pods (kube-proxy with the readiness gate, or a
cloud load balancer probing /ready) in the rolling-restart test: one asyncio task per upstream polls /ready,
each accepted client connection goes round robin to an upstream that was ready at the last poll, and the bytes
are relayed both ways until either side closes. It writes down what it saw, with loop timestamps: every probe
outcome (an HTTP status, or "refused" when the upstream no longer accepts) and every connection it placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

REFUSED = "refused"  # a probe's outcome when the TCP connect fails
PROBE = b"GET /ready HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"
PROBE_TIMEOUT = 2.0
COPY_SIZE = 64 * 1024


@dataclass(slots=True)
class Placement:
    """One client connection: where it went, whether the upstream accepted it, when it ended."""

    upstream: str | None  # None: no upstream was ready
    accepted_at: float
    connected: bool = False
    closed_at: float | None = None


@dataclass(slots=True)
class Upstream:
    name: str
    port: int
    ready: bool = False
    probes: list[tuple[float, int | str]] = field(default_factory=list)  # (time, status or REFUSED)

    def first(self, outcome: int | str, after: float = 0.0) -> float | None:
        """The time of the first probe at or after `after` with this outcome, or None."""
        return next((at for at, seen in self.probes if seen == outcome and at >= after), None)


class ReadyBalancer:
    def __init__(self, upstreams: dict[str, int], poll_interval: float = 0.1) -> None:
        self.upstreams = {name: Upstream(name, port) for name, port in upstreams.items()}
        self.poll_interval = poll_interval
        self.placements: list[Placement] = []
        self._turn = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        for upstream in self.upstreams.values():
            self._spawn(self._poll(upstream))
        self._server = await asyncio.start_server(self._place, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing = True  # a poller whose cancel Python 3.11's wait_for swallowed still stops at its next turn
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=PROBE_TIMEOUT + 1)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Readiness ------------------------------------------------------------------------------------------------

    async def _poll(self, upstream: Upstream) -> None:
        while not self._closing:
            outcome = await self._probe(upstream.port)
            upstream.probes.append((self._clock(), outcome))
            upstream.ready = outcome == 200
            await asyncio.sleep(self.poll_interval)

    @staticmethod
    async def _probe(port: int) -> int | str:
        """The status of GET /ready, or REFUSED if the connection is refused (or fails otherwise)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), PROBE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return REFUSED
        try:
            writer.write(PROBE)
            status_line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
            return int(status_line.split()[1])
        except (OSError, asyncio.TimeoutError, IndexError, ValueError):
            return 0  # answered, but not with a status: not ready
        finally:
            writer.close()

    # Placing and relaying connections ---------------------------------------------------------------------------

    def _choose(self) -> Upstream | None:
        ready = [upstream for upstream in self.upstreams.values() if upstream.ready]
        return ready[next(self._turn) % len(ready)] if ready else None

    async def _place(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream = self._choose()
        placement = Placement(upstream.name if upstream else None, self._clock())
        self.placements.append(placement)
        try:
            if upstream is None:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream.port)
            except OSError:
                return
            placement.connected = True
            try:
                await asyncio.gather(_copy(client_reader, up_writer), _copy(up_reader, client_writer))
            finally:
                up_writer.close()
        finally:
            placement.closed_at = self._clock()
            client_writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay until EOF, then half-close the other side (a client's request is done; the response goes on)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(COPY_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
