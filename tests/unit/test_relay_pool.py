"""The relay and the pool driven in-process with fake transports: states that are hard to time over sockets."""

from __future__ import annotations

import asyncio

import pytest

from llmproxy.config.model import BackendConfig, Config, HealthCheckConfig, LoggingConfig, ServerConfig
from llmproxy.connection import ClientConnection
from llmproxy.errors import ProxyError
from llmproxy.server import ProxyServer
from llmproxy.upstream.connection import UpstreamConnection

BODY = b'{"model":"m","messages":[]}'
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class FakeTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.reading = True
        self.closed = self.aborted = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, key: str) -> object:
        return ("127.0.0.1", 1) if key == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


async def _server(**server_options) -> tuple[ProxyServer, UpstreamConnection]:
    config = Config(server=ServerConfig(host="127.0.0.1", port=0, **server_options),
                    backends=[BackendConfig(url="x", name="b", host="127.0.0.1", port=1, max_connections=1,
                                            type="vllm", models=["m"])],
                    health_check=HealthCheckConfig(enabled=False),
                    logging=LoggingConfig(access_log="off"))
    server = ProxyServer(config)
    await server.start_services()
    pool = server.services.fleet.backends[0].pool
    upstream = UpstreamConnection()
    upstream.connection_made(FakeTransport())
    upstream.idle_since = 1e18
    pool.open_count = 1
    pool._idle.append(upstream)  # one warm pooled connection
    return server, upstream


def _client(server: ProxyServer) -> ClientConnection:
    client = ClientConnection(server.clients)
    client.connection_made(FakeTransport())
    return client


def test_a_connection_paused_for_a_slow_client_goes_back_to_the_pool_reading():
    asyncio.run(_paused_connection_goes_back_reading())


async def _paused_connection_goes_back_reading() -> None:
    server, upstream = await _server()
    client = _client(server)
    client.data_received(REQUEST)
    client.pause_writing()  # the client stops reading: the relay pauses the backend
    assert not upstream.transport.is_reading()
    upstream.data_received(RESPONSE)  # ...but the whole response was already in that read
    await asyncio.sleep(0)
    assert server.services.fleet.backends[0].pool.idle_count == 1
    assert upstream.transport.is_reading(), "a paused connection in the pool would hang the next request"


def test_closing_with_unsent_data_is_bounded_by_the_write_timeout():
    asyncio.run(_close_is_bounded())


async def _close_is_bounded() -> None:
    server, _ = await _server()
    server.settings.timeouts.write = 0.05
    client = _client(server)
    client.transport.buffered = 10_000  # the client never reads what we wrote
    client.close_if_idle()
    assert client.transport.closed and not client.transport.aborted
    await asyncio.sleep(0.1)
    assert client.transport.aborted


def test_dead_pool_waiters_do_not_count_against_max_waiters():
    asyncio.run(_dead_waiters())


async def _dead_waiters() -> None:
    server, upstream = await _server()
    pool = server.services.fleet.backends[0].pool
    pool._idle.clear()  # the only connection is in use
    pool.backend.max_waiters = 1
    pool.connect_timeout = 0.05
    with pytest.raises(ProxyError) as first:
        await pool.acquire()
    assert first.value.kind == "pool_exhausted"
    waiting = asyncio.ensure_future(pool.acquire())  # the slot is free again: this one may wait
    await asyncio.sleep(0)
    pool.checked_out += 1
    pool.release(upstream, True)  # handed straight to the waiter
    assert await asyncio.wait_for(waiting, 1) is upstream
