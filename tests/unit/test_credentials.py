"""A backend's keys: round robin, a throttled key rests for its retry-after, the header its kind wants."""

from __future__ import annotations

import pytest

from llmproxy.fleet.credentials import DEFAULT_REST, MAX_REST, Credentials


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keys_rotate_round_robin_as_bearer_or_x_api_key():
    clock = Clock()
    bearer = Credentials(["a", "b"], "bearer", clock)
    assert [bearer.pick() for _ in range(3)] == [(b"authorization: Bearer a\r\n", 0),
                                                 (b"authorization: Bearer b\r\n", 1),
                                                 (b"authorization: Bearer a\r\n", 0)]
    anthropic = Credentials(["k"], "x-api-key", clock)
    assert anthropic.pick() == (b"x-api-key: k\r\n", 0) and not anthropic.rotates


def test_no_key_sends_nothing():
    none = Credentials([], "bearer", Clock())
    assert not none and none.pick() == (b"", -1)


def test_a_throttled_key_rests_for_its_retry_after_then_takes_its_turn_again():
    clock = Clock()
    keys = Credentials(["a", "b", "c"], "x-api-key", clock)
    assert keys.pick()[1] == 0
    keys.throttled(0, b"30")
    assert keys.another_available(0)
    assert [keys.pick()[1] for _ in range(4)] == [1, 2, 1, 2]  # a rests
    clock.now += 30
    assert sorted(keys.pick()[1] for _ in range(3)) == [0, 1, 2]


def test_when_every_key_rests_the_one_free_soonest_is_used_and_no_other_is_available():
    clock = Clock()
    keys = Credentials(["a", "b"], "bearer", clock)
    keys.throttled(0, b"20")
    keys.throttled(1, b"5")
    assert not keys.another_available(0)
    assert keys.pick()[1] == 1


@pytest.mark.parametrize(("retry_after", "rest"), [
    (None, DEFAULT_REST), (b"", DEFAULT_REST), (b"2.5", 2.5), (b"Wed, 21 Oct 2015 07:28:00 GMT", DEFAULT_REST),
    (b"-4", 0.0), (b"99999999", MAX_REST), (b"nan", DEFAULT_REST),
])
def test_a_retry_after_is_read_as_seconds_within_bounds(retry_after: bytes | None, rest: float):
    clock = Clock()
    keys = Credentials(["a", "b"], "bearer", clock)
    keys.throttled(0, retry_after)
    if rest:
        clock.now += rest - 0.001
        assert not keys.another_available(1)
        clock.now += 0.002
    assert keys.another_available(1)
