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
  report nothing (Ollama, OpenAI) count their in-flight requests;
- prefix_affinity: a conversation's turns to the backend holding its prefix in cache, by consistent
  hashing with bounded loads (fleet/prefix.py); a request with nothing to key on goes by least_connections.

KV-cache pressure (queue_depth and prefix_affinity): a backend whose reported KV-cache use is at or above
`routing.kv_cache_threshold` is passed over while any candidate is below it (a full cache means preemption
and recomputation), so the score of a candidate is, in order: KV use under the threshold, then the strategy's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol, TypeVar

from llmproxy.fleet.prefix import AffinityKeys, HashRing, bounded_choice

TTFT_FLOOR = 0.001  # seconds


class Candidate(Protocol):
    """What the strategies read of a backend (fleet/backend.py); wrr_current is theirs to write."""

    name: str
    weight: int
    in_flight: int
    wrr_current: int
    kv_cache_usage: float | None

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
    "prefix_affinity": least_connections,  # for requests without a key; the ring places the others
}
KV_AWARE = frozenset({"queue_depth", "prefix_affinity"})


class Balancer:
    __slots__ = ("_choose", "_epsilon", "_keys", "_kv_threshold", "_ring", "strategy")

    def __init__(self, strategy: str, backends: list[Any] = (), *, kv_threshold: float = 1.0,
                 keys: AffinityKeys | None = None, epsilon: float = 0.25) -> None:
        self.strategy = strategy
        self._choose = STRATEGIES[strategy]
        self._kv_threshold = kv_threshold if strategy in KV_AWARE else None
        affine = strategy == "prefix_affinity"
        self._ring = HashRing(backends) if affine else None
        self._keys = (keys or AffinityKeys(1024, "x-session-id")) if affine else None
        self._epsilon = epsilon

    def affinity_key(self, headers: list[tuple[bytes, bytes]], body: Any) -> int | None:
        """The request's place on the ring (prefix_affinity only; None otherwise, or with nothing to key on)."""
        keys = self._keys
        return keys.key(headers, body) if keys is not None else None

    def choose(self, candidates: list[Backend], key: int | None = None) -> Backend:
        """One of `candidates` (never empty: the router raises before); `key`: the request's affinity key."""
        if len(candidates) == 1:
            return candidates[0]
        if self._kv_threshold is not None:
            candidates = _below_kv_threshold(candidates, self._kv_threshold)
        if key is not None and self._ring is not None:
            return bounded_choice(self._ring, key, candidates, self._epsilon)
        return self._choose(candidates)


def _below_kv_threshold(candidates: list[Backend], threshold: float) -> list[Backend]:
    """The candidates whose KV cache is below the threshold (or unreported); all of them if none is."""
    roomy = [b for b in candidates if b.kv_cache_usage is None or b.kv_cache_usage < threshold]
    return roomy or candidates
