"""Choosing one backend among the candidates the router gave (`routing.load_balance`).

Strategies (all honour `weight`):
- round_robin / weighted: smooth weighted round robin (nginx's algorithm): over any window of
  sum(weights) picks, each backend gets exactly its weight, spread out rather than in bursts;
- least_connections: fewest in-flight requests per unit of weight, ties broken at random; the count
  covers the whole stream (released in the pipeline's `finally`), not just the response head;
- latency_based: power of two choices on peak-EWMA cost = TTFT estimate * (in_flight + 1) / weight. The
  fastest backend gets the most, but its cost grows with its load, so the others take the overflow; and
  an idle backend's estimate fades (fleet/backend.py), so a slow one keeps being tried and can recover;
- queue_depth: the least loaded by the backends' own reports (vLLM `num_requests_waiting + running`,
  TGI queue + batch), polled every health interval and corrected by what we sent since; backends that
  report nothing (Ollama, OpenAI) count their in-flight requests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from time import perf_counter
from typing import Protocol, TypeVar

TTFT_FLOOR = 0.001  # seconds


class Candidate(Protocol):
    """What the strategies read of a backend (fleet/backend.py); wrr_current is theirs to write."""

    weight: int
    in_flight: int
    wrr_current: int

    def ttft_estimate(self, now: float) -> float: ...

    def estimated_load(self) -> float: ...


Backend = TypeVar("Backend", bound=Candidate)
Strategy = Callable[[list[Backend]], Backend]


def smooth_weighted(candidates: list[Backend]) -> Backend:
    total = 0
    best = candidates[0]
    for backend in candidates:
        backend.wrr_current += backend.weight
        total += backend.weight
        if backend.wrr_current > best.wrr_current:
            best = backend
    best.wrr_current -= total
    return best


def _least(candidates: list[Backend], load: Callable[[Backend], float]) -> Backend:
    """The candidate of least load per unit of weight, ties broken at random."""
    best: list[Backend] = []
    best_load = 0.0
    for backend in candidates:
        value = load(backend) / backend.weight
        if not best or value < best_load:
            best, best_load = [backend], value
        elif value == best_load:
            best.append(backend)
    return best[0] if len(best) == 1 else random.choice(best)


def least_connections(candidates: list[Backend]) -> Backend:
    return _least(candidates, _in_flight)


def latency_based(candidates: list[Backend]) -> Backend:
    now = perf_counter()
    pair = candidates if len(candidates) <= 2 else random.sample(candidates, 2)
    # A backend without a (recent) sample costs as if it answered in TTFT_FLOOR: it is tried soon, but a
    # burst does not all land on it before its first answer.
    return _least(pair, lambda b: (b.ttft_estimate(now) + TTFT_FLOOR) * (b.in_flight + 1))


def queue_depth(candidates: list[Backend]) -> Backend:
    return _least(candidates, _estimated_load)


def _in_flight(backend: Candidate) -> float:
    return backend.in_flight


def _estimated_load(backend: Candidate) -> float:
    return backend.estimated_load()


# routing.load_balance: the one list of strategy names (the config is checked against it).
STRATEGIES: dict[str, Strategy] = {
    "round_robin": smooth_weighted,
    "weighted": smooth_weighted,
    "least_connections": least_connections,
    "latency_based": latency_based,
    "queue_depth": queue_depth,
}


class Balancer:
    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self._choose = STRATEGIES[strategy]

    def choose(self, candidates: list[Backend]) -> Backend:
        """One of `candidates` (never empty: the router raises before)."""
        return candidates[0] if len(candidates) == 1 else self._choose(candidates)
