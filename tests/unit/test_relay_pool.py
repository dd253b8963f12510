"""The relay and the pool driven in-process with fake transports: states that are hard to time over sockets.

(The bound on closing a client connection that does not read is the client connection's: test_connection.py.)
"""

from __future__ import annotations

import pytest

from llmproxy.errors import ProxyError
from tests.fakes import OK, Client, backend, chat, make_clients, make_config, make_services, running


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def test_a_connection_paused_for_a_slow_client_goes_back_to_the_pool_reading(loop):
    services = make_services(make_config(), loop)
    client = Client(make_clients(services, loop), loop)
    client.send(chat())
    [upstream] = loop.upstreams
    client.conn.pause_writing()  # the client stops reading: the relay pauses the backend
    assert not upstream.transport.is_reading()
    upstream.send(OK)  # ...but the whole response was already in that read
    [b] = services.fleet.backends
    assert b.pool.idle_count == 1
    assert upstream.transport.is_reading(), "a paused connection in the pool would hang the next request"
    client.send(chat())
    assert loop.upstreams == [upstream] and upstream.received.count(b"POST ") == 2


def test_dead_pool_waiters_do_not_count_against_max_waiters(loop):
    services = make_services(make_config(backends=[backend("a", max_connections=1, max_waiters=1,
                                                           timeouts={"connect": 0.05})]), loop)
    pool = services.fleet.backends[0].pool
    in_use = loop.run_until_complete(pool.acquire())  # the only connection the pool may open
    timed_out = loop.create_task(pool.acquire())
    loop.run_ready()
    refused = loop.create_task(pool.acquire())  # one waiter already: no room for a second
    loop.run_ready()
    assert refused.exception().kind == "pool_exhausted"
    loop.advance(0.05)
    assert isinstance(timed_out.exception(), ProxyError) and timed_out.exception().kind == "pool_exhausted"
    waiting = loop.create_task(pool.acquire())  # the timed-out waiter is gone: this one may wait
    loop.run_ready()
    assert not waiting.done()
    pool.release(in_use, True)  # handed straight to the waiter
    loop.run_ready()
    assert waiting.result() is in_use and pool.checked_out == 1


def test_a_connect_that_completes_as_the_client_leaves_is_not_leaked(loop):
    """The connect finishes, and in the same loop iteration (before the pipeline resumes) the client's
    connection_lost cancels the request: the new upstream connection must be kept or closed, not dropped open."""
    services = make_services(make_config(), loop)
    loop.hang("a")
    client = Client(make_clients(services, loop), loop)
    client.send(chat())
    [held] = loop.held_connects
    held.set_result(None)
    loop.run_one()  # the connect task ends: the pipeline's next step is scheduled, not run
    [upstream] = loop.upstreams
    client.conn.connection_lost(None)  # the client's disconnect, processed before that step
    loop.run_ready()
    pool = services.fleet.backends[0].pool
    [ctx] = services.access_log.requests
    assert ctx.status == 499
    assert upstream.transport.is_closing() or pool.idle_count == 1, "an open connection nobody will ever close"
    assert pool.open_count == pool.idle_count + pool.checked_out
