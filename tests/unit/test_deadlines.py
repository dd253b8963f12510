"""First-byte and stream-idle deadlines (deadlines.py): the tick, the sweeper, and the deadlines it fires.

The sweeper runs on the FakeLoop's clock; the deadlines are those of real exchanges (relay.py) of requests
sent by a Client through the real pipeline to a fake backend that answers late or stops mid-stream.
"""

from __future__ import annotations

import pytest

from llmproxy.deadlines import MAX_TICK, MIN_TICK, DeadlineSweeper, tick_for
from llmproxy.services import Services
from tests.fakes import (
    STREAM_HEAD,
    Client,
    FakeLoop,
    backend,
    chat,
    chunk,
    make_clients,
    make_config,
    make_services,
    running,
)

EVENT = chunk(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


# --- the tick -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("timeouts", "tick"), [
    ([300.0, 300.0], MAX_TICK),  # at most a second late, however long the timeouts
    ([4.0], MAX_TICK),
    ([2.0, 300.0], 0.5),  # a quarter of the shortest
    ([300.0, 0.3], 0.075),
    ([0.1], MIN_TICK),  # never busier than 20 ticks a second
    ([0.001, 50.0], MIN_TICK),
])
def test_the_tick_is_a_quarter_of_the_shortest_timeout_within_bounds(timeouts, tick):
    assert tick_for(timeouts) == pytest.approx(tick)


# --- the sweeper --------------------------------------------------------------------------------------------


class Watched:
    """An exchange as the sweeper sees it: told the time on every tick."""

    def __init__(self, sweeper: DeadlineSweeper | None = None) -> None:
        self.checked: list[float] = []
        self.sweeper = sweeper  # set: it leaves the set when first checked, as an exchange whose deadline fired

    def check_deadlines(self, now: float) -> None:
        self.checked.append(now)
        if self.sweeper is not None:
            self.sweeper.active.discard(self)


def test_the_sweeper_tells_every_watched_exchange_the_loop_time_once_per_tick(loop):
    sweeper = DeadlineSweeper(loop, 0.25)
    start = loop.now
    first, second = Watched(), Watched()
    sweeper.active |= {first, second}
    loop.advance(0.24)
    assert first.checked == []
    loop.advance(0.77)  # ticks at 0.25, 0.5, 0.75, 1.0
    assert first.checked == second.checked == [start + 0.25, start + 0.5, start + 0.75, start + 1.0]


def test_an_exchange_that_left_the_set_is_not_checked_any_more(loop):
    sweeper = DeadlineSweeper(loop, 0.5)
    watched = Watched()
    sweeper.active.add(watched)
    loop.advance(1.0)
    sweeper.active.discard(watched)
    loop.advance(10.0)
    assert len(watched.checked) == 2


def test_exchanges_may_leave_the_set_during_a_tick(loop):
    sweeper = DeadlineSweeper(loop, 0.5)
    leaving = [Watched(sweeper) for _ in range(3)]
    staying = Watched()
    sweeper.active |= {*leaving, staying}
    loop.advance(1.0)
    assert [len(w.checked) for w in leaving] == [1, 1, 1] and len(staying.checked) == 2
    assert sweeper.active == {staying}


def test_a_closed_sweeper_ticks_no_more(loop):
    sweeper = DeadlineSweeper(loop, 0.5)
    watched = Watched()
    sweeper.active.add(watched)
    loop.advance(0.5)
    sweeper.close()
    loop.advance(5.0)
    assert len(watched.checked) == 1 and loop.timers_for("_tick") == []


# --- deadlines of real exchanges ----------------------------------------------------------------------------


def proxy(loop: FakeLoop, backend_timeouts: dict | None = None, **timeouts: float) -> tuple[Client, Services]:
    options = {"timeouts": backend_timeouts} if backend_timeouts else {}
    services = make_services(make_config(backends=[backend("a", **options)], server={"timeouts": timeouts}), loop)
    return Client(make_clients(services, loop), loop), services


@pytest.mark.parametrize(("server_first_byte", "backend_first_byte", "deadline", "tick"), [
    (4.0, None, 4.0, 1.0),
    (10.0, 2.0, 2.0, 0.5),  # a backend's own timeout wins, and sets the tick
])
def test_a_backend_that_sends_nothing_in_time_gets_the_request_answered_504(loop, server_first_byte,
                                                                             backend_first_byte, deadline, tick):
    overrides = {"first_byte": backend_first_byte} if backend_first_byte else None
    client, services = proxy(loop, overrides, first_byte=server_first_byte)
    client.send(chat())
    [upstream] = loop.upstreams
    loop.advance(deadline - 0.01)
    assert client.transport.data == b"" and not upstream.transport.aborted
    loop.advance(tick + 0.02)  # fired on the first tick at or after the deadline
    [reply] = client.responses()
    assert (reply.status, reply.json()["error"]["code"]) == (504, "upstream_first_byte_timeout")
    assert upstream.transport.aborted and not services.relay.sweeper.active
    [ctx] = services.access_log.requests
    assert ctx.termination == "sH"


def test_a_response_head_stops_the_first_byte_deadline(loop):
    client, _ = proxy(loop, first_byte=2.0, stream_idle=300.0)
    client.send(chat(stream=True))
    loop.upstreams[0].send(STREAM_HEAD + EVENT)
    loop.advance(60)  # long past the first-byte timeout, well within stream_idle
    assert not client.transport.aborted and not loop.upstreams[0].transport.aborted
    [reply] = client.responses()
    assert reply.status == 200 and not reply.complete


def test_a_stream_that_keeps_coming_is_never_idle_and_one_that_stops_is_cut(loop):
    client, services = proxy(loop, stream_idle=2.0)  # tick 0.5
    client.send(chat(stream=True))
    [upstream] = loop.upstreams
    upstream.send(STREAM_HEAD + EVENT)
    for _ in range(8):
        loop.advance(1.5)  # 12 s of a stream whose pauses are all shorter than stream_idle
        upstream.send(EVENT)
    loop.advance(1.9)
    assert not client.transport.aborted
    loop.advance(1.1)  # idle is measured from the tick that saw the last progress: at most one tick late
    assert client.transport.aborted and upstream.transport.aborted
    [reply] = client.responses()
    assert reply.status == 200 and not reply.complete  # truncated, not a clean end
    [ctx] = services.access_log.requests
    assert (ctx.termination, ctx.error_message) == ("sD", "backend stream idle timeout")
    assert not services.relay.sweeper.active


def test_a_client_that_stops_reading_does_not_make_the_backend_idle(loop):
    client, _ = proxy(loop, stream_idle=2.0, write=30.0)
    client.send(chat(stream=True))
    [upstream] = loop.upstreams
    upstream.send(STREAM_HEAD + EVENT)
    client.conn.pause_writing()  # the relay stops reading the backend, so nothing can arrive
    loop.advance(20)
    assert not client.transport.aborted and not upstream.transport.aborted
    client.conn.resume_writing()
    loop.advance(1.9)
    assert not client.transport.aborted
    loop.advance(1.1)
    assert client.transport.aborted  # idle again, and now it is the backend's
