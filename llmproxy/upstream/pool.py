"""Connection pool for one backend: a LIFO idle deque, an optional cap on open connections, bounded waiters.

A connection goes back to the pool only after a clean end of both request and response; anything else
(client gone, error, timeout, close-delimited body) closes it. The most recently used idle connection
is reused first (warm, least likely to have hit the backend's keep-alive timeout), and connections idle
longer than `idle_timeout` are closed before the backend closes them (vLLM's uvicorn closes at 5 s).

By default nothing waits here: no cap on connections, and no queue (a backend's `max_concurrent` adds one,
upstream/queue.py, taken before a connection and given back with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque

from llmproxy.config.model import BackendConfig
from llmproxy.errors import LOCAL_EXHAUSTION_ERRNOS, ProxyError
from llmproxy.upstream.connection import UpstreamConnection
from llmproxy.upstream.queue import ConcurrencyQueue

SWEEP_INTERVAL = 1.0


class UpstreamPool:
    __slots__ = ("_closed", "_idle", "_loop", "_new_connection", "_ssl", "_sweeper", "_waiters", "backend",
                 "checked_out", "connect_timeout", "open_count", "queue")

    def __init__(self, backend: BackendConfig, connect_timeout: float, max_header_size: int = 32 * 1024) -> None:
        """`max_header_size` bounds a response head (server.max_header_size): over it is a protocol error."""
        self.backend = backend
        self.connect_timeout = connect_timeout
        self._new_connection = lambda: UpstreamConnection(max_header_size)
        self._loop = asyncio.get_running_loop()
        self._idle: deque[UpstreamConnection] = deque()
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self.open_count = 0  # idle + checked out + connecting
        self.checked_out = 0
        self._closed = False
        self._ssl = _ssl_context(backend) if backend.scheme == "https" else None
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
        limit = backend.max_concurrent
        self.queue = (None if limit is None else
                      ConcurrencyQueue(backend.name, limit, backend.max_waiters, backend.queue_timeout))

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self) -> UpstreamConnection:
        """Return a connection checked out for one exchange; raises ProxyError on failure or overload."""
        queue = self.queue
        if queue is not None:
            await queue.enter()
        try:
            conn = self._pop_idle()
            cap = self.backend.max_connections
            while conn is None:
                if cap is None or self.open_count < cap:
                    conn = await self._connect()
                else:
                    conn = await self._wait_for_release()  # a connection, or None: a slot opened up
                    if conn is not None and conn.closed:
                        self._close(conn)  # died in the hand-over: its slot is free again
                        conn = None
        except BaseException:
            if queue is not None:
                queue.leave()
            raise
        self.checked_out += 1
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give back a checked-out connection (and its queue slot); it is kept only if `reusable`."""
        if self.queue is not None:
            self.queue.leave()
        self.checked_out -= 1
        self._put_back(conn, reusable)

    def _put_back(self, conn: UpstreamConnection, reusable: bool) -> None:
        """On to a waiter, or idle, if `reusable` and still good; else closed."""
        conn.detach()
        if reusable and not self._closed and not conn.closed and conn.transport.is_reading():
            conn.reused = True
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)  # handed over: the waiter counts it when acquire() returns
                    return
            max_idle = self.backend.max_idle
            if max_idle is None or len(self._idle) < max_idle:
                conn.idle_since = self._loop.time()
                self._idle.append(conn)
                return
        self._close(conn)

    def close(self) -> None:
        """Close idle connections and stop the sweeper (checked-out ones close when released)."""
        self._closed = True
        self._sweeper.cancel()
        while self._idle:
            self._close(self._idle.pop())

    # internals ------------------------------------------------------------------------------------

    def _pop_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        deadline = self._loop.time() - self.backend.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                return conn
            self._close(conn)
        return None

    def _close(self, conn: UpstreamConnection) -> None:
        self.open_count -= 1
        conn.abort()  # never a graceful close: a half-read response must stop the backend now
        self._wake_one_waiter()

    async def _wait_for_release(self) -> UpstreamConnection | None:
        # Timeouts use call_later, not asyncio.wait_for: the pipeline runs outside a Task (eager.py), and
        # since Python 3.12 wait_for refuses to run there.
        if len(self._waiters) >= self.backend.max_waiters:
            raise ProxyError("pool_exhausted", f"backend {self.backend.name}: too many requests waiting")
        waiter: asyncio.Future[UpstreamConnection | None] = self._loop.create_future()
        self._waiters.append(waiter)
        timer = self._loop.call_later(self.connect_timeout, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                # Handed over in the same moment the wait was cancelled: on to the next waiter, or idle, rather
                # than leaked. Not counted as checked out, and its queue slot is acquire()'s to give back.
                self._put_back(waiter.result(), True)
            raise
        except TimeoutError:
            raise ProxyError("pool_exhausted", f"backend {self.backend.name}: no connection free") from None
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)  # a dead waiter must not count against max_waiters

    async def _connect(self) -> UpstreamConnection:
        backend = self.backend
        self.open_count += 1
        connecting = asyncio.ensure_future(self._loop.create_connection(
            self._new_connection, backend.host, backend.port, ssl=self._ssl,
            server_hostname=backend.host if self._ssl else None))
        timed_out: list[bool] = []  # set by the timer, to tell its cancellation from the caller's

        def on_timeout() -> None:
            timed_out.append(True)
            connecting.cancel()

        timer = self._loop.call_later(self.connect_timeout, on_timeout)
        try:
            _, conn = await connecting
        except asyncio.CancelledError:
            self._connect_failed()
            if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
                # The connect completed in the same moment the request was cancelled (its client left):
                # nobody will use this connection, so it must not stay open.
                connecting.result()[1].abort()
            if timed_out:
                raise ProxyError("connect_timeout", f"backend {backend.name}: connect timed out") from None
            raise
        except OSError as exc:
            self._connect_failed()
            if exc.errno in LOCAL_EXHAUSTION_ERRNOS:
                # Our own limits (file descriptors, buffers), not the backend's fault: no retry elsewhere
                # would help, and the backend must not be ejected for it.
                raise ProxyError("out_of_resources", f"proxy cannot open a connection: {exc.strerror}") from None
            raise ProxyError("connect_failed", f"backend {backend.name}: {exc.strerror or exc}") from None
        except BaseException:
            self._connect_failed()
            raise
        finally:
            timer.cancel()
        if conn.closed:
            # Reset between the handshake and now (a killed server resets what waited in its accept
            # queue): writing to it would raise. Nothing was sent, so the pipeline may retry elsewhere.
            self._connect_failed()
            raise ProxyError("upstream_failed", f"backend {backend.name}: connection reset on connect")
        return conn

    def _connect_failed(self) -> None:
        self.open_count -= 1
        self._wake_one_waiter()

    def _wake_one_waiter(self) -> None:
        """A slot opened up: let the first live waiter connect instead of waiting for a release."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        deadline = self._loop.time() - self.backend.idle_timeout
        idle = self._idle
        # Oldest first: the left end of the deque has been idle the longest.
        while idle and (idle[0].closed or idle[0].idle_since <= deadline):
            self._close(idle.popleft())
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _ssl_context(backend: BackendConfig) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not backend.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
