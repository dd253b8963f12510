"""The memory of which backend produced which Responses API response."""

from __future__ import annotations

from llmproxy.fleet.affinity import ResponseAffinity


def test_a_response_is_remembered_with_its_backend():
    affinity = ResponseAffinity()
    affinity.remember("resp_1", "a")
    affinity.remember("resp_2", "b")
    assert (affinity.backend_of("resp_1"), affinity.backend_of("resp_2")) == ("a", "b")
    assert affinity.backend_of("resp_unknown") is None


def test_the_oldest_unused_response_is_forgotten_first():
    affinity = ResponseAffinity(capacity=3)
    for i in range(3):
        affinity.remember(f"resp_{i}", f"b{i}")
    assert affinity.backend_of("resp_0") == "b0"  # used: a conversation going on
    affinity.remember("resp_3", "b3")
    assert affinity.backend_of("resp_1") is None  # the least recently used went
    assert [affinity.backend_of(f"resp_{i}") for i in (0, 2, 3)] == ["b0", "b2", "b3"]
    assert len(affinity) == 3


class _Backend:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_follow_up_is_narrowed_to_the_backend_that_stored_its_previous_response():
    a, b, c = _Backend("a"), _Backend("b"), _Backend("c")
    affinity = ResponseAffinity()
    affinity.remember("resp_1", "b")
    assert affinity.home_of_follow_up({"previous_response_id": "resp_1"}, [a, b, c]) == [b]
    # Unknown, absent or not a string: balanced as usual.
    for body in ({"previous_response_id": "resp_2"}, {}, {"previous_response_id": 7}, None, []):
        assert affinity.home_of_follow_up(body, [a, b, c]) == [a, b, c]
    # The home is not among the candidates (removed by a reload, or it no longer serves the model).
    assert affinity.home_of_follow_up({"previous_response_id": "resp_1"}, [a, c]) == [a, c]
