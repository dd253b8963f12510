"""Balancing strategies (llmproxy/fleet/balancer.py) on small fake candidates, without sockets.

The fakes implement the balancer's `Candidate` Protocol and nothing else; where a strategy breaks ties
or samples at random, the module's `random` is replaced by a seeded `random.Random`. Two cases at the end
use fleet/backend.py's Backend, whose estimates (a fading TTFT, a corrected queue depth) the strategies read.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter

import pytest

from llmproxy.config.model import BackendConfig
from llmproxy.fleet import balancer as balancer_module
from llmproxy.fleet.backend import TTFT_FADE, Backend
from llmproxy.fleet.balancer import (
    STRATEGIES,
    TTFT_FLOOR,
    Balancer,
    latency_based,
    least_connections,
    queue_depth,
    smooth_weighted,
)
from llmproxy.fleet.credentials import Credentials


@dataclass(eq=False)
class Fake:
    """A Candidate: a name, its weight and counters, a fixed TTFT estimate and reported load."""

    name: str
    weight: int = 1
    in_flight: int = 0
    wrr_current: int = 0
    ttft: float = 0.0
    load: float = 0.0
    kv_cache_usage: float | None = None
    asked_at: list[float] = field(default_factory=list)  # the `now` each ttft_estimate was asked for

    def ttft_estimate(self, now: float) -> float:
        self.asked_at.append(now)
        return self.ttft

    def estimated_load(self) -> float:
        return self.load


@pytest.fixture
def rng(monkeypatch) -> random.Random:
    """The balancer's random numbers, seeded: a tie or a sample is random, but the same on every run."""
    seeded = random.Random(20240611)
    monkeypatch.setattr(balancer_module, "random", seeded)
    return seeded


def fakes(weights: tuple[int, ...]) -> list[Fake]:
    return [Fake(chr(ord("a") + i), weight=w) for i, w in enumerate(weights)]


def picks(strategy: str, candidates: list, n: int) -> Counter:
    balancer = Balancer(strategy)
    return Counter(balancer.choose(candidates).name for _ in range(n))


def order(strategy, candidates: list, n: int) -> str:
    return "".join(strategy(candidates).name for _ in range(n))


# --- smooth weighted round robin ----------------------------------------------------------------------------


WEIGHTS = [(1,), (1, 1), (1, 1, 1), (2, 1), (5, 1, 1), (5, 3, 1), (10, 1), (3, 3, 2, 1), (1, 7, 2, 4)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_smooth_weighted_gives_each_backend_exactly_its_weight_in_every_window(weights: tuple[int, ...]):
    candidates, total = fakes(weights), sum(weights)
    sequence = order(smooth_weighted, candidates, 6 * total)
    expected = Counter({c.name: c.weight for c in candidates})
    for start in range(len(sequence) - total + 1):  # every window of sum(weights) picks, not just aligned ones
        assert Counter(sequence[start:start + total]) == expected, (start, sequence)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_smooth_weighted_keeps_every_backend_within_one_pick_of_its_share(weights: tuple[int, ...]):
    # Spread out, not in bursts: after any number of picks, each backend has had its weighted share of
    # them, give or take less than one pick (a plain weighted round robin, aaaaabbbc, falls behind by more).
    candidates, total = fakes(weights), sum(weights)
    counts = Counter()
    for n in range(1, 4 * total + 1):
        counts[smooth_weighted(candidates).name] += 1
        for c in candidates:
            assert abs(counts[c.name] - n * c.weight / total) < 1, (n, c.name, counts)


def test_smooth_weighted_interleaves_as_nginx_does():
    # nginx's own example of its algorithm (ngx_http_upstream_round_robin.c): weights 5, 1, 1.
    assert order(smooth_weighted, fakes((5, 1, 1)), 7) == "aabacaa"


def test_equal_weights_take_turns_in_order():
    assert order(smooth_weighted, fakes((1, 1, 1)), 9) == "abcabcabc"


def test_weighted_is_exact_and_interleaved():
    a, b, c = Fake("a", 5), Fake("b", 3), Fake("c", 1)
    balancer = Balancer("weighted")
    sequence = [balancer.choose([a, b, c]).name for _ in range(9 * 20)]
    assert Counter(sequence) == {"a": 100, "b": 60, "c": 20}
    assert "aaa" not in "".join(sequence[:9])  # smooth: spread out, not in bursts


@pytest.mark.parametrize("strategy", ["round_robin", "weighted"])
def test_round_robin_and_weighted_both_honour_weight(strategy: str):
    assert picks(strategy, fakes((3, 1)), 40) == {"a": 30, "b": 10}


# --- least connections --------------------------------------------------------------------------------------


def test_least_connections_compares_in_flight_per_weight_and_breaks_ties_at_random(rng):
    a, b = Fake("a", weight=2), Fake("b")
    a.in_flight, b.in_flight = 3, 1  # 1.5 vs 1.0
    assert picks("least_connections", [a, b], 20) == {"b": 20}
    a.in_flight = 2  # 1.0 vs 1.0: a tie
    assert set(picks("least_connections", [a, b], 200)) == {"a", "b"}


@pytest.mark.parametrize(("weights", "in_flight", "chosen"), [
    ((1, 1), (0, 1), "a"),
    ((1, 1), (5, 4), "b"),
    ((1, 1, 1), (2, 0, 1), "b"),
    ((2, 1), (3, 1), "b"),  # 1.5 vs 1.0
    ((2, 1), (1, 1), "a"),  # 0.5 vs 1.0
    ((3, 1), (5, 2), "a"),  # 1.67 vs 2.0
    ((4, 1), (7, 2), "a"),  # 1.75 vs 2.0
    ((1, 4), (2, 7), "b"),  # 2.0 vs 1.75: the busier backend by count, the less busy by weight
])
def test_least_connections_picks_the_fewest_in_flight_per_unit_of_weight(weights, in_flight, chosen):
    candidates = fakes(weights)
    for c, n in zip(candidates, in_flight, strict=True):
        c.in_flight = n
    assert picks("least_connections", candidates, 20) == {chosen: 20}


def test_least_connections_breaks_a_tie_at_random_among_the_tied_only(rng):
    a, b, c = Fake("a", in_flight=1), Fake("b", in_flight=1), Fake("c", weight=2, in_flight=2)  # 1, 1, 1
    d = Fake("d", in_flight=2)
    counts = picks("least_connections", [a, b, c, d], 600)
    assert set(counts) == {"a", "b", "c"}
    assert all(150 < counts[name] < 250 for name in "abc"), counts  # about a third each


# --- latency based ------------------------------------------------------------------------------------------


def test_latency_based_prefers_the_fast_backend_but_lets_load_spill_over():
    fast, slow = Fake("fast", ttft=0.010), Fake("slow", ttft=0.100)
    assert picks("latency_based", [fast, slow], 50) == {"fast": 50}
    fast.in_flight = 20  # 0.011 * 21 > 0.101 * 1
    assert picks("latency_based", [fast, slow], 50) == {"slow": 50}


# cost = (TTFT estimate + TTFT_FLOOR) * (in_flight + 1) / weight, TTFT_FLOOR being 1 ms
@pytest.mark.parametrize(("a", "b", "chosen"), [
    ({"ttft": 0.010}, {"ttft": 0.100}, "a"),  # 0.011 vs 0.101
    ({"ttft": 0.010, "in_flight": 8}, {"ttft": 0.100}, "a"),  # 0.099 vs 0.101
    ({"ttft": 0.010, "in_flight": 9}, {"ttft": 0.100}, "b"),  # 0.110 vs 0.101: the load spills over
    ({"ttft": 0.010, "in_flight": 1}, {"ttft": 0.020}, "b"),  # 0.022 vs 0.021
    ({"ttft": 0.100, "weight": 10}, {"ttft": 0.010}, "a"),  # 0.0101 vs 0.011: weight divides the cost
    ({"ttft": 0.010, "weight": 2, "in_flight": 2}, {"ttft": 0.020}, "a"),  # 0.0165 vs 0.021
    ({"ttft": 0.010, "weight": 2, "in_flight": 3}, {"ttft": 0.020}, "b"),  # 0.022 vs 0.021
    ({"ttft": 0.0}, {"ttft": 0.005}, "a"),  # no sample yet: costs as if it answered in 1 ms, and is tried
    ({"ttft": 0.0, "in_flight": 10}, {"ttft": 0.005}, "b"),  # 0.011 vs 0.006: a burst does not all land on it
])
def test_latency_based_picks_the_lower_peak_ewma_cost(a: dict, b: dict, chosen: str):
    assert TTFT_FLOOR == 0.001  # the costs in the table above
    assert picks("latency_based", [Fake("a", **a), Fake("b", **b)], 20) == {chosen: 20}


def test_latency_based_with_many_backends_never_starves_one(rng):
    backends = [Fake(f"b{i}", ttft=0.01 * (i + 1)) for i in range(4)]
    counts = picks("latency_based", backends, 4000)
    # Power of two choices: all but the slowest win some pairs even with nothing in flight (in real traffic
    # load spills over too, and an idle backend's estimate fades until it is tried again).
    assert set(counts) == {"b0", "b1", "b2"}
    assert counts["b0"] > counts["b1"] > counts["b2"]


def test_latency_based_compares_a_random_pair_not_all_candidates(rng):
    backends = [Fake(f"b{i}", ttft=0.01 * (i + 1)) for i in range(4)]
    counts = picks("latency_based", backends, 6000)
    # Of the 6 pairs of 4 backends, b0 is in 3 and wins them, b1 wins 2, b2 wins 1, b3 none.
    for name, share in (("b0", 3 / 6), ("b1", 2 / 6), ("b2", 1 / 6)):
        assert abs(counts[name] / 6000 - share) < 0.03, counts
    assert sum(len(b.asked_at) for b in backends) == 2 * 6000  # two estimates per choice, no more


def test_latency_based_reads_each_estimate_at_the_current_time():
    a, b = Fake("a", ttft=0.01), Fake("b", ttft=0.02)
    before = perf_counter()
    latency_based([a, b])
    after = perf_counter()
    assert len(a.asked_at) == len(b.asked_at) == 1
    assert before <= a.asked_at[0] <= after and before <= b.asked_at[0] <= after


# --- queue depth --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "loads", "chosen"), [
    ((1, 1), (40.0, 2.0), "b"),
    ((1, 1), (0.0, 1.0), "a"),
    ((1, 1, 1), (3.0, 0.5, 1.0), "b"),
    ((2, 1), (3.0, 2.0), "a"),  # 1.5 vs 2.0 per unit of weight
    ((1, 3), (2.0, 5.0), "b"),  # 2.0 vs 1.67
])
def test_queue_depth_picks_the_least_reported_load_per_unit_of_weight(weights, loads, chosen):
    candidates = fakes(weights)
    for c, load in zip(candidates, loads, strict=True):
        c.load = load
    assert picks("queue_depth", candidates, 20) == {chosen: 20}


def test_queue_depth_reads_the_backends_estimate_not_the_in_flight_count():
    busy_here, busy_there = Fake("a", in_flight=50, load=1.0), Fake("b", in_flight=0, load=9.0)
    assert picks("queue_depth", [busy_here, busy_there], 10) == {"a": 10}


def test_queue_depth_breaks_a_tie_at_random(rng):
    counts = picks("queue_depth", [Fake("a", load=2.0), Fake("b", load=2.0), Fake("c", load=3.0)], 400)
    assert set(counts) == {"a", "b"} and 150 < counts["a"] < 250, counts


# --- Balancer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_choose_with_one_candidate_returns_it_without_running_the_strategy(strategy: str):
    only = Fake("only", weight=1, in_flight=100, ttft=10.0, load=1e9)
    assert Balancer(strategy).choose([only]) is only
    assert only.wrr_current == 0 and only.asked_at == []  # nothing computed, nothing written


@pytest.mark.parametrize(("name", "strategy"), [
    ("round_robin", smooth_weighted), ("weighted", smooth_weighted), ("least_connections", least_connections),
    ("latency_based", latency_based), ("queue_depth", queue_depth),
])
def test_each_configured_name_is_a_strategy(name: str, strategy):
    assert STRATEGIES[name] is strategy and Balancer(name).strategy == name


def test_the_strategy_names_are_exactly_the_documented_ones():
    assert set(STRATEGIES) == {"round_robin", "weighted", "least_connections", "latency_based", "queue_depth",
                               "prefix_affinity"}
    with pytest.raises(KeyError):
        Balancer("random")


# --- with fleet/backend.py's Backend: the estimates the strategies read -------------------------------------


def backend(name: str) -> Backend:
    config = BackendConfig(url=f"http://{name}", name=name)
    return Backend(config=config, pool=None, name=name, host_header=b"", base_path=b"",
                   credentials=Credentials([], "bearer", lambda: 0.0),
                   first_byte_timeout=1.0, stream_idle_timeout=1.0, kind="vllm")


@pytest.mark.parametrize(("slow_sample_age", "chosen"), [(0.0, "fast"), (3 * TTFT_FADE, "slow")])
def test_an_idle_backends_estimate_fades_until_latency_based_tries_it_again(slow_sample_age: float, chosen: str):
    fast, slow = backend("fast"), backend("slow")
    now = perf_counter()
    fast.observe_ttft(0.010, now)
    slow.observe_ttft(0.100, now - slow_sample_age)  # 0.100 * e^-3 = 0.005 by now when 3 fades old
    assert picks("latency_based", [fast, slow], 20) == {chosen: 20}


def test_queue_depth_uses_the_reported_load_corrected_by_what_we_sent_since():
    a, b = backend("a"), backend("b")
    a.queue_depth, b.queue_depth = 40.0, 2.0
    assert picks("queue_depth", [a, b], 10) == {"b": 10}
    b.in_flight = 50  # sent since b's report: it is now the busier one
    assert picks("queue_depth", [a, b], 10) == {"a": 10}
    b.queue_depth = None  # reports nothing (Ollama): our own in-flight count stands in
    b.in_flight = 3
    assert picks("queue_depth", [a, b], 10) == {"b": 10}
