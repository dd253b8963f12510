"""The cache library (llmproxy/cache/): the key, the memory store, stored entries, flights and followers."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from llmproxy.cache import ResponseCache, asks_no_cache
from llmproxy.cache.entry import Entry, InvalidEntry
from llmproxy.cache.flight import CUT, FALLBACK, FOLLOWED, GONE, TRUNCATED, Flight, FlightHead, Follower
from llmproxy.cache.key import cache_key
from llmproxy.cache.memory import MemoryStore
from llmproxy.config.model import CacheStrategyConfig, CachingConfig, RouteMatchConfig

NOTHING = frozenset()
HEAD = FlightHead(200, [(b"content-type", b"text/event-stream")], True)


def key(body: dict[str, Any], path: str = "/v1/chat/completions", model: str | None = "m", tenant: str | None = None,
        ignore: frozenset[str] = NOTHING, method: bytes = b"POST", query: bytes = b"",
        headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    return cache_key(method, path, query, list(headers), model, body, tenant, ignore)


# --- the key ---------------------------------------------------------------------------------------------


def test_the_key_is_the_canonical_body_so_key_order_does_not_matter() -> None:
    assert key({"a": 1, "b": {"y": 2, "x": 1}}) == key({"b": {"x": 1, "y": 2}, "a": 1})


@pytest.mark.parametrize(("one", "other"), [
    ({"stream": True}, {"stream": False}),  # a stream and a whole body are different bytes
    ({"temperature": 0}, {"temperature": 0.5}),
    ({"messages": ["a"]}, {"messages": ["b"]}),
])
def test_what_changes_the_answer_changes_the_key(one: dict, other: dict) -> None:
    assert key(one) != key(other)


def test_the_path_the_model_and_the_tenant_are_part_of_the_key() -> None:
    body = {"messages": []}
    assert key(body, path="/v1/messages") != key(body)
    assert key(body, model="other") != key(body)
    assert key(body, tenant="key-a") != key(body, tenant="key-b")
    # the model as resolved: an alias in the body is replaced by its target
    assert key({"model": "alias", **body}, model="m") == key({"model": "m", **body}, model="m")


def test_the_method_the_query_and_the_api_version_headers_are_part_of_the_key() -> None:
    body = {"messages": []}
    assert key(body, method=b"PUT") != key(body)
    assert key(body, path="/v1/messages", query=b"beta=true") != key(body, path="/v1/messages")
    assert key(body, query=b"api-version=2024-06-01") != key(body, query=b"api-version=2024-10-21")
    for name in (b"anthropic-version", b"anthropic-beta"):
        assert key(body, headers=[(name, b"one")]) != key(body, headers=[(name, b"two")]) != key(body)
    assert key(body, headers=[(b"x-request-id", b"1")]) == key(body)  # other headers do not change the answer
    # Each part is length-prefixed: a part cannot run into the next (with a separator, "a\0" + "b" == "a" + "\0b")
    assert key(body, path="/v1/x", tenant="\0t") != key(body, path="/v1/x\0", tenant="t")


def test_ignored_fields_are_left_out_of_the_key() -> None:
    assert key({"user": "u1", "n": 1}, ignore=frozenset({"user"})) == key({"user": "u2", "n": 1},
                                                                           ignore=frozenset({"user"}))


@pytest.mark.parametrize(("value", "bypasses"), [
    (b"no-cache", True), (b"No-Store", True), (b"max-age=0, no-cache", True), (b"max-age=60", False)])
def test_cache_control_no_cache_or_no_store_bypasses(value: bytes, bypasses: bool) -> None:
    assert asks_no_cache([(b"cache-control", value)]) is bypasses


def test_only_requests_a_strategy_matches_are_planned_with_its_ttl() -> None:
    config = CachingConfig(enabled=True, default_ttl_seconds=60, strategies=[
        CacheStrategyConfig("det", RouteMatchConfig(path="/v1/chat/completions", json_body={"temperature": 0.0})),
        CacheStrategyConfig("long", RouteMatchConfig(path="/v1/chat/completions", json_body={"temperature": 0.0},
                                                     headers={"x-tier": "gold"}), ttl_seconds=86400)])

    async def plans() -> list[Any]:
        cache = ResponseCache(config, None, lambda: 0.0)
        ask = [(b"POST", [], {"temperature": 0}), (b"POST", [(b"x-tier", b"gold")], {"temperature": 0.0}),
               (b"POST", [], {"temperature": 0.7}), (b"POST", [], [1, 2])]
        return [cache.plan(method, "/v1/chat/completions", b"", headers, body, "m", None)
                for method, headers, body in ask]

    det, gold, random, not_json = asyncio.run(plans())
    assert (det.strategy, det.ttl) == ("det", 60)
    assert (gold.strategy, gold.ttl) == ("long", 86400)  # the most specific strategy, as routes
    assert random is None and not_json is None


# --- entries and the memory store ------------------------------------------------------------------------


def entry(body: bytes = b"x" * 100) -> Entry:
    return Entry(200, b"application/json", False, body, (3, 4, None, 1, "reported"), "a")


def test_an_entry_round_trips_through_its_encoding() -> None:
    original = Entry(200, b"text/event-stream", True, b"data: {}\n\ndata: [DONE]\n\n", (3, 4, 2, None, "reported"),
                     "a")
    assert Entry.decode(original.encode()) == original


GOOD_META = {"v": 2, "s": 200, "t": "application/json", "st": False, "u": [3, 4, None, 1, "reported"], "b": "a"}


@pytest.mark.parametrize("change", [
    {"v": 1}, {"v": None}, {"s": "200"}, {"s": True}, {"s": 99}, {"t": 5}, {"t": "text/html\r\nset-cookie: x=1"},
    {"t": "a\nb"}, {"t": "caf\u00e9"}, {"st": "yes"}, {"b": None}, {"u": "x"}, {"u": [1, 2]},
    {"u": [1, "2", None, None, "reported"]}, {"u": [1, 2, -1, None, "reported"]}, {"u": [1, 2, None, None, "wrong"]},
    {"u": [1, 2, None, True, "none"]},
])
def test_an_entry_another_process_wrote_is_checked_field_by_field(change: dict) -> None:
    assert Entry.decode(orjson.dumps(GOOD_META) + b"\nbody").usage == (3, 4, None, 1, "reported")
    with pytest.raises(InvalidEntry):
        Entry.decode(orjson.dumps({**GOOD_META, **change}) + b"\nbody")


@pytest.mark.parametrize("data", [b"", b"not json\n", b"[1, 2]\nbody", b'{"s": 200}\n'])
def test_a_value_that_is_not_an_entry_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidEntry):
        Entry.decode(data)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counted:
    def __init__(self) -> None:
        self.ops: dict[str, int] = {}

    def cache_bytes_counted(self, op: str, size: int) -> None:
        self.ops[op] = self.ops.get(op, 0) + size


def test_the_memory_store_evicts_the_least_recently_used_within_its_bound() -> None:
    clock, counted = Clock(), Counted()
    one = entry().size + 32
    store = MemoryStore(3 * one, clock, counted)

    async def run() -> list[bool]:
        for name in (b"a", b"b", b"c"):
            store.put(name.ljust(32, b"-"), entry(), 60)
        await store.get(b"a".ljust(32, b"-"))  # a is used: b is now the least recent
        store.put(b"d".ljust(32, b"-"), entry(), 60)
        return [await store.get(name.ljust(32, b"-")) is not None for name in (b"a", b"b", b"c", b"d")]

    assert asyncio.run(run()) == [True, False, True, True]
    assert store.size == 3 * one and counted.ops == {"stored": 4 * one, "evicted": one}


def test_the_memory_store_bound_holds_under_10000_answers_and_expires_them() -> None:
    clock, counted = Clock(), Counted()
    store = MemoryStore(64 * 1024, clock, counted)
    for i in range(10_000):
        store.put(b"%032d" % i, entry(b"y" * (i % 500)), 10)
        assert store.size <= 64 * 1024
    assert counted.ops["stored"] - counted.ops["evicted"] == store.size
    clock.now = 11
    assert asyncio.run(store.get(b"%032d" % 9_999)) is None  # past its TTL
    kept = len(store)
    store.put(b"too-big".ljust(32), entry(b"z" * 70_000), 10)  # larger than the whole store: not kept
    assert asyncio.run(store.get(b"too-big".ljust(32))) is None and len(store) == kept


# --- flights and followers -------------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


class FakeClient:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.writing_paused = False
        self.aborted = self.was_reset = False

    def abort(self) -> None:
        self.aborted = True

    def reset(self) -> None:
        self.was_reset = True

    @property
    def body(self) -> bytes:
        return b"".join(self.transport.written)


def follower(client: FakeClient, max_lag: float = 1000) -> Follower:
    return Follower(client, lambda head: b"HEAD%d|" % head.status, max_lag, 30.0)


def read(shared: Flight, chunks: list[bytes]) -> None:
    """One upstream read's chunks, handed on as the leader's relay does (recording.py)."""
    if shared.chunks is not None:
        shared.chunks += chunks
        if sum(map(len, shared.chunks)) > shared.max_entry:
            shared.too_big()
    if shared.followers:
        shared.publish(chunks)


def flight(closed: list[Flight] | None = None, max_entry: int = 10_000) -> Flight:
    return Flight(b"k", max_entry, 1000, (closed if closed is not None else []).append)


def test_followers_get_the_stream_from_its_first_byte_and_the_chunks_are_kept() -> None:
    async def run() -> None:
        shared = flight()
        early, late = FakeClient(), FakeClient()
        first = follower(early)
        assert shared.join(first)
        shared.started(HEAD)
        read(shared, [b"one"])
        second = follower(late)
        assert shared.join(second)  # a latecomer: the head and the chunks so far, at once
        read(shared, [b"two"])
        shared.complete()
        assert await first.done == await second.done == FOLLOWED
        assert early.body == late.body == b"HEAD200|3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"
        assert shared.chunks == [b"one", b"two"] and not shared.joinable

    asyncio.run(run())


def test_a_follower_that_falls_behind_its_bound_is_cut_and_the_others_go_on() -> None:
    async def run() -> None:
        shared = flight()
        slow, fast = FakeClient(), FakeClient()
        stalled, reading = follower(slow, max_lag=10), follower(fast, max_lag=10)
        shared.join(stalled)
        shared.join(reading)
        shared.started(HEAD)
        slow.writing_paused = True
        for _ in range(3):
            read(shared, [b"12345"])
        assert await stalled.done == CUT and slow.was_reset
        assert shared.followers == {reading}
        shared.complete()
        assert await reading.done == FOLLOWED

    asyncio.run(run())


def test_a_paused_follower_catches_up_when_its_client_reads_again() -> None:
    async def run() -> None:
        shared = flight()
        client = FakeClient()
        one = follower(client)
        shared.join(one)
        shared.started(HEAD)
        client.writing_paused = True
        read(shared, [b"abc"])
        shared.complete()
        assert not one.done.done()  # the end waits for the client
        client.writing_paused = False
        one.client_resumed()
        assert await one.done == FOLLOWED and client.body.endswith(b"3\r\nabc\r\n0\r\n\r\n")

    asyncio.run(run())


def test_the_upstream_is_abandoned_only_when_the_leader_and_every_follower_have_gone() -> None:
    async def run() -> None:
        shared = flight()
        abandoned = []
        shared.abandon = lambda: abandoned.append(True)
        a, b = follower(FakeClient()), follower(FakeClient())
        shared.join(a)
        shared.join(b)
        assert shared.leader_lost()  # followers remain: the upstream goes on
        a.client_lost()
        assert not abandoned
        b.client_lost()
        assert abandoned == [True]
        assert await a.done == await b.done == GONE

    asyncio.run(run())


def test_a_flight_that_ends_before_its_head_lets_its_followers_go_alone() -> None:
    async def run() -> None:
        shared = flight()
        one = follower(FakeClient())
        shared.join(one)
        read(shared, [b"from a failed attempt"])
        shared.failed()  # before the head: the leader may retry, the flight is empty again
        assert shared.chunks == [] and not one.done.done()
        shared.end(None, "a")
        assert await one.done == FALLBACK

    asyncio.run(run())


def test_a_flight_that_fails_after_its_head_truncates_its_followers() -> None:
    async def run() -> None:
        shared = flight()
        client = FakeClient()
        one = follower(client)
        shared.join(one)
        shared.started(HEAD)
        shared.failed()
        assert await one.done == TRUNCATED and client.aborted

    asyncio.run(run())


def test_past_max_entry_a_flight_keeps_nothing_and_takes_no_latecomers() -> None:
    async def run() -> None:
        closed: list[Flight] = []
        shared = flight(closed, max_entry=4)
        shared.started(HEAD)
        read(shared, [b"12345"])
        assert shared.chunks is None and closed == [shared]
        assert not shared.join(follower(FakeClient()))

    asyncio.run(run())


def test_a_failing_redis_store_is_a_miss_logged_once_per_outage(caplog) -> None:
    from llmproxy.cache.redis_store import RedisCacheStore

    async def gets() -> list[Entry | None]:
        store = RedisCacheStore("redis://127.0.0.1:1", False, None, timeout=0.5)  # nothing listens on port 1
        try:
            return [await store.get(b"k") for _ in range(5)]
        finally:
            await store.close()

    with caplog.at_level("WARNING", logger="llmproxy"):
        assert asyncio.run(gets()) == [None] * 5
    assert len([r for r in caplog.records if "get failed" in r.getMessage()]) == 1
