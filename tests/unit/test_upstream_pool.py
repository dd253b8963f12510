"""The connection pool of one backend (upstream/pool.py) on the fake network and the fake clock.

A pool is built on a BackendConfig from the real parser; its connects go to the FakeLoop's network, which a
test makes refuse, hang or reset (tests/fakes.py). Checked-out connections are given back by hand, as the
pipeline does after an exchange. The last tests go through the whole proxy for what only shows there.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from llmproxy.errors import ProxyError
from llmproxy.upstream.connection import UpstreamConnection
from llmproxy.upstream.pool import SWEEP_INTERVAL, UpstreamPool
from tests.fakes import (
    OK,
    Client,
    FakeLoop,
    RecordingSink,
    backend,
    chat,
    make_clients,
    make_config,
    make_services,
    running,
)


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def pool_for(loop: FakeLoop, connect_timeout: float = 1.0, **options) -> UpstreamPool:
    """A pool for backend "a" with the given backend options (max_connections, idle_timeout...)."""
    return UpstreamPool(make_config(backends=[backend("a", **options)]).backends[0], connect_timeout)


def take(loop: FakeLoop, pool: UpstreamPool) -> UpstreamConnection:
    """A connection acquired without waiting (an idle one, or a connect that completes at once)."""
    task = acquiring(loop, pool)
    assert task.done(), "the acquire waits"
    return task.result()


def acquiring(loop: FakeLoop, pool: UpstreamPool) -> asyncio.Task:
    """An acquire, run as far as it goes."""
    task = loop.create_task(pool.acquire())
    loop.run_ready()
    return task


def accounted(pool: UpstreamPool) -> bool:
    """Every connection the pool counts as open is idle or checked out (none connecting)."""
    return pool.open_count == pool.idle_count + pool.checked_out


# --- reuse ---------------------------------------------------------------------------------------------------


def test_the_most_recently_released_connection_is_reused_first(loop):
    pool = pool_for(loop)
    first, second, third = (take(loop, pool) for _ in range(3))
    assert len(loop.connects) == 3 and not any(c.reused for c in (first, second, third))
    for conn in (first, second, third):
        pool.release(conn, True)
    assert (pool.idle_count, pool.checked_out) == (3, 0)
    assert [take(loop, pool) for _ in range(3)] == [third, second, first]
    assert len(loop.connects) == 3 and all(c.reused for c in (first, second, third))
    assert (pool.open_count, pool.checked_out, pool.idle_count) == (3, 3, 0)


@pytest.mark.parametrize(("case", "kept"), [
    ("reusable", True),
    ("not-reusable", False),
    ("dead", False),  # closed by the backend while checked out
    ("not-reading", False),  # paused for a slow client and never resumed
    ("pool-closed", False),
    ("over-max-idle", False),
])
def test_a_released_connection_is_kept_only_if_reusable_reading_and_within_max_idle(loop, case, kept):
    pool = pool_for(loop, max_idle=1)
    other, conn = take(loop, pool), take(loop, pool)
    if case == "dead":
        conn.connection_lost(None)
    elif case == "not-reading":
        conn.transport.pause_reading()
    elif case == "pool-closed":
        pool.close()
    elif case == "over-max-idle":
        pool.release(other, True)
    pool.release(conn, case != "not-reusable")
    assert conn.transport.is_closing() is not kept
    assert pool.idle_count == int(kept) + (case == "over-max-idle") and accounted(pool)
    if kept:
        assert take(loop, pool) is conn


# --- idle connections ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("idle_for", "closed_by_backend", "reused"), [
    (3.9, False, True),
    (4.0, False, False),  # idle_timeout: the backend (uvicorn: 5 s) may be closing it
    (0.1, True, False),
], ids=["within-idle-timeout", "at-idle-timeout", "closed-by-the-backend"])
def test_an_idle_connection_is_reused_only_if_fresh_and_alive(loop, idle_for, closed_by_backend, reused):
    pool = pool_for(loop, idle_timeout=4.0)
    idle = take(loop, pool)
    loop.advance(0.5)  # between two sweeps: only the acquire decides
    pool.release(idle, True)
    loop.advance(idle_for)
    if closed_by_backend:
        loop.upstreams[0].eof()
    conn = take(loop, pool)
    assert (conn is idle) is reused
    assert len(loop.connects) == (1 if reused else 2)
    assert idle.transport.is_closing() is not reused  # a stale one is closed here
    assert pool.open_count == 1 and accounted(pool)


def test_the_sweeper_closes_connections_idle_too_long_oldest_first_without_an_acquire(loop):
    pool = pool_for(loop, idle_timeout=4.0)
    older, newer = take(loop, pool), take(loop, pool)
    loop.advance(0.5)
    pool.release(older, True)  # idle from 0.5
    loop.advance(2.0)
    pool.release(newer, True)  # idle from 2.5
    assert loop.timers_for("_sweep") == [pytest.approx(0.5)]  # every SWEEP_INTERVAL
    loop.advance(2.4)  # 4.9: the sweep at 4 found both fresh
    assert pool.idle_count == 2
    loop.advance(SWEEP_INTERVAL)  # 5.9: the sweep at 5 found the older one idle 4.5 s
    assert older.transport.aborted and not newer.transport.is_closing() and pool.idle_count == 1
    loop.advance(2 * SWEEP_INTERVAL)  # 7.9: the sweep at 7 found the newer one idle 4.5 s
    assert newer.transport.aborted and (pool.idle_count, pool.open_count) == (0, 0)


def test_the_sweeper_closes_an_idle_connection_the_backend_closed(loop):
    pool = pool_for(loop, idle_timeout=4.0)
    conn = take(loop, pool)
    pool.release(conn, True)
    loop.upstreams[0].eof()
    loop.advance(SWEEP_INTERVAL)
    assert (pool.idle_count, pool.open_count) == (0, 0)


def test_close_closes_the_idle_connections_stops_the_sweeper_and_closes_the_others_on_release(loop):
    pool = pool_for(loop)
    idle, busy = take(loop, pool), take(loop, pool)
    pool.release(idle, True)
    pool.close()
    assert idle.transport.aborted and pool.idle_count == 0
    assert loop.timers_for("_sweep") == []
    assert not busy.transport.is_closing()  # its exchange goes on
    pool.release(busy, True)
    assert busy.transport.aborted and pool.open_count == 0


# --- no cap by default ---------------------------------------------------------------------------------------


def test_by_default_the_pool_opens_a_connection_for_every_request_and_keeps_them_all_idle(loop):
    pool = pool_for(loop)
    assert pool.queue is None  # no max_concurrent: nothing on the path
    held = [take(loop, pool) for _ in range(1500)]  # beyond the old default cap of 1,024: nobody waits
    assert len(loop.connects) == 1500 and pool.checked_out == 1500
    for conn in held:
        pool.release(conn, True)
    assert (pool.idle_count, pool.open_count) == (1500, 1500)


# --- max_concurrent: a deliberate queue ----------------------------------------------------------------------


def queue_counts(pool: UpstreamPool) -> tuple[int, int, int]:
    """(slots in use, requests queued, admissions observed in the wait histogram)."""
    return pool.queue.in_use, pool.queue.queued, sum(pool.queue.waits.counts)


def test_past_max_concurrent_a_request_waits_in_order_and_its_wait_is_observed(loop):
    pool = pool_for(loop, max_concurrent=2)
    first, second = take(loop, pool), take(loop, pool)
    third, fourth = acquiring(loop, pool), acquiring(loop, pool)
    assert not third.done() and not fourth.done() and len(loop.connects) == 2
    assert queue_counts(pool) == (2, 2, 2)  # the two admitted at once are observed, with a wait of 0
    loop.advance(0.3)
    pool.release(first, True)
    loop.run_ready()
    assert third.result() is first and not fourth.done()  # first come, first served
    assert queue_counts(pool) == (2, 1, 3)
    assert pool.queue.waits.sum == pytest.approx(0.3)
    pool.release(second, False)  # not reusable: the slot moves on all the same, with a new connection
    loop.run_ready()
    assert fourth.done() and len(loop.connects) == 3 and queue_counts(pool) == (2, 0, 4)
    for task in (third, fourth):
        pool.release(task.result(), True)
    assert queue_counts(pool) == (0, 0, 4) and accounted(pool)


def test_a_queued_request_gives_up_after_queue_timeout_and_past_max_waiters_one_is_refused(loop):
    pool = pool_for(loop, max_concurrent=1, max_waiters=1, queue_timeout="2s")
    take(loop, pool)
    waiting, refused = acquiring(loop, pool), acquiring(loop, pool)
    assert refused.exception().kind == "pool_exhausted"
    assert "too many requests queued" in refused.exception().message
    loop.advance(1.9)
    assert not waiting.done()
    loop.advance(0.2)
    error = waiting.exception()
    assert (error.kind, error.retry_condition) == ("pool_exhausted", "connect_error")  # another backend may serve it
    assert "waited 2s in the queue" in error.message
    assert queue_counts(pool) == (1, 0, 1) and loop.timers_for("_expire") == []


def test_a_slot_handed_to_a_queued_request_that_was_cancelled_goes_to_the_next(loop):
    pool = pool_for(loop, max_concurrent=1)
    held = take(loop, pool)
    cancelled, next_one = acquiring(loop, pool), acquiring(loop, pool)
    pool.release(held, True)  # the slot is handed to the first waiter; its task has not resumed yet...
    cancelled.cancel()  # ...when its client leaves
    loop.run_ready()
    assert cancelled.cancelled() and next_one.result() is held
    assert queue_counts(pool)[:2] == (1, 0)


def test_a_connection_handed_to_a_cancelled_waiter_under_both_caps_frees_its_queue_slot_once(loop):
    pool = pool_for(loop, max_connections=1, max_concurrent=2)
    held = take(loop, pool)
    waiting = acquiring(loop, pool)  # a queue slot, then waits for the one connection
    pool.release(held, True)  # handed over; the waiter's task has not resumed yet...
    waiting.cancel()  # ...when its client leaves
    loop.run_ready()
    assert waiting.cancelled()
    assert (pool.idle_count, pool.checked_out) == (1, 0) and queue_counts(pool)[:2] == (0, 0)
    assert take(loop, pool) is held


def test_a_failed_connect_gives_its_queue_slot_back(loop):
    pool = pool_for(loop, max_concurrent=1)
    loop.hang("a")
    connecting, waiting = acquiring(loop, pool), acquiring(loop, pool)
    loop.held_connects[0].set_exception(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    loop.run_ready()
    assert connecting.exception().kind == "connect_failed"
    assert queue_counts(pool)[:2] == (1, 0) and len(loop.held_connects) == 2  # the waiter got the slot
    loop.held_connects[1].set_result(None)
    loop.run_ready()
    pool.release(waiting.result(), True)
    assert queue_counts(pool)[:2] == (0, 0) and accounted(pool)


# --- the cap and its waiters ---------------------------------------------------------------------------------


def test_at_the_cap_a_request_waits_and_past_max_waiters_it_is_refused_at_once(loop):
    pool = pool_for(loop, max_connections=2, max_waiters=2)
    for _ in range(2):
        take(loop, pool)
    waiting = [acquiring(loop, pool), acquiring(loop, pool)]
    refused = acquiring(loop, pool)
    assert not any(task.done() for task in waiting)
    error = refused.exception()
    assert isinstance(error, ProxyError)
    assert (error.kind, error.message) == ("pool_exhausted", "backend a: too many requests waiting")
    assert error.retry_condition == "connect_error" and not error.backend_fault
    assert loop.connects == ["a", "a"] and pool.open_count == 2


def test_a_waiter_gives_up_after_the_connect_timeout(loop):
    pool = pool_for(loop, connect_timeout=0.5, max_connections=1)
    take(loop, pool)
    waiting = acquiring(loop, pool)
    loop.advance(0.49)
    assert not waiting.done()
    loop.advance(0.02)
    assert (waiting.exception().kind, waiting.exception().message) == ("pool_exhausted",
                                                                       "backend a: no connection free")
    assert loop.timers_for("_expire") == []


@pytest.mark.parametrize("reusable", [True, False])
def test_a_released_connection_goes_to_the_first_waiter_or_else_its_slot_does(loop, reusable):
    pool = pool_for(loop, max_connections=1)
    held = take(loop, pool)
    first, second = acquiring(loop, pool), acquiring(loop, pool)
    pool.release(held, reusable)
    loop.run_ready()
    assert first.done() and not second.done()
    assert (first.result() is held) is reusable  # else the waiter connected anew, in the closed one's place
    assert len(loop.connects) == (1 if reusable else 2)
    assert (pool.open_count, pool.checked_out, pool.idle_count) == (1, 1, 0)


def test_a_failed_connect_lets_the_first_waiter_connect(loop):
    pool = pool_for(loop, max_connections=1)
    loop.hang("a")
    connecting, waiting = acquiring(loop, pool), acquiring(loop, pool)
    loop.held_connects[0].set_exception(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    loop.run_ready()
    assert connecting.exception().kind == "connect_failed"
    assert len(loop.held_connects) == 2  # the waiter connects in its place
    loop.held_connects[1].set_result(None)
    loop.run_ready()
    assert waiting.result() is loop.upstreams[0].conn and accounted(pool)


def test_a_connection_handed_to_a_waiter_that_was_cancelled_is_kept_not_leaked(loop):
    pool = pool_for(loop, max_connections=1)
    held = take(loop, pool)
    waiting = acquiring(loop, pool)
    pool.release(held, True)  # handed over; the waiter's task has not resumed yet...
    waiting.cancel()  # ...when its client leaves
    loop.run_ready()
    assert waiting.cancelled()
    assert (pool.idle_count, pool.checked_out, pool.open_count) == (1, 0, 1)
    assert take(loop, pool) is held


def test_a_connection_that_died_in_the_hand_over_is_never_handed_out(loop):
    pool = pool_for(loop, max_connections=2)
    dying, other = take(loop, pool), take(loop, pool)
    waiting = acquiring(loop, pool)
    pool.release(dying, True)  # handed over...
    dying.connection_lost(None)  # ...and closed by the backend before the waiter resumes
    loop.run_ready()
    pool.release(other, True)
    loop.run_ready()
    conn = waiting.result()
    assert conn is not dying and not conn.closed


def test_the_slot_of_a_connection_that_died_in_the_hand_over_is_freed(loop):
    pool = pool_for(loop, max_connections=1)
    dying = take(loop, pool)
    waiting = acquiring(loop, pool)
    pool.release(dying, True)
    dying.connection_lost(None)
    loop.run_ready()
    assert waiting.done() and waiting.result() is not dying  # it connected anew
    assert loop.connects == ["a", "a"] and pool.open_count == 1 and accounted(pool)


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


# --- connecting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "kind", "retry_condition", "backend_fault"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connect_failed", "connect_error", True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "connect_failed", "connect_error", True),
    (OSError(errno.EMFILE, "Too many open files"), "out_of_resources", None, False),
    (OSError(errno.ENFILE, "Too many open files in system"), "out_of_resources", None, False),
    (OSError(errno.ENOBUFS, "No buffer space available"), "out_of_resources", None, False),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), "out_of_resources", None, False),
], ids=["refused", "unreachable", "emfile", "enfile", "enobufs", "enomem"])
def test_a_failed_connect_is_a_proxy_error_of_its_kind_and_frees_its_slot(loop, error, kind, retry_condition,
                                                                         backend_fault):
    pool = pool_for(loop)
    loop.refuse("a", error)
    failure = acquiring(loop, pool).exception()
    assert isinstance(failure, ProxyError)
    assert (failure.kind, failure.retry_condition, failure.backend_fault) == (kind, retry_condition, backend_fault)
    assert error.strerror in failure.message
    assert (pool.open_count, pool.checked_out) == (0, 0)


def test_a_connect_slower_than_the_connect_timeout_is_cancelled_as_a_connect_timeout(loop):
    pool = pool_for(loop, connect_timeout=0.5)
    loop.hang("a")
    task = acquiring(loop, pool)
    loop.advance(0.49)
    assert not task.done() and pool.open_count == 1
    loop.advance(0.02)
    error = task.exception()
    assert (error.kind, error.retry_condition, error.backend_fault) == ("connect_timeout", "connect_error", True)
    assert loop.held_connects[0].cancelled() and loop.upstreams == []
    assert pool.open_count == 0 and loop.timers_for("on_timeout") == []


def test_a_connection_reset_as_it_connects_is_an_upstream_failure_and_frees_its_slot(loop):
    pool = pool_for(loop)
    loop.reset_on_connect("a")
    error = acquiring(loop, pool).exception()
    assert (error.kind, error.message) == ("upstream_failed", "backend a: connection reset on connect")
    assert (pool.open_count, pool.checked_out) == (0, 0)


def test_a_connection_is_made_with_the_servers_head_limit(loop):
    pool = UpstreamPool(make_config().backends[0], 1.0, max_header_size=1024)
    conn = take(loop, pool)
    upstream = loop.upstreams[0]
    assert upstream.conn is conn and (upstream.host, upstream.port) == ("a", 8000)
    sink = RecordingSink(conn.body)
    conn.begin(sink, b"GET / HTTP/1.1\r\nhost: a:8000\r\n\r\n", False)
    upstream.send(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 1100 + b"\r\n\r\n")
    assert [event[:2] for event in sink.of("lost")] == [("lost", "upstream_protocol_error")]


# --- through the whole proxy ---------------------------------------------------------------------------------


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


def test_a_pooled_connection_serves_the_next_request_of_any_client(loop):
    services = make_services(make_config(), loop)
    clients = make_clients(services, loop)
    first, second = Client(clients, loop), Client(clients, loop)
    first.send(chat())
    loop.upstreams[0].send(OK)
    second.send(chat())
    loop.upstreams[0].send(OK)
    assert len(loop.upstreams) == 1 and [len(c.responses()) for c in (first, second)] == [1, 1]
