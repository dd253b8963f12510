"""prefix_affinity: a conversation keeps its key as it grows, keys spread over the ring by weight, no backend
goes over its bounded load, a backend that leaves moves only its own keys, and KV-full backends are passed
over (llmproxy/fleet/prefix.py, llmproxy/fleet/balancer.py)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from llmproxy.fleet.balancer import Balancer
from llmproxy.fleet.prefix import AffinityKeys, HashRing, bounded_choice, conversation_start

KEYS = AffinityKeys(key_chars=64, session_header="x-session-id")
SYSTEM = {"role": "system", "content": "You are a coding agent. " * 20}


@dataclass(eq=False)
class Node:
    name: str
    weight: int = 1
    in_flight: int = 0
    wrr_current: int = 0
    kv_cache_usage: float | None = None

    def ttft_estimate(self, now: float) -> float:
        return 0.0

    def estimated_load(self) -> float:
        return float(self.in_flight)


def chat(*turns: str, system: dict = SYSTEM, **extra) -> dict:
    roles = ("user", "assistant")
    return {"model": "m", "messages": [system, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))],
            **extra}


def test_a_conversation_keeps_its_key_as_it_grows_turn_by_turn():
    first = KEYS.key([], chat("Fix the failing test in tests/test_parser.py please, it is about dates."))
    later = KEYS.key([], chat("Fix the failing test in tests/test_parser.py please, it is about dates.",
                              "Looking at it.", "Now also update the changelog."))
    assert first is not None and first == later


def test_another_conversation_gets_another_key_though_the_system_prompt_and_tools_are_the_same():
    tools = [{"type": "function", "function": {"name": "shell", "parameters": {}}}]
    one = KEYS.key([], chat("Rename the config loader.", tools=tools))
    two = KEYS.key([], chat("Add a retry to the webhook client.", tools=tools))
    assert one != two


def test_a_changed_system_prompt_keeps_the_conversation_on_its_key():
    # Agents put the date or the working directory in the system prompt: it must not move the conversation.
    one = KEYS.key([], chat("Rename the config loader.", system={"role": "system", "content": "Today is Monday."}))
    two = KEYS.key([], chat("Rename the config loader.", system={"role": "system", "content": "Today is Tuesday."}))
    assert one == two


@pytest.mark.parametrize(("headers", "body"), [
    ([(b"x-session-id", b"s-1")], chat("anything")),
    ([], chat("anything", prompt_cache_key="s-1")),
    ([], chat("anything", user="s-1")),
    ([], {"model": "m", "messages": [{"role": "user", "content": "anything"}], "metadata": {"user_id": "s-1"}}),
])
def test_an_explicit_session_id_is_the_key_whatever_the_text(headers, body):
    assert KEYS.key(headers, body) == KEYS.key([(b"x-session-id", b"s-1")], chat("something else"))


@pytest.mark.parametrize(("body", "start"), [
    ({"model": "m", "input": [{"role": "developer", "content": "rules"},
                              {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]}, "hello"),
    ({"model": "m", "input": "hello"}, "hello"),
    ({"model": "m", "prompt": "hello"}, "hello"),
    ({"model": "m", "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2"}],
      "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}, "hello"),
])
def test_the_conversation_start_of_each_api_leaves_out_its_preamble(body, start):
    assert conversation_start(body, 64) == start


def test_nothing_to_key_on_means_no_key():
    assert KEYS.key([], {"model": "m", "messages": [SYSTEM]}) is None
    assert KEYS.key([], b"not json") is None


def test_keys_spread_over_the_ring_by_weight():
    nodes = [Node("a"), Node("b"), Node("c", weight=2)]
    ring = HashRing(nodes)
    counts = Counter(next(iter(ring.walk(random.Random(i).getrandbits(64)))) for i in range(20_000))
    shares = {name: counts[name] / 20_000 for name in "abc"}
    assert shares["c"] == pytest.approx(0.5, abs=0.06) and shares["a"] == pytest.approx(0.25, abs=0.05)


def test_a_backend_that_leaves_moves_only_its_own_keys():
    nodes = [Node(name) for name in "abcd"]
    keys = [random.Random(i).getrandbits(64) for i in range(10_000)]
    ring = HashRing(nodes)
    before = {key: bounded_choice(ring, key, nodes, 0.25).name for key in keys}
    after = {key: bounded_choice(ring, key, nodes[:3], 0.25).name for key in keys}  # d is down
    moved = [key for key in keys if before[key] != after[key]]
    assert all(before[key] == "d" for key in moved)
    assert len(moved) / len(keys) == pytest.approx(1 / 4, abs=0.05)


def test_no_backend_goes_over_its_bounded_load_and_a_hot_key_spills_over():
    nodes = [Node(name) for name in "abcd"]
    ring = HashRing(nodes)
    epsilon = 0.25
    hot = 12345
    for placed in range(1, 101):  # 100 requests of one conversation, none finishing
        chosen = bounded_choice(ring, hot, nodes, epsilon)
        chosen.in_flight += 1
        assert max(node.in_flight for node in nodes) <= math.ceil((1 + epsilon) * placed / len(nodes))
    assert min(node.in_flight for node in nodes) > 0  # it spilled over to every backend


def test_prefix_affinity_passes_over_a_backend_whose_kv_cache_is_full_while_another_has_room():
    nodes = [Node("a"), Node("b")]
    balancer = Balancer("prefix_affinity", nodes, kv_threshold=0.9)
    key = next(k for k in range(1000) if bounded_choice(HashRing(nodes), k, nodes, 0.25).name == "a")
    assert balancer.choose(nodes, key).name == "a"
    nodes[0].kv_cache_usage = 0.95
    assert balancer.choose(nodes, key).name == "b"
    nodes[1].kv_cache_usage = 0.97  # both full: the ring decides again
    assert balancer.choose(nodes, key).name == "a"


def test_queue_depth_passes_over_a_kv_full_backend_too_and_other_strategies_do_not_look():
    full, roomy = Node("full", kv_cache_usage=0.99), Node("roomy", in_flight=5, kv_cache_usage=0.1)
    assert Balancer("queue_depth", [full, roomy], kv_threshold=0.9).choose([full, roomy]).name == "roomy"
    assert Balancer("least_connections", [full, roomy], kv_threshold=0.9).choose([full, roomy]).name == "full"


def test_a_request_without_a_key_is_balanced_by_least_connections():
    busy, idle = Node("busy", in_flight=3), Node("idle")
    assert Balancer("prefix_affinity", [busy, idle]).choose([busy, idle], None).name == "idle"
